"""Image → tensor, the same at training-time evaluation and at serving.

Decoding is hardened for untrusted uploads: Pillow's decompression-bomb guard is an error,
not a warning, and the pixel count is bounded before the image is decoded.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from . import names
from .errors import FedSSLError

# Largest image (in pixels) fedssl decodes; larger ones are refused before decoding.
MAX_IMAGE_PIXELS = 40_000_000


class ImageDecodeError(FedSSLError, ValueError):
    """The bytes are not a JPEG or PNG image fedssl can decode safely."""


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode JPEG/PNG bytes to an RGB PIL image, refusing bombs and non-images."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("JPEG", "PNG"):
                raise ImageDecodeError(f"unsupported image format {img.format!r}; expected JPEG or PNG")
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image is {width}x{height} pixels; at most {max_pixels} pixels are accepted")
            img.load()
            return img.convert("RGB")
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image refused as a decompression bomb: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"not a decodable JPEG or PNG image: {exc}") from exc


def eval_transform(
    image_size: int,
    mean: Sequence[float] = names.IMAGENET_MEAN,
    std: Sequence[float] = names.IMAGENET_STD,
) -> T.Compose:
    """PIL RGB image → normalised float tensor (C, H, W) of side `image_size`."""
    return T.Compose(
        [
            T.ToImage(),
            T.Resize((image_size, image_size), antialias=True),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def normalize_uint8(batch: torch.Tensor, mean: Sequence[float] = names.IMAGENET_MEAN, std: Sequence[float] = names.IMAGENET_STD) -> torch.Tensor:
    """A UINT8 NCHW batch → the float batch the model expects."""
    x = batch.to(torch.float32) / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s
