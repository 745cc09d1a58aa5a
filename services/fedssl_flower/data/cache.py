"""Per-hospital cache of decoded, resized images, so rounds never re-decode JPEGs.

Two levels: a process-wide dict (the ClientApp process serves every round of a run) and
.npz files (uint8 arrays, loaded with allow_pickle=False) written atomically, keyed by a
hash of what went into them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedssl_core.weights import atomic_write

log = logging.getLogger(__name__)

_MEMORY: dict[str, dict[str, np.ndarray]] = {}


def default_cache_dir() -> Path:
    home = os.environ.get("FEDSSL_HOME")
    return Path(home) / "cache" if home else Path.home() / ".cache" / "fedssl"


def cache_key(spec: Any) -> str:
    """A stable hash of a JSON-able description of the cached content."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load(cache_dir: Path | None, key: str) -> dict[str, np.ndarray] | None:
    if key in _MEMORY:
        return _MEMORY[key]
    if cache_dir is None:
        return None
    path = Path(cache_dir) / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:  # a damaged cache is rebuilt, never trusted
        log.warning("ignoring damaged cache file %s: %s", path, exc)
        return None
    _MEMORY[key] = arrays
    return arrays


def store(cache_dir: Path | None, key: str, arrays: dict[str, np.ndarray]) -> Path | None:
    _MEMORY[key] = arrays
    if cache_dir is None:
        return None
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write(Path(cache_dir) / f"{key}.npz", buf.getvalue())


def clear_memory() -> None:
    _MEMORY.clear()
