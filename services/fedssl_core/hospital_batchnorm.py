"""Each hospital's own BatchNorm statistics in a classifier version: serving a named hospital's
images normalised as its own batches normalised them in training (SiloBN's inference,
Andreux et al. 2020).

A hospital trains on batches of its own images only, so every BatchNorm layer of the encoder
normalises them by that hospital's statistics, and the shared model's running statistics are
a blend of the hospitals' that matches none of them. With `hospital-batchnorm = true` each
hospital recomputes the final model's encoder statistics over its own training images and
sends them (per channel: a mean and a variance per layer, no image); the classifier version
carries them as extra tensors beside its weights:

    hospital_batchnorm.<i>.<layer>.running_mean / .running_var   (i: index into the metadata list)
    metadata fedssl.hospital_batchnorm = JSON list of the hospitals' names

and `:predict?hospital=` / v2 `parameters.hospital` run that hospital's images through the
model with its statistics (`with_statistics`), the label prior of `fedssl_core.label_shift`
on top. A caller who names no hospital gets the shared model as it is.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping

import torch
from torch import nn

from fedssl_core.errors import WeightsError

META_KEY = "fedssl.hospital_batchnorm"
PREFIX = "hospital_batchnorm."
STATISTICS = ("running_mean", "running_var")

Statistics = dict[str, torch.Tensor]  # "<layer>.running_mean" / "<layer>.running_var" -> (C,)


def batchnorm_layers(module: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """`module`'s BatchNorm layers by state-dict prefix."""
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def statistics_of(module: nn.Module) -> Statistics:
    """`module`'s BatchNorm running statistics, keyed as its state dict keys them."""
    return {f"{n}.{s}": getattr(m, s).detach().clone() for n, m in batchnorm_layers(module).items() for s in STATISTICS}


def pack(stats: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata entry that carry every hospital's `stats` in a weights file."""
    hospitals = sorted(stats)
    tensors = {f"{PREFIX}{i}.{key}": t.detach().to(torch.float32).contiguous()
               for i, h in enumerate(hospitals) for key, t in stats[h].items()}
    return tensors, {META_KEY: json.dumps(hospitals)}


def split(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[dict[str, torch.Tensor], dict[str, Statistics]]:
    """(the model's own tensors, {hospital: its statistics}) of a weights file's `state`;
    a WeightsError naming what is wrong when the two parts do not fit each other."""
    own = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    carried = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    raw = (metadata or {}).get(META_KEY)
    if raw is None:
        if carried:
            raise WeightsError(f"{len(carried)} {PREFIX}* tensors but no {META_KEY} metadata naming their hospitals")
        return own, {}
    try:
        hospitals = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{META_KEY} is not JSON ({exc.msg}); expected a list of hospital names") from None
    if not isinstance(hospitals, list) or not hospitals or not all(isinstance(h, str) and h.strip() for h in hospitals):
        raise WeightsError(f"{META_KEY} must be a non-empty JSON list of hospital names, got {raw[:200]!r}")
    if len(set(hospitals)) != len(hospitals):
        raise WeightsError(f"{META_KEY} names a hospital twice: {hospitals}")
    out: dict[str, Statistics] = {h: {} for h in hospitals}
    for key, t in carried.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(hospitals) or not name:
            raise WeightsError(f"tensor {PREFIX}{key} names no hospital of {META_KEY} (expected {PREFIX}<0..{len(hospitals) - 1}>.<layer>.<statistic>)")
        out[hospitals[int(index)]][name] = t
    return own, out


def check(expected_stats: Mapping[str, torch.Tensor], stats: Mapping[str, Statistics]) -> None:
    """A WeightsError naming the hospital and the layer unless every hospital's statistics have
    exactly `expected_stats`' keys (a model's, `statistics_of`), of their shapes, finite, with
    variances >= 0."""
    expected = {k: v.shape for k, v in expected_stats.items()}
    if stats and not expected:
        raise WeightsError("hospitals' BatchNorm statistics for a model without BatchNorm layers")
    for hospital, s in sorted(stats.items()):
        missing, extra = sorted(set(expected) - set(s)), sorted(set(s) - set(expected))
        if missing or extra:
            parts = [f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                     for what, keys in (("missing", missing), ("unexpected", extra)) if keys]
            raise WeightsError(f"hospital {hospital!r}'s BatchNorm statistics do not fit the model: {'; '.join(parts)}")
        for key, t in sorted(s.items()):
            if tuple(t.shape) != tuple(expected[key]):
                raise WeightsError(f"hospital {hospital!r}'s {key} has shape {tuple(t.shape)}, expected {tuple(expected[key])}")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise WeightsError(f"hospital {hospital!r}'s {key} is not finite floating point")
            if key.endswith(".running_var") and bool((t < 0).any()):
                raise WeightsError(f"hospital {hospital!r}'s {key} has negative variances")


def with_statistics(module: nn.Module, stats: Statistics) -> nn.Module:
    """A copy of `module` that shares its parameters (no second copy of the weights) and
    normalises with `stats` (`check`ed), in eval mode. Torch: run it on the torch thread."""
    shared = {id(p): p for p in module.parameters()}
    copied = copy.deepcopy(module, memo=dict(shared))
    with torch.no_grad():
        for key, t in stats.items():
            layer, _, statistic = key.rpartition(".")
            getattr(copied.get_submodule(layer), statistic).copy_(t)
    return copied.eval()
