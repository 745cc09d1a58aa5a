"""Aggregation: example-weighted federated averaging of the shared parameter groups only.

Heads that are not shared never reach the server; integer buffers (BatchNorm's
num_batches_tracked) take the maximum instead of a mean.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import TypeVar

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


# BatchNorm statistics, and spectral norm's power-iteration vectors (`weight_u`, `weight_v` of
# the generative run's discriminator): state the forward pass updates, not trained parameters.
STATISTICS_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", ".weight_u", ".weight_v")


def is_trained(key: str, array: np.ndarray) -> bool:
    """A trained float parameter (goes through the strategy), not a BatchNorm statistic, a
    spectral-norm power-iteration vector or an integer buffer (plain average / max)."""
    return np.issubdtype(array.dtype, np.floating) and not key.endswith(STATISTICS_SUFFIXES)


_T = TypeVar("_T")


def relay_order(hospitals: Sequence[_T], seed: int, phase: str, rnd: int) -> list[_T]:
    """The order in which `hospitals` train in `phase` round `rnd` of cyclic weight transfer:
    drawn afresh every round from the run's seed (the same for the same list), so that no
    hospital is always the last, whose data the round's model has seen most recently."""
    order = list(hospitals)
    random.Random(f"{seed}/{phase}/{rnd}").shuffle(order)
    return order


def relay_model(updates: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """Cyclic weight transfer's new global model from a round's `(arrays, examples)` in the
    order the hospitals trained: the trained parameters of the last one (the model the chain
    ends with, every hospital's training in it), the statistics (BatchNorm's running mean and
    variance, power-iteration vectors, integer buffers) as FedAvg takes them over every
    hospital's: each hospital's estimate of its own images' statistics, example-weighted, so
    that the last hospital's alone do not serve everyone."""
    average = weighted_average(updates)
    last = next(arrays for arrays, n in reversed(updates) if n > 0)
    return {k: np.asarray(v) if is_trained(k, np.asarray(v)) else average[k] for k, v in last.items()}


class ServerOptimizer:
    """The aggregator's step from the example-weighted average of the hospitals' models.

    With `lr = 1` and `momentum = 0` the new global model is the average itself (FedAvg).
    Otherwise the average's difference from the current global model is a pseudo-gradient
    that the server applies with its own learning rate and heavy-ball momentum (FedAvgM,
    Hsu et al. 2019; Reddi et al. 2021 "Adaptive Federated Optimization"): `v <- momentum * v +
    delta`, `w <- w + lr * v`. It makes up for what averaging costs: four hospitals doing K
    local steps each move the global model about as far as K steps, not 4K. BatchNorm
    statistics are not trained parameters: they always take the plain average. The velocity
    belongs to one phase (its parameter groups); it starts from zero at each phase.
    """

    def __init__(self, lr: float = 1.0, momentum: float = 0.0) -> None:
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"server lr must be > 0 and momentum in [0, 1), got lr={lr}, momentum={momentum}")
        self.lr, self.momentum = lr, momentum
        self.velocity: dict[str, np.ndarray] = {}
        self.phase: str | None = None

    @property
    def plain(self) -> bool:
        return self.lr == 1.0 and self.momentum == 0.0

    def step(self, current: Mapping[str, np.ndarray], average: Mapping[str, np.ndarray], phase: str = "") -> dict[str, np.ndarray]:
        """The new values of the keys of `average`, given their `current` global values."""
        if phase != self.phase:
            self.velocity, self.phase = {}, phase
        if self.plain:
            return dict(average)
        out: dict[str, np.ndarray] = {}
        for key, avg in average.items():
            if key.endswith(STATISTICS_SUFFIXES) or not np.issubdtype(avg.dtype, np.floating):
                out[key] = avg
                continue
            cur = np.asarray(current[key], dtype=np.float64).reshape(avg.shape)
            delta = avg.astype(np.float64) - cur
            v = self.velocity.get(key)
            v = delta if v is None else self.momentum * v + delta
            self.velocity[key] = v
            out[key] = (cur + self.lr * v).astype(avg.dtype)
        return out
