"""A hospital that misbehaves on purpose: fault injection for tests and benchmarks only.

Node config `attack` (per hospital, `flower-supernode --node-config 'attack="scale:100"'`):
`none` (the default), `scale:<factor>`, `sign-flip` or `drop:<stage>`. With `drop:<stage>` the
hospital leaves a secure-aggregation round (secure-aggregation=true) at that SecAgg+ stage
(setup, share_keys, collect_masked_vectors, unmask): its ClientApp fails that message, a
dropout the protocol must absorb down to its reconstruction threshold. Otherwise the hospital
trains as usual and then
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

EXPECTED = (f"{names.ATTACK_NONE}, {names.ATTACK_SCALE}:<factor> (e.g. {names.ATTACK_SCALE}:100), {names.ATTACK_SIGN_FLIP} "
            f"or {names.ATTACK_DROP}:<stage> (stage: {', '.join(names.SECAGG_STAGES)})")


@dataclass(frozen=True)
class Attack:
    """What a misbehaving hospital does: multiply its update by `factor` (1 = nothing), or
    leave a secure-aggregation round at SecAgg+ stage `stage`."""

    kind: str = names.ATTACK_NONE
    factor: float = 1.0
    stage: str = ""

    @property
    def active(self) -> bool:
        return self.kind != names.ATTACK_NONE

    @property
    def changes_update(self) -> bool:
        return self.kind in (names.ATTACK_SCALE, names.ATTACK_SIGN_FLIP)

    def __str__(self) -> str:
        if self.kind == names.ATTACK_SCALE:
            return f"{self.kind}:{self.factor:g}"
        return f"{self.kind}:{self.stage}" if self.kind == names.ATTACK_DROP else self.kind


def parse_attack(spec: object, where: str = "node config attack") -> Attack:
    """The `Attack` named by `spec` ("none", "scale:<factor>", "sign-flip", "drop:<stage>"); a ConfigError
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
    if kind == names.ATTACK_DROP and sep:
        if arg not in names.SECAGG_STAGES:
            raise ConfigError(f"{where}={text!r}: the stage after '{names.ATTACK_DROP}:' must be one of "
                              f"{', '.join(names.SECAGG_STAGES)}; expected one of {EXPECTED}")
        return Attack(names.ATTACK_DROP, 1.0, arg)
    if not sep and kind in (names.ATTACK_NONE, names.ATTACK_SIGN_FLIP):
        return Attack(kind, 1.0 if kind == names.ATTACK_NONE else -1.0)
    raise ConfigError(f"{where}={text!r}; expected one of {EXPECTED}")


def hospital_name(node_config: Mapping, node_id: int) -> str:
    """The hospital's name from its node config (`hospital`), `node-<id>` without one."""
    return str(node_config.get("hospital", f"node-{node_id}"))


def node_attack(node_config: Mapping, node_id: int) -> Attack:
    """The hospital's node config `attack`, parsed; a bad value names the hospital."""
    return parse_attack(node_config.get("attack", names.ATTACK_NONE),
                        f"hospital {hospital_name(node_config, node_id)}: node config attack")


def misbehave(attack: Attack, trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`trained` (a hospital's shared arrays after its round) with its update from `received`
    (the global model it started from) multiplied by `attack.factor`, for every trained float
    parameter; BatchNorm statistics and integer buffers as they are. Same keys, shapes and
    dtypes as `trained`, so the aggregator's checks accept it."""
    if not attack.changes_update:
        return dict(trained)
    out = {}
    for key, value in trained.items():
        value = np.asarray(value)
        if is_trained(key, value):
            start = np.asarray(received[key], dtype=np.float64).reshape(value.shape)
            value = (start + attack.factor * (value.astype(np.float64) - start)).astype(value.dtype)
        out[key] = value
    return out
