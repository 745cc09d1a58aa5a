"""Aggregation: example-weighted federated averaging of the shared parameter groups only.

Heads that are not shared never reach the server; integer buffers (BatchNorm's
num_batches_tracked) take the maximum instead of a mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import FedSSLError


class AggregationError(FedSSLError, RuntimeError):
    """Replies cannot be aggregated (no examples, or different parameter sets)."""


def weighted_average(updates: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """FedAvg over `(arrays, examples)` pairs (McMahan et al. 2017)."""
    updates = [(u, n) for u, n in updates if n > 0]
    if not updates:
        raise AggregationError("no hospital reported any training examples; nothing to aggregate")
    keys = set(updates[0][0])
    for arrays, _ in updates[1:]:
        if set(arrays) != keys:
            diff = sorted(keys.symmetric_difference(arrays))
            raise AggregationError(f"hospitals returned different parameter sets (e.g. {', '.join(diff[:3])})")
    total = float(sum(n for _, n in updates))
    out: dict[str, np.ndarray] = {}
    for key in sorted(keys):
        first = updates[0][0][key]
        if np.issubdtype(first.dtype, np.integer):
            out[key] = np.max([u[key] for u, _ in updates], axis=0).astype(first.dtype)
        else:
            acc = np.zeros(first.shape, dtype=np.float64)
            for arrays, n in updates:
                acc += arrays[key].astype(np.float64) * (n / total)
            out[key] = acc.astype(np.float32)
    return out
