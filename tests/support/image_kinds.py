"""One file of every kind of image a hospital or a `:predict` client may hand over (issue 15,
item 3), generated with Pillow: what must load, and what must be skipped or refused."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Kind:
    name: str
    filename: str
    data: bytes
    content_type: str
    good: bool
    problem: str = ""  # bad kinds: words the error must hold


def _photo(w: int = 64, h: int = 48) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def kinds() -> list[Kind]:
    photo = _photo()
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(64)[None, :].repeat(48, 0) * 4).astype(np.uint8)))
    la = photo.convert("LA")
    pal = photo.convert("P")
    pal.info["transparency"] = 0
    wide = Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16))  # up to 61,420: beyond 8 bits
    assert wide.mode in ("I;16", "I;16L", "I;16B")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    jpeg = _encode(photo, "JPEG", quality=90)
    return [
        Kind("grayscale L", "gray.png", _encode(photo.convert("L"), "PNG"), "image/png", True),
        Kind("grayscale JPEG", "gray.jpg", _encode(photo.convert("L"), "JPEG"), "image/jpeg", True),
        Kind("LA", "gray-alpha.png", _encode(la, "PNG"), "image/png", True),
        Kind("RGBA", "rgba.png", _encode(rgba, "PNG"), "image/png", True),
        Kind("P with transparency", "palette.png", _encode(pal, "PNG", transparency=0), "image/png", True),
        Kind("16-bit PNG", "wide.png", _encode(wide, "PNG"), "image/png", True),
        Kind("CMYK JPEG", "cmyk.jpg", _encode(photo.convert("CMYK"), "JPEG", quality=90), "image/jpeg", True),
        Kind("EXIF-rotated JPEG", "rotated.JPG", _encode(photo, "JPEG", quality=90, exif=exif), "image/jpeg", True),
        Kind("1x1", "dot.png", _encode(Image.new("RGB", (1, 1), (200, 30, 40)), "PNG"), "image/png", True),
        Kind("3000x20", "strip.jpeg", _encode(_photo(3000, 20), "JPEG"), "image/jpeg", True),
        Kind("truncated JPEG", "truncated.jpg", jpeg[: len(jpeg) // 2], "image/jpeg", False, "not a decodable JPEG or PNG image"),
        Kind("text named .jpg", "notes.jpg", b"patient notes, not an image\n", "image/jpeg", False,
             "unrecognised or damaged JPEG/PNG header"),
    ]


def write_tree(root: Path) -> dict[str, Kind]:
    """Every kind under `root/<class>/` (two classes, so it is a class-per-folder tree), by path."""
    out = {}
    for i, k in enumerate(kinds()):
        path = root / ("a" if i % 2 == 0 else "b") / k.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(k.data)
        out[str(path)] = k
    return out
