"""A hospital's own label mix at serving time: the prior correction for label shift
(Saerens, Latinne & Decaestecker 2002).

Fine-tuning with balanced softmax and each hospital's own label prior trains a classifier whose
softmax is a hospital's posterior divided by that hospital's prior: what its images look like
for each class, with the hospital's case mix left out. Pooled training's model reads a site's
mix from the look of its images; a federated one cannot, since every hospital's batches are
normalised by their own statistics (docs/benchmarks.md, section 1). A caller that says which
hospital it is gets the mix back: the probabilities times that hospital's training label prior
over the federation's, renormalised, which is the balanced decision for that hospital's
patients. The registry serves it when a request names a `hospital` (`:predict?hospital=`, v2
`parameters.hospital`); a classifier version carries its hospitals' training label counts in
its weights' metadata (`META_KEY`), which the aggregator knows from each hospital's start-up
audit (counts only, never images). A caller from outside the federation names none.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

from .errors import FedSSLError

META_KEY = "fedssl.label_counts"  # JSON {hospital: [training images per class, in class order]}


class LabelCountsError(FedSSLError, ValueError):
    """Label counts that cannot give a prior (wrong shape, negative or no images)."""


def encode(counts: Mapping[str, Sequence[int]]) -> str:
    """`META_KEY`'s value for `counts` (hospital -> per-class training images)."""
    return json.dumps({h: [int(c) for c in v] for h, v in sorted(counts.items())}, separators=(",", ":"))


def decode(text: str, num_classes: int) -> dict[str, np.ndarray]:
    """Each hospital's prior ratio from `META_KEY`'s value: its label prior over the
    federation's, per class (`ratios`). Raises LabelCountsError naming what is wrong."""
    try:
        counts = json.loads(text)
    except ValueError as exc:
        raise LabelCountsError(f"{META_KEY} is not JSON: {exc}") from None
    if not isinstance(counts, dict) or not counts:
        raise LabelCountsError(f"{META_KEY} must map each hospital to its training images per class, got {text[:80]!r}")
    return ratios(counts, num_classes)


def ratios(counts: Mapping[str, Sequence[int]], num_classes: int) -> dict[str, np.ndarray]:
    """hospital -> (K,) float64 its label prior over the federation's (every hospital's counts
    summed). A class a hospital has no image of counts as half an image, as the balanced
    softmax it was trained with does, so no probability is set to zero."""
    arrays = {}
    for hospital, row in counts.items():
        try:
            arr = np.asarray(row, dtype=np.float64)
        except (TypeError, ValueError):
            arr = np.empty(0)
        if arr.shape != (num_classes,) or not np.isfinite(arr).all() or (arr < 0).any() or arr.sum() <= 0:
            raise LabelCountsError(f"hospital {hospital!r}: expected {num_classes} non-negative training image counts "
                                   f"with at least one image, got {str(row)[:80]}")
        arrays[hospital] = arr
    federation = sum(arrays.values())
    return {h: ratio(a, federation) for h, a in arrays.items()}


def ratio(own: Sequence[float], federation: Sequence[float]) -> np.ndarray:
    """(K,) float64 a hospital's label prior over the federation's, from its training images
    per class (`own`) and the federation's (every hospital's summed, `own` included). A class
    with no image counts as half an image, as the balanced softmax does. A hospital computes
    its own with this at the final evaluation, to score the model as `:predict?hospital=`
    serves it; the registry's `ratios` is the same function."""
    own, federation = np.asarray(own, dtype=np.float64), np.asarray(federation, dtype=np.float64)
    if own.shape != federation.shape or own.ndim != 1:
        raise LabelCountsError(f"a hospital's and the federation's label counts must be two equal-length lists, "
                               f"got shapes {own.shape} and {federation.shape}")
    if (own < 0).any() or (federation < own).any() or not np.isfinite(federation).all() or own.sum() <= 0:
        raise LabelCountsError(f"the federation's label counts {federation.tolist()} must be finite and at least "
                               f"the hospital's own {own.tolist()}, which must count at least one image")
    federation = np.maximum(federation, 0.5) / np.maximum(federation, 0.5).sum()
    return (np.maximum(own, 0.5) / np.maximum(own, 0.5).sum()) / federation


def adjust(probabilities: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """(N, K) probabilities times a hospital's prior ratio (K,), each row renormalised."""
    out = np.asarray(probabilities, dtype=np.float64) * ratio
    return (out / out.sum(axis=1, keepdims=True)).astype(np.float32)
