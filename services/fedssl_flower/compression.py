"""Encodings of model updates on the wire: none, fp16, or int8 with a per-tensor scale.

int8 is symmetric per tensor: q = round(x / s), s = max|x| / 127, with `s` sent as an extra
float32 array named "<key>::scale". Integer tensors (BatchNorm's num_batches_tracked) are
never quantised.
"""

from __future__ import annotations

import numpy as np

from fedssl_core import names

from .errors import ConfigError

SCALE_SUFFIX = "::scale"


def _check(encoding: str) -> None:
    if encoding not in names.ENCODINGS:
        raise ConfigError(f"unknown update-encoding {encoding!r}; expected one of {', '.join(names.ENCODINGS)}")


def encode_arrays(arrays: dict[str, np.ndarray], encoding: str) -> dict[str, np.ndarray]:
    _check(encoding)
    if encoding == "none":
        return dict(arrays)
    out: dict[str, np.ndarray] = {}
    for key, a in arrays.items():
        if not np.issubdtype(a.dtype, np.floating):
            out[key] = a
        elif encoding == "fp16":
            out[key] = a.astype(np.float16)
        else:
            peak = float(np.abs(a).max()) if a.size else 0.0
            scale = peak / 127.0 if peak > 0 else 1.0
            out[key] = np.clip(np.rint(a / scale), -127, 127).astype(np.int8)
            out[key + SCALE_SUFFIX] = np.asarray([scale], dtype=np.float32)
    return out


def decode_arrays(arrays: dict[str, np.ndarray], encoding: str) -> dict[str, np.ndarray]:
    _check(encoding)
    if encoding == "none":
        return dict(arrays)
    out: dict[str, np.ndarray] = {}
    for key, a in arrays.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        if encoding == "fp16" and a.dtype == np.float16:
            out[key] = a.astype(np.float32)
        elif encoding == "int8" and key + SCALE_SUFFIX in arrays:
            out[key] = a.astype(np.float32) * float(arrays[key + SCALE_SUFFIX][0])
        else:
            out[key] = a
    return out


def nbytes(arrays: dict[str, np.ndarray]) -> int:
    """Payload size of arrays on the wire (their raw buffers)."""
    return int(sum(a.nbytes for a in arrays.values()))
