"""dp=local: each hospital clips and noises its own update before it leaves the hospital.

Flower's `LocalDpMod` (flwr.client.mod) cannot wrap fedssl's ClientApp: it reads and writes
the legacy FitIns/FitRes (`recorddict_to_fitins`), while fedssl's messages carry one packed
safetensors Array of the shared groups. This applies the mod's mechanism with Flower's own
functions, on the hospital's trained float parameters: the update (trained minus the global
model received) is clipped to L2 norm dp-clipping-norm (`compute_clip_model_update`), then
Gaussian noise of stdev `sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon` is added to every
value (`add_gaussian_noise_inplace`, the stdev LocalDpMod computes), epsilon =
dp-local-epsilon and delta = dp-delta per round. LocalDpMod leaves the sensitivity to the
user; here it is 2 * dp-clipping-norm, the most two clipped updates of one hospital can
differ by (local DP protects the hospital's whole input, not one record of it). The classic
Gaussian mechanism's calibration holds for epsilon < 1 (Dwork and Roth, Theorem A.1), which
the run config enforces.

BatchNorm running statistics and integer buffers are not a trained parameter and would leave
un-noised: the hospital sends back the global model's values it received, so the release
holds nothing of its data outside the mechanism. The hospital keeps its own un-noised model.

Composition over rounds (`spent`): basic sequential composition, a hospital that released in
T rounds has spent (T * epsilon, T * delta). It is loose (an RDP account of the same Gaussian
releases would be tighter) but it is what LocalDpMod's per-round guarantee composes to
without further assumptions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_clip_model_update

from .config import RunConfig
from .strategy import is_trained

ACCOUNTING = "basic composition"


def sensitivity(cfg: RunConfig) -> float:
    """The L2 sensitivity of one hospital's clipped update: any two lie within 2 * the clipping norm."""
    return 2.0 * cfg.dp_clipping_norm


def noise_stdv(cfg: RunConfig) -> float:
    """The stdev LocalDpMod adds to each value for (dp-local-epsilon, dp-delta) per round."""
    return sensitivity(cfg) * math.sqrt(2 * math.log(1.25 / cfg.dp_delta)) / cfg.dp_local_epsilon


def release(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], cfg: RunConfig) -> dict[str, np.ndarray]:
    """What the hospital sends under dp=local: `trained` (its shared arrays after the round)
    with the update of the trained parameters clipped and noised, and every other array (BatchNorm
    statistics, integer buffers) the global model's from `received`; dtypes and shapes kept."""
    keys = sorted(k for k, v in trained.items() if is_trained(k, np.asarray(v)))
    params = [np.asarray(trained[k], np.float64).copy() for k in keys]
    compute_clip_model_update(params, [np.asarray(received[k], np.float64) for k in keys], cfg.dp_clipping_norm)
    add_gaussian_noise_inplace(params, noise_stdv(cfg))
    out = {k: np.array(received[k], copy=True) for k in trained if k not in keys}
    out |= {k: p.astype(np.asarray(trained[k]).dtype) for k, p in zip(keys, params)}
    return out


def spent(cfg: RunConfig, releases: int) -> tuple[float, float]:
    """(epsilon, delta) of `releases` rounds of one hospital by basic composition."""
    return releases * cfg.dp_local_epsilon, releases * cfg.dp_delta
