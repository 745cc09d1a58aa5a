"""Image → tensor: the one preprocessing of fedssl, the same for training, evaluation and serving.

Two steps, each written once:

* `load_image(source, size)`: JPEG/PNG file or bytes → uint8 RGB pixels (3, size, size).
  Hospitals decode their data set with it (`fedssl_flower.data.decode`), the registry decodes
  `:predict` uploads with it. A v2 client sending UINT8 pixels is expected to have done the same.
* `normalize(pixels, mean, std)`: uint8 pixels → float32 `(pixels / 255 - mean) / std`, with the
  mean/std of the model (its input spec; different architectures use different ones). Training,
  evaluation, `:predict` and v2 UINT8 input all call it.

Decoding is hardened for untrusted uploads: only JPEG and PNG are opened, the pixel count is
bounded (`max_pixels`) before the image is decoded, Pillow's own decompression-bomb error is
reported as one, and every failure is an `ImageDecodeError` saying what was wrong and what was
expected. No global Pillow setting is changed: hospitals decode on many threads at once.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps

from . import names
from .errors import FedSSLError

# Largest image (in pixels) fedssl decodes; larger ones are refused before decoding.
MAX_IMAGE_PIXELS = 40_000_000

# Pillow's bilinear resize widens its triangle filter by the downscaling factor, so it is an
# antialiased (area-weighted) reduction, not point sampling; it is what hospitals used before
# and what torchvision's antialiased Resize computes.
RESAMPLE = Image.Resampling.BILINEAR

# Transparent pixels (RGBA, LA, palette or tRNS transparency) are composited onto black: the
# colour of the vignette around a dermatoscope's field of view, so a cut-out lesion on a
# transparent background looks like the images the models are trained on.
ALPHA_BACKGROUND = (0, 0, 0)

ACCEPTED_FORMATS = ("JPEG", "PNG")
# MPO is a JPEG with extra frames (many phone cameras write it); its first frame is the photo.
_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG"}
# Integer grayscale modes (16-bit PNG and 32-bit integer), scaled to 8 bits by their range.
_WIDE_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageDecodeError(FedSSLError, ValueError):
    """The bytes are not a JPEG or PNG image fedssl can decode safely."""


def load_image(source: bytes | str | Path, size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """A JPEG/PNG image (its bytes, or a file path) → uint8 RGB pixels of shape (3, size, size).

    In order:
      1. open; anything but JPEG or PNG, more than `max_pixels` pixels, or a truncated or
         corrupt file is an `ImageDecodeError` (a missing file stays `FileNotFoundError`);
      2. JPEG only: libjpeg decodes at 1/2, 1/4 or 1/8 scale (`draft`) while the shorter side
         stays at least 2 * `size`; deterministic for a given file, and only a speed-up;
      3. EXIF orientation applied (`ImageOps.exif_transpose`), so a phone photo is upright;
      4. to RGB: grayscale replicated; transparency composited onto `ALPHA_BACKGROUND` (black);
         16-bit or 32-bit integer grayscale mapped linearly from its own [min, max] to
         [0, 255] (not clipped at 255; a constant image becomes 0); CMYK by Pillow (Adobe
         inverted CMYK JPEGs included), without ICC colour management;
      5. geometry: the shorter side is resized to `size` and the centre `size` x `size`
         square kept, done as one resample of the centred square of the source (sub-pixel
         exact for odd sizes) with `RESAMPLE` (antialiased bilinear). No aspect-ratio squash.
    """
    if type(size) is not int or size < 1:
        raise ValueError(f"image size must be a positive integer, got {size!r}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        fp = open(source, "rb")  # outside the try below: a missing file is not a decoding error
    else:
        raise TypeError(f"load_image takes the image's bytes or a file path, got {type(source).__name__}")
    with fp:
        try:
            with Image.open(fp, formats=ACCEPTED_FORMATS) as img:
                return _decode(img, size, max_pixels)
        except ImageDecodeError:
            raise
        except Image.UnidentifiedImageError:
            fp.seek(0)
            head = fp.read(8)
            raise ImageDecodeError(f"not a decodable JPEG or PNG image: unrecognised or damaged JPEG/PNG header (first bytes {head!r})") from None
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(f"image refused as a decompression bomb: {exc}") from exc
        # Pillow's parsers report malformed input as any of these.
        except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError) as exc:
            raise ImageDecodeError(f"not a decodable JPEG or PNG image: {exc}") from exc


def _decode(img: Image.Image, size: int, max_pixels: int) -> np.ndarray:
    fmt = _FORMATS.get(img.format or "")
    if fmt is None:
        raise ImageDecodeError(f"unsupported image format {img.format!r}; expected JPEG or PNG")
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(f"image is {width}x{height} pixels; at most {max_pixels} pixels are accepted")
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image is {width}x{height} pixels; expected at least 1x1")
    if fmt == "JPEG":
        img.draft("RGB", (2 * size, 2 * size))
    img.load()
    ImageOps.exif_transpose(img, in_place=True)
    rgb = _to_rgb(img)
    w, h = rgb.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    out = rgb.resize((size, size), RESAMPLE, box=box)
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1).copy()


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _WIDE_GRAY:
        values = np.asarray(img, dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
        scaled = np.zeros(values.shape, np.uint8) if hi == lo else np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("L", "1", "P", "CMYK", "YCbCr"):
        return img.convert("RGB")
    raise ImageDecodeError(f"image mode {mode!r} is not supported; expected grayscale, RGB, RGBA, palette, 16-bit grayscale or CMYK")


Pixels = TypeVar("Pixels", torch.Tensor, np.ndarray)


def normalize(pixels: Pixels, mean: Sequence[float] = names.IMAGENET_MEAN, std: Sequence[float] = names.IMAGENET_STD) -> Pixels:
    """uint8 RGB pixels (N, 3, H, W) or (3, H, W) → float32 `(pixels / 255 - mean) / std`, per channel.

    A torch tensor gives a tensor (on its device), a numpy array an array: the registry's event
    loop runs no torch (see `fedssl_registry.inference.repository.torch_thread`) and normalises
    v2 UINT8 input in numpy. Both compute the same float32 operations in the same order, so
    they are bit-identical (tests/core/test_preprocessing.py holds that).
    """
    if pixels.dtype not in (torch.uint8, np.uint8):
        raise ValueError(f"normalize takes uint8 pixels, got {pixels.dtype}")
    if pixels.ndim not in (3, 4) or pixels.shape[-3] != 3:
        raise ValueError(f"normalize takes pixels of shape (N, 3, H, W) or (3, H, W), got {tuple(pixels.shape)}")
    m, s = _channel_stats(mean, "mean"), _channel_stats(std, "std")
    if any(v <= 0 for v in s):
        raise ValueError(f"std must be positive per channel, got {list(std)}")
    if isinstance(pixels, np.ndarray):
        x = pixels.astype(np.float32)
        mt, st = np.asarray(m, np.float32).reshape(3, 1, 1), np.asarray(s, np.float32).reshape(3, 1, 1)
    else:
        x = pixels.to(torch.float32)
        mt = torch.tensor(m, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
        st = torch.tensor(s, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return (x / 255.0 - mt) / st


def _channel_stats(values: Sequence[float], what: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be 3 numbers (one per RGB channel), got {values!r}") from None
    if len(out) != 3:
        raise ValueError(f"{what} must be 3 numbers (one per RGB channel), got {len(out)}: {list(out)}")
    return out  # type: ignore[return-value]
