"""Synthetic images, only when a hospital's node config asks for them (`data-source = synthetic`).

Each class has its own colour and stripe orientation under noise, so a classifier can learn
something and the whole pipeline can be exercised without real data. Never used as a
fallback for a missing dataset.
"""

from __future__ import annotations

import numpy as np

from fedssl_core import names


def make_images(n: int, size: int, class_names: list[str] | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images (n, 3, size, size), int64 labels, class names)."""
    classes = list(class_names or names.HAM10000_CLASSES)
    rng = np.random.default_rng(seed)
    k = len(classes)
    labels = rng.integers(0, k, size=n)
    palette = np.random.default_rng(1234).uniform(40, 215, size=(k, 3))  # same classes look alike at every hospital
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    for i, c in enumerate(labels):
        angle = np.pi * c / k
        stripes = np.sin(2 * np.pi * 4 * (np.cos(angle) * xx + np.sin(angle) * yy))
        base = palette[c][:, None, None] + 30 * stripes[None]
        images[i] = np.clip(base + rng.normal(0, 25, size=(3, size, size)), 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64), classes
