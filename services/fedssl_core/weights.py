"""Weights as safetensors: the only format fedssl writes, uploads and loads.

safetensors holds tensors and a flat str→str metadata map; it never executes code, so the
registry can load what it receives without unpickling anything.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from .errors import WeightsError


def to_bytes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise a state dict (contiguous CPU copies) with optional str metadata."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return _st_save(tensors, metadata=dict(metadata) if metadata else None)


def from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; raises `WeightsError` on anything else."""
    try:
        return _st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"not a valid safetensors file: {exc}") from exc


def read_metadata(data: bytes) -> dict[str, str]:
    """The metadata header of safetensors bytes, without loading the tensors."""
    import json
    import struct

    if len(data) < 8:
        raise WeightsError("not a valid safetensors file: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise WeightsError("not a valid safetensors file: header length exceeds the file")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError as exc:
        raise WeightsError(f"not a valid safetensors file: header is not JSON ({exc})") from exc
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` so that readers see either nothing or the whole file.

    temp file in the same directory → fsync → rename → fsync of the directory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def save_file(path: str | os.PathLike[str], state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically save a state dict as a safetensors file."""
    return atomic_write(path, to_bytes(state, metadata))


def load_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no weights file at {path}")
    return from_bytes(path.read_bytes())


def check_fits(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """A `WeightsError` naming the keys unless `state` has exactly `expected`'s keys, each of
    its shape (`expected` may live on the meta device: only shapes are read)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or mismatched:
        def head(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {head(unexpected)}")
        if mismatched:
            parts.append(
                "shape mismatch: "
                + head([f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in mismatched])
            )
        raise WeightsError("weights do not fit the model: " + "; ".join(parts))


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load `state` into `model`, strictly: a missing or unexpected key, or a shape
    mismatch, is a `WeightsError` naming the keys (`check_fits`)."""
    check_fits(model.state_dict(), state)
    model.load_state_dict(dict(state), strict=True)
