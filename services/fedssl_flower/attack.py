"""A hospital that misbehaves on purpose: fault injection for tests and benchmarks only.

Node config `attack` (per hospital, `flower-supernode --node-config 'attack="scale:100"'`):
`none` (the default), `scale:<factor>` or `sign-flip`. The hospital trains as usual and then
changes its *update*, its trained shared parameters minus the global model it received,
before it replies: `scale:F` sends `global + F * update`, `sign-flip` sends `global - update`
(scale by -1). BatchNorm running statistics and integer buffers are sent as trained: the
attack is on what the aggregation strategy aggregates (`strategy.is_trained`), the update a
robust strategy (fedmedian, fedtrimmedavg, krum) is meant to withstand. The ClientApp logs a
warning every round it does this; `bench/quality.py --attack` applies the same `misbehave`.

Never set it on a real hospital: it exists to measure what one bad member does to the
federation (docs/benchmarks.md, "Robust aggregation against a misbehaving hospital").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedssl_core import names

from .errors import ConfigError
from .strategy import is_trained

EXPECTED = f"{names.ATTACK_NONE}, {names.ATTACK_SCALE}:<factor> (e.g. {names.ATTACK_SCALE}:100) or {names.ATTACK_SIGN_FLIP}"


@dataclass(frozen=True)
class Attack:
    """What a misbehaving hospital does to its update: multiply it by `factor` (1 = nothing)."""

    kind: str = names.ATTACK_NONE
    factor: float = 1.0

    @property
    def active(self) -> bool:
        return self.kind != names.ATTACK_NONE

    def __str__(self) -> str:
        return f"{self.kind}:{self.factor:g}" if self.kind == names.ATTACK_SCALE else self.kind


def parse_attack(spec: object, where: str = "node config attack") -> Attack:
    """The `Attack` named by `spec` ("none", "scale:<factor>", "sign-flip"); a ConfigError
    naming `where`, the bad value and the expected ones otherwise."""
    text = str(spec).strip() if spec is not None else names.ATTACK_NONE
    kind, sep, arg = text.partition(":")
    if kind == names.ATTACK_SCALE and sep:
        try:
            factor = float(arg)
        except ValueError:
            factor = math.nan
        if not math.isfinite(factor):
            raise ConfigError(f"{where}={text!r}: the factor after '{names.ATTACK_SCALE}:' must be a finite number; "
                              f"expected one of {EXPECTED}")
        return Attack(names.ATTACK_SCALE, factor)
    if not sep and kind in (names.ATTACK_NONE, names.ATTACK_SIGN_FLIP):
        return Attack(kind, 1.0 if kind == names.ATTACK_NONE else -1.0)
    raise ConfigError(f"{where}={text!r}; expected one of {EXPECTED}")


def misbehave(attack: Attack, trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`trained` (a hospital's shared arrays after its round) with its update from `received`
    (the global model it started from) multiplied by `attack.factor`, for every trained float
    parameter; BatchNorm statistics and integer buffers as they are. Same keys, shapes and
    dtypes as `trained`, so the aggregator's checks accept it."""
    if not attack.active:
        return dict(trained)
    out = {}
    for key, value in trained.items():
        value = np.asarray(value)
        if is_trained(key, value):
            start = np.asarray(received[key], dtype=np.float64).reshape(value.shape)
            value = (start + attack.factor * (value.astype(np.float64) - start)).astype(value.dtype)
        out[key] = value
    return out
