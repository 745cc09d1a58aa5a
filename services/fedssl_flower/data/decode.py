"""Decode image files to a uint8 (N, 3, S, S) array, in parallel, skipping bad files.

Each file goes through `fedssl_core.preprocessing.load_image`, the function the registry's
`:predict` uses too, so a hospital trains and evaluates on exactly the pixels serving sees.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fedssl_core.preprocessing import load_image

log = logging.getLogger(__name__)


def decode_one(source: Path | str | bytes, size: int) -> np.ndarray:
    """One image (file path or bytes) → uint8 (3, size, size), see `load_image`. Raises
    OSError (missing/unreadable file) or ImageDecodeError (a ValueError) on a bad file."""
    return load_image(source, size)


def decode_all(paths: Sequence[Path], size: int, workers: int = 4) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode `paths`; returns (images of the readable ones, their positions in `paths`,
    the unreadable files with the reason). Pillow releases the GIL, so threads scale."""
    def job(i: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return i, decode_one(paths[i], size), None
        except (OSError, ValueError, SyntaxError) as exc:  # truncated/corrupt/not an image
            return i, None, f"{paths[i]}: {exc}"

    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    skipped: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, arr, err in pool.map(job, range(len(paths))):
            if arr is None:
                skipped.append(err or str(paths[i]))
                log.warning("skipping unreadable image %s", err)
            else:
                out[i] = arr
                ok[i] = True
    kept = np.flatnonzero(ok)
    return out[kept], kept, skipped
