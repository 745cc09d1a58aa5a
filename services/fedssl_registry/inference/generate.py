"""`POST /v1/models/{name}:generate`: which class a request means, and the images as PNG files.

The images themselves come from `LoadedModel.generate` on the torch thread; this module is
numpy and Pillow only, so the PNG encoding runs on the decode pool (`decode.DecodePool`),
off the event loop, like the decoding of an upload.
"""

from __future__ import annotations

import base64
import io
import re
import zipfile

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from ..core.errors import InvalidInput, PayloadTooLarge

FORMAT_JSON, FORMAT_ZIP = "json", "zip"
ZIP_TYPE = "application/zip"
# A zip entry's timestamp, fixed so that the same request gives the same bytes (zip's epoch).
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class GeneratedImage(BaseModel):
    index: int = Field(description="position in the request: image i of `count`")
    png_base64: str = Field(description="an RGB PNG of the model's image_size, base64")


class GeneratedImages(BaseModel):
    """The JSON answer of `:generate` (format json)."""

    model_name: str
    model_version: int
    class_: str = Field(alias="class", description="the class name")
    class_index: int = Field(description="its index in the model's input_spec.class_names")
    seed: int
    images: list[GeneratedImage]


def check_count(count: int, limit: int) -> None:
    """Refuse more images than a request may draw (FEDSSL_REGISTRY_MAX_GENERATE_COUNT), naming the limit."""
    if count > limit:
        raise PayloadTooLarge(f"count {count} is more than the {limit} images one request may draw "
                              "(FEDSSL_REGISTRY_MAX_GENERATE_COUNT): ask in several requests, with different seeds")


def class_index(value: str | int, class_names: list[str], model: str) -> int:
    """The index of class `value` (a name of `class_names`, or an index into it); an unknown
    one is an InvalidInput listing the classes the model draws."""
    known = ", ".join(f"{i}: {c!r}" for i, c in enumerate(class_names))
    if isinstance(value, int):
        if not 0 <= value < len(class_names):
            raise InvalidInput(f"class index {value} is out of range: model {model!r} draws {len(class_names)} classes "
                               f"({known})")
        return value
    if value not in class_names:
        raise InvalidInput(f"unknown class {value!r}: model {model!r} draws {known} (send a name or its index)")
    return class_names.index(value)


def png(image: np.ndarray) -> bytes:
    """uint8 (S, S, 3) RGB → PNG bytes; the same pixels always give the same bytes."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, "PNG")
    return buf.getvalue()


def file_stem(text: str, fallback: str) -> str:
    """`text` as a file-name part that no unzip tool reads as a path (class names are free text)."""
    return _UNSAFE.sub("_", text).strip("._") or fallback


def json_body(images: np.ndarray, model: str, version: int, class_name: str, index: int, seed: int) -> dict:
    """The `GeneratedImages` answer of uint8 (N, S, S, 3) `images`."""
    return {"model_name": model, "model_version": version, "class": class_name, "class_index": index, "seed": seed,
            "images": [{"index": i, "png_base64": base64.b64encode(png(im)).decode("ascii")} for i, im in enumerate(images)]}


def zip_body(images: np.ndarray, class_name: str, index: int, seed: int) -> bytes:
    """A zip of one PNG per image, `<class>-<seed>-<i>.png`, stored (PNG is compressed already)."""
    stem = file_stem(class_name, f"class{index}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i, im in enumerate(images):
            zf.writestr(zipfile.ZipInfo(f"{stem}-{seed}-{i}.png", date_time=ZIP_TIME), png(im))
    return buf.getvalue()
