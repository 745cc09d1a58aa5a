"""Image → tensor: the one preprocessing of fedssl, the same for training, evaluation and serving.

Two steps, each written once:

* `load_image(source, size)`: JPEG/PNG file or bytes → uint8 RGB pixels (3, size, size).
  Hospitals decode their data set with it (`fedssl_flower.data.decode`), the registry decodes
  `:predict` uploads with it. A v2 client sending UINT8 pixels is expected to have done the same.
* `normalize(pixels, mean, std)`: uint8 pixels → float32 `(pixels / 255 - mean) / std`, with the
  mean/std of the model (its input spec; different architectures use different ones). Training,
  evaluation, `:predict` and v2 UINT8 input all call it.

Decoding is hardened for untrusted uploads: only JPEG and PNG are opened, the pixel count is
bounded before the image is decoded (`max_pixels`, and the lower `max_png_pixels` for PNG,
which has no reduced-size decode), a large image is shrunk before any conversion, Pillow's
own decompression-bomb error is reported as one, and every failure is an `ImageDecodeError` saying what was wrong and what was
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

# Largest image (in pixels) fedssl decodes; larger ones are refused before decoding. A JPEG
# costs little memory whatever its size: libjpeg decodes it at 1/8 scale (`draft`), e.g. a
# 24 MP DSLR photo in ~5 MB (72 MB if progressive: libjpeg then buffers its coefficients).
MAX_IMAGE_PIXELS = 40_000_000
# PNG has no reduced-size decode: it is decoded whole at 1 to 4 bytes per pixel (a 6,300 x
# 6,300 RGB PNG, ~39.7 MP, took 158 MB and an RGBA one 760 MB before the early reduction
# below). 16 MP (a 4,000 x 4,000 picture, more than any screen capture) bounds that at ~65 MB.
MAX_PNG_PIXELS = 16_000_000

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


def load_image(source: bytes | str | Path, size: int, max_pixels: int = MAX_IMAGE_PIXELS,
               max_png_pixels: int = MAX_PNG_PIXELS) -> np.ndarray:
    """A JPEG/PNG image (its bytes, or a file path) → uint8 RGB pixels of shape (3, size, size).

    In order:
      1. open; anything but JPEG or PNG, more than `max_pixels` pixels (a PNG: more than
         `max_png_pixels` too), or a truncated or corrupt file is an `ImageDecodeError` (a
         missing file stays `FileNotFoundError`);
      2. JPEG: decoded at 1/2, 1/4 or 1/8 scale (libjpeg's `draft`) while the shorter side
         stays at least 2 * `size`;
      3. EXIF orientation applied (`ImageOps.exif_transpose`), so a phone photo is upright;
      3b. PNG (decoded whole): its centred square box-averaged by the largest integer factor
         that keeps it at least 2 * `size` on a side (Pillow's `reduce`; transparency
         premultiplied, so no fringe) before anything else is done with it. Steps 2 and 3b
         are deterministic for a given file and bound the memory and time a large image costs;
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
                return _decode(img, size, max_pixels, max_png_pixels)
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


def _decode(img: Image.Image, size: int, max_pixels: int, max_png_pixels: int) -> np.ndarray:
    fmt = _FORMATS.get(img.format or "")
    if fmt is None:
        raise ImageDecodeError(f"unsupported image format {img.format!r}; expected JPEG or PNG")
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(f"image is {width}x{height} pixels; at most {max_pixels} pixels are accepted")
    if fmt == "PNG" and width * height > max_png_pixels:
        raise ImageDecodeError(f"PNG image is {width}x{height} pixels; at most {max_png_pixels} pixels are accepted "
                               f"for PNG, which is decoded at full size (JPEG: {max_pixels}); send a smaller image or a JPEG")
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image is {width}x{height} pixels; expected at least 1x1")
    if fmt == "JPEG":
        img.draft("RGB", (2 * size, 2 * size))
    img.load()
    ImageOps.exif_transpose(img, in_place=True)  # before `_reduce`: its square is the upright picture's
    square = None
    if fmt == "PNG":
        img, square = _reduce(img, size)
    rgb = _to_rgb(img)
    if square is None:
        w, h = rgb.size
        side = min(w, h)
        square = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    out = rgb.resize((size, size), RESAMPLE, box=square)
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1).copy()


def _reduce(img: Image.Image, size: int) -> tuple[Image.Image, tuple[float, float, float, float] | None]:
    """A loaded PNG's centred square box-averaged by the largest integer factor that keeps its
    side at least 2 * `size`, and that square's place in the small image (the last row and
    column of boxes may be partial); `(img, None)` when that factor is 1. The full-size image
    is released at once, so the conversions that follow work on the small one: an RGBA PNG of
    40 MP took 760 MB through `_to_rgb` at full size, 16-bit grayscale 990 MB. Averaging the
    square (not the whole image) keeps the box grid on it: the result is what Pillow's own
    `reducing_gap` resize gives, within a few levels of one resample at full size."""
    width, height = img.size
    side = min(width, height)
    factor = side // (2 * size)
    if factor < 2:
        return img, None
    x0, y0 = (width - side) // 2, (height - side) // 2
    box = (x0, y0, x0 + side, y0 + side)
    mode = img.mode
    # Each branch makes at most one full-size copy of the kind `reduce` takes, then frees the
    # decoded image before averaging: peak memory is the decoded image plus that copy.
    if mode in _ALPHA_MODES or "transparency" in img.info:
        # Averaged premultiplied (RGBa), as compositing onto ALPHA_BACKGROUND (black) weighs colours by alpha.
        rgba = img if mode == "RGBA" else _release(img, img.convert("RGBA"))
        small = _release(rgba, rgba.convert("RGBa")).reduce(factor, box=box).convert("RGBA")
    elif mode in ("P", "1"):
        small = _release(img, img.convert("RGB")).reduce(factor, box=box)
    elif mode in _WIDE_GRAY:
        # Scaled by the full image's range (as `_to_rgb` does), not by the range left after
        # averaging. Pillow reduces 32-bit, not 16-bit, integers.
        lo, hi = img.getextrema()
        wide = _release(img, img.convert("I")).reduce(factor, box=box)
        small = Image.fromarray(_stretch(np.asarray(wide, dtype=np.float64), lo, hi), mode="L")
    else:  # L, RGB, I, F
        small = _release(img, img.reduce(factor, box=box))
    extent = side / factor
    return small, (0.0, 0.0, extent, extent)


def _release(done: Image.Image, result: Image.Image) -> Image.Image:
    """`result`, after freeing `done`'s pixels (now rather than when the caller's `with` ends)."""
    done.close()
    return result


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _WIDE_GRAY:
        values = np.asarray(img, dtype=np.float64)
        return Image.fromarray(_stretch(values, float(values.min()), float(values.max())), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("L", "1", "P", "CMYK", "YCbCr"):
        return img.convert("RGB")
    raise ImageDecodeError(f"image mode {mode!r} is not supported; expected grayscale, RGB, RGBA, palette, 16-bit grayscale or CMYK")


def _stretch(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Integer grayscale → uint8, [lo, hi] mapped linearly onto [0, 255]; a constant image is 0."""
    if hi == lo:
        return np.zeros(values.shape, np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


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
