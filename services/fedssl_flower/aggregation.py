"""Aggregation by Flower's own strategy classes, behind fedssl's aggregator.

The aggregator keeps the messaging (`messaging`: it sends, retries, pairs replies with the
nodes they answer for) and unpacks each reply's weights (one packed safetensors Array per
message). This module then does what Flower's strategy loop does with those replies, with
Flower's strategy objects: before the round `configure_train` sees the current global model
(FedAdam, FedYogi, FedAdagrad and FedAvgM step from it; FedProx adds `proximal-mu` to the
train config), and after it `aggregate_train` gets each accepted hospital's trained float
parameters as a Flower reply `Message` ({"arrays": ArrayRecord, "metrics": MetricRecord
{"num-examples": n}}) and returns the new values.

What never goes through the strategy: BatchNorm statistics (running_mean, running_var) take
the plain example-weighted average and integer buffers the max (`strategy.weighted_average`),
as they are not trained parameters. strategy=fedavg (the default) is computed by
`strategy.weighted_average` itself, with server-lr and server-momentum as its
`strategy.ServerOptimizer` step: a test checks it is Flower's FedAvg bit for bit, and it skips
Flower's per-Array serialisation, which costs 2.5 s a round for ResNet-18 and four hospitals
(0.3 s for EfficientNet-Lite0) in a path every round takes. Other strategies' arrays are
handed to Flower as float64 (the precision `weighted_average` averages in) and the result is
cast back to the global model's dtype. A hospital that trained on no examples is left out, as
`weighted_average` leaves it out: a robust strategy must not count its unchanged model as a vote.

Differential privacy (run config dp=central-fixed): the trained float parameters go through
Flower's `DifferentialPrivacyServerSideFixedClipping` around FedAvg, with Flower's RDP
accountant (`RdpAccountant`, no-amplification sampling: every hospital trains every round;
population = the federation's hospitals). The wrapper clips each hospital's update (its
trained parameters minus the global model's) to L2 norm dp-clipping-norm, FedAvg averages the
clipped models and Gaussian noise of stdev noise_multiplier * clipping_norm / hospitals is
added to the average; the accountant composes one Gaussian release per round. Client-level DP
needs every hospital to weigh the same (the sensitivity of a weighted mean is not the clipping
norm over the count), so each reply carries num-examples 1, which Flower checks. BatchNorm
statistics and integer buffers would leak outside the mechanism if averaged (running means
and variances of the hospitals' images, unclipped, un-noised), so under DP they are not
aggregated: the global model keeps its own (ImageNet's with pretrained=true, the initial 0/1
otherwise). The wrapper is built per round, for the hospitals that train in it, around one
accountant for the whole run (both phases); when the wrapper's next release would pass
dp-max-epsilon, Flower's `configure_train` raises `PrivacyBudgetExhausted` before the round.

dp=central-adaptive is the same with Flower's `DifferentialPrivacyServerSideAdaptiveClipping`
(Andrew et al., arXiv:1905.03871): the clipping norm starts at dp-clipping-norm (again at each
phase: the phases share different parameter groups) and after each round moves geometrically
(rate dp-clip-norm-lr) towards the dp-target-quantile of the hospitals' update norms, from a
noised count of the updates it clipped (stdev dp-clipped-count-stddev). dp-noise-multiplier is
the effective noise multiplier of the round's two releases (the noised average and the noised
count), as Flower's `compute_adaptive_noise_params` takes it: the average gets the larger
(z^-2 - (2 sigma_count)^-2)^-1/2, and the accountant composes one Gaussian release of z per
round, the same as central-fixed's. Flower's adaptive wrapper has no accountant, so the budget
check and the composition are done here with the same accountant calls its fixed-clipping
wrapper makes. `AdaptiveClipping` corrects two things in Flower 1.41's class (see its
docstring): the norm's update direction, and the norm the noise is scaled to.

dp=local (`local_dp`): the hospitals clipped and noised their own updates before sending, so
the aggregation is the strategy's own (any strategy: it is post-processing) and this module
only keeps the account, rounds released composed by basic composition, and refuses the round
that would pass dp-max-epsilon with the same `PrivacyBudgetExhausted`.

strategy=cyclic (cyclic weight transfer, Chang et al. 2018) is not aggregation: the aggregator
sends the model to one hospital at a time and the next starts from the model the one before it
returned (`server_app.Aggregator._relay`); `aggregate` then gets the accepted replies in the
order they trained and returns the last one's trained parameters with every hospital's
statistics averaged (`strategy.relay_model`).

Before any of that, `check_update` refuses a reply whose update is not the global model's
shared groups for the phase (missing or extra tensors, wrong shapes or dtypes, NaN or Inf).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod

from fedssl_core.names import (DP_CENTRAL, DP_CENTRAL_ADAPTIVE, DP_LOCAL, STRATEGIES, STRATEGY_FEDADAGRAD,
                               STRATEGY_FEDADAM, STRATEGY_CYCLIC, STRATEGY_FEDAVG, STRATEGY_FEDAVGM, STRATEGY_FEDMEDIAN, STRATEGY_FEDPROX, STRATEGY_FEDTRIMMEDAVG,
                               STRATEGY_FEDYOGI, STRATEGY_KRUM, STRATEGY_MEDIAN_COSINE, STRATEGY_MULTIKRUM)

from . import local_dp
from .strategy import AggregationError, ServerOptimizer, is_trained, relay_model, weighted_average

if TYPE_CHECKING:
    from .config import RunConfig

# Flower's strategy class for each run-config `strategy`.
_CLASSES = {STRATEGY_FEDAVG: flwr_strategy.FedAvg, STRATEGY_FEDAVGM: flwr_strategy.FedAvgM,
            STRATEGY_FEDADAM: flwr_strategy.FedAdam, STRATEGY_FEDYOGI: flwr_strategy.FedYogi,
            STRATEGY_FEDADAGRAD: flwr_strategy.FedAdagrad, STRATEGY_FEDPROX: flwr_strategy.FedProx,
            STRATEGY_FEDMEDIAN: flwr_strategy.FedMedian, STRATEGY_FEDTRIMMEDAVG: flwr_strategy.FedTrimmedAvg,
            STRATEGY_KRUM: flwr_strategy.Krum, STRATEGY_MULTIKRUM: flwr_strategy.MultiKrum}
# Run-config key -> the Flower strategy's parameter, per strategy.
PARAMETERS: dict[str, dict[str, str]] = {
    STRATEGY_FEDAVG: {},
    STRATEGY_FEDAVGM: {"server-lr": "server_learning_rate", "server-momentum": "server_momentum"},
    STRATEGY_FEDADAM: {"server-eta": "eta", "server-beta-1": "beta_1", "server-beta-2": "beta_2", "server-tau": "tau"},
    STRATEGY_FEDYOGI: {"server-eta": "eta", "server-beta-1": "beta_1", "server-beta-2": "beta_2", "server-tau": "tau"},
    STRATEGY_FEDADAGRAD: {"server-eta": "eta", "server-tau": "tau"},
    STRATEGY_FEDPROX: {"proximal-mu": "proximal_mu"},
    STRATEGY_FEDMEDIAN: {},
    STRATEGY_FEDTRIMMEDAVG: {"trim-beta": "beta"},
    STRATEGY_KRUM: {"num-malicious-nodes": "num_malicious_nodes"},
    STRATEGY_MULTIKRUM: {"num-malicious-nodes": "num_malicious_nodes", "num-nodes-to-select": "num_nodes_to_select"},
    STRATEGY_MEDIAN_COSINE: {"min-cosine": "min_cosine", "num-malicious-nodes": "num_malicious_nodes"},
    STRATEGY_CYCLIC: {},
}
# The strategies computed by a Flower strategy object (cyclic weight transfer averages nothing).
FLOWER_STRATEGIES = tuple(s for s in STRATEGIES if s != STRATEGY_CYCLIC)

# Flower's default record keys: its strategies read the arrays, weights and config under these.
ARRAYS, METRICS, CONFIG, EXAMPLES = "arrays", "metrics", "config", "num-examples"
SERVER_ROUND = "server-round"  # what every Flower strategy adds to the train config itself


def build_strategy(cfg: "RunConfig") -> flwr_strategy.FedAvg:
    """The Flower strategy object named by `cfg.strategy`, with its run-config parameters.

    Node sampling is the aggregator's (every connected hospital trains), so the strategy
    samples everything it is shown: fraction 1, at least one node. Its evaluation settings
    are unused (the hospitals score the global model in the train exchange) and left at
    values Flower does not warn about."""
    if cfg.strategy not in _CLASSES:
        raise AggregationError(f"strategy={cfg.strategy!r} is not a Flower strategy; expected one of {', '.join(FLOWER_STRATEGIES)}")
    config = cfg.as_dict()
    params = {flower: config[key] for key, flower in PARAMETERS[cfg.strategy].items()}
    return _CLASSES[cfg.strategy](fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                                  min_available_nodes=1, **params)


__all__ = ["PrivacyBudgetExhausted"]  # what the aggregator catches, re-exported from Flower


def new_accountant(cfg: "RunConfig", population: int):
    """Flower's RDP accountant for a run: client-level, add-or-remove-one neighbours, no
    sampling amplification (every hospital trains every round), reported at dp-delta, capped
    at dp-max-epsilon (0 = no cap)."""
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant  # needs flwr[dp] (dp-accounting)

    return RdpAccountant(PrivacyConfig(target_delta=cfg.dp_delta, population_size=population,
                                       neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       sampling_method=SamplingMethod.NO_AMPLIFICATION,
                                       max_epsilon=cfg.dp_max_epsilon or None))


def privacy_event(cfg: "RunConfig", sample_size: int, population: int) -> GaussianPrivacyEvent:
    """One round's Gaussian release, as Flower's fixed-clipping wrapper composes it."""
    return GaussianPrivacyEvent(noise_multiplier=cfg.dp_noise_multiplier, sample_size=sample_size, population_size=population)


class MedianCosine(flwr_strategy.FedAvg):
    """strategy=median-cosine: FedAvg over the hospitals whose update points the way the others'
    coordinate-wise median update points, each update's norm clipped to the median norm.

    A robust strategy for what the median and Krum do not stop with a few hospitals: a hospital
    that negates (or turns) its update at an honest-looking size. Each round, from the replies'
    updates (trained parameters minus the global ones `configure_train` saw): each update is
    compared with the coordinate-wise median of the *other* updates (leave-one-out: with few
    hospitals, an update's own vote would otherwise pull the median towards it, and every update
    would look like the median, a flipped one included); a reply whose cosine similarity with it
    is <= `min_cosine` is left out; the others' updates are scaled down to at most the median of
    the update norms (so a scaled update weighs no more than an honest one), and FedAvg
    (Flower's) averages them by examples. With `num_malicious_nodes` f > 0 the f updates of
    lowest cosine are left out as well, whatever their value: measured on HAM10000's four
    sites, honest updates are nearly orthogonal (cosines with the others' median within
    +-0.06) and a flipped one is usually the lowest (-0.03 to -0.09), but honest ones fall below
    0 too, so a threshold alone cannot separate them; the ranking mostly does. After FLTrust (Cao et al., NDSS 2021: cosine to a
    reference, magnitudes normalised to it), with the others' median in place of a server-held
    dataset. `last` keeps the round's cosines and who was left out."""

    def __init__(self, *, min_cosine: float = -1.0, num_malicious_nodes: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.min_cosine = float(min_cosine)
        self.num_malicious_nodes = int(num_malicious_nodes)
        self.current_arrays: ArrayRecord | None = None
        self.last: dict = {}

    def configure_train(self, server_round, arrays, config, grid):
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        if self.current_arrays is None:
            raise AggregationError("median-cosine: aggregate_train before configure_train (it needs the round's global model)")
        keys = list(self.current_arrays.keys())
        current = {k: self.current_arrays[k].numpy().astype(np.float64) for k in keys}
        per_key = [{k: r.content[ARRAYS][k].numpy().astype(np.float64) - current[k] for k in keys} for r in replies]
        deltas = [np.concatenate([u[k].ravel() for k in keys]) for u in per_key]
        if len(deltas) < 2:
            raise AggregationError("median-cosine needs two or more updates: one has no others to be compared with")
        stacked = np.stack(deltas)
        norms = [float(np.linalg.norm(d)) for d in deltas]
        bound = float(np.median(norms))
        cosines = []
        for i, (d, n) in enumerate(zip(deltas, norms, strict=True)):
            others = np.median(np.delete(stacked, i, axis=0), axis=0)
            ref = float(np.linalg.norm(others))
            cosines.append(float(d @ others / (n * ref)) if n > 0 and ref > 0 else 0.0)
        del stacked
        # Left out: the num-malicious-nodes lowest cosines, and any at or below min-cosine.
        lowest = set(sorted(range(len(cosines)), key=lambda i: cosines[i])[:self.num_malicious_nodes])
        kept = [i for i, c in enumerate(cosines) if c > self.min_cosine and i not in lowest]
        self.last = {"cosines": cosines, "left_out": [i for i in range(len(replies)) if i not in kept], "norm_bound": bound}
        if not kept:
            raise AggregationError(f"median-cosine left out all {len(cosines)} updates (the {len(lowest)} of lowest cosine, "
                                   f"num-malicious-nodes, and those with cosine <= min-cosine={self.min_cosine:g} with the "
                                   f"others' median update; cosines {', '.join(f'{c:.3f}' for c in cosines)})")
        out = []
        for i in kept:
            scale = min(1.0, bound / norms[i]) if norms[i] > 0 else 1.0
            arrays = ArrayRecord({k: Array(current[k] + scale * per_key[i][k]) for k in keys})
            out.append(Message(RecordDict({ARRAYS: arrays, METRICS: replies[i].content[METRICS]}), reply_to=_sent(replies[i])))
        return super().aggregate_train(server_round, out)


_CLASSES[STRATEGY_MEDIAN_COSINE] = MedianCosine  # fedssl's own: no Flower strategy stops a flipped update


def _sent(reply: Message) -> Message:
    """A stand-in for the message `reply` answers (what a new reply Message must point to)."""
    return Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type=reply.metadata.message_type,
                   group_id=reply.metadata.group_id)


class AdaptiveClipping(flwr_strategy.DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, with its norm update and its noise as Andrew et
    al. define them. Flower 1.41's class counts the updates it *clipped* and multiplies the norm
    by exp(-lr * (clipped_fraction - target)), so the norm shrinks when most updates are clipped
    and grows when few are: away from the target quantile, down to zero once every update is
    above it. Andrew et al.'s rule is on the fraction left *unclipped*: fed 1 - the (noised)
    clipped fraction, Flower's update becomes theirs, and `target_clipped_quantile` is their
    gamma, the quantile of the update norms the clipping norm converges to. Flower also scales
    the round's noise to the norm it has just adapted, not to the norm the updates were clipped
    to (their sensitivity): the noise here uses the norm of the clipping. The clipping, the
    noised count, the average and the noise are Flower's own code."""

    clipped_with: float = 0.0  # the norm this round's updates were clipped to

    def aggregate_train(self, server_round: int, replies):
        self.clipped_with = self.clipping_norm
        return super().aggregate_train(server_round, replies)

    def _geometric_update(self, clipped_fraction: float) -> None:
        super()._geometric_update(1.0 - clipped_fraction)

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        adapted, self.clipping_norm = self.clipping_norm, self.clipped_with
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)
        finally:
            self.clipping_norm = adapted


def parameters(cfg: "RunConfig") -> dict:
    """The run-config keys (with their values) that act with `cfg.strategy`; for fedavg, its
    server step (server-lr, server-momentum), as before strategies were a choice."""
    config = cfg.as_dict()
    keys = list(PARAMETERS[cfg.strategy]) or (["server-lr", "server-momentum"] if cfg.strategy == STRATEGY_FEDAVG else [])
    return {k: config[k] for k in keys}


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of the update `arrays - reference` over the trained float parameters (what
    the strategy aggregates; BatchNorm statistics and integer buffers left out): how far a
    hospital's reply, or a round's new global model, moved from the global model."""
    total = 0.0
    for key, value in arrays.items():
        value = np.asarray(value)
        if is_trained(key, value):
            delta = value.astype(np.float64) - np.asarray(reference[key], dtype=np.float64).reshape(value.shape)
            total += float(np.dot(delta.ravel(), delta.ravel()))
    return float(np.sqrt(total))


def check_update(arrays: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> str | None:
    """Why a hospital's update cannot be aggregated, or None when it can: its tensors must be
    exactly `expected`'s (the global model's shared groups for the phase), with the same shapes
    and dtypes (after the update encoding is decoded), and every float value finite."""
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing:
        return f"missing {len(missing)} tensor(s) of the shared model: {', '.join(missing[:3])}{'…' if len(missing) > 3 else ''}"
    if extra:
        return f"{len(extra)} tensor(s) the shared model does not have: {', '.join(extra[:3])}{'…' if len(extra) > 3 else ''}"
    for key in sorted(expected):
        value, ref = np.asarray(arrays[key]), expected[key]
        # A scalar (BatchNorm's counter) may travel as one element.
        if value.shape != ref.shape and not (ref.shape == () and value.shape == (1,)):
            return f"tensor {key} has shape {tuple(value.shape)}; the global model's has {tuple(ref.shape)}"
        if value.dtype != ref.dtype:
            return f"tensor {key} has dtype {value.dtype}; the global model's is {ref.dtype}"
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return f"tensor {key} holds NaN or infinite values"
    return None


def _budget_exhausted(epsilon: float, delta: float) -> PrivacyBudgetExhausted:
    """The refusal of a release past dp-max-epsilon, in the words of Flower's fixed-clipping
    wrapper, for the releases Flower's wrappers do not account (central-adaptive, local)."""
    return PrivacyBudgetExhausted(f"The next private release would exceed max_epsilon (current epsilon: {epsilon}, delta: {delta}).")


class _Hospitals:
    """What a Flower strategy's `configure_train` asks of its Grid: the nodes it may sample.
    The aggregator does the sending itself; the strategy only sees who trains this round."""

    def __init__(self, node_ids: Sequence[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def _array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """`arrays` as float64 Arrays in sorted key order: FedAvgM pairs the current and the
    aggregated arrays by position, so every record the strategy sees has the same order."""
    return ArrayRecord({k: Array(np.asarray(arrays[k], dtype=np.float64)) for k in sorted(arrays)})


def _counted(updates: Sequence[tuple[int, Mapping[str, np.ndarray], int]]) -> tuple[list, list[str]]:
    """The updates that trained on examples (a hospital with none is left out, as
    `weighted_average` leaves it out) and the sorted keys of their trained parameters; an
    AggregationError when none trained or their parameter sets differ."""
    counted = [(node, arrays, n) for node, arrays, n in updates if n > 0]
    if not counted:
        raise AggregationError("no hospital reported any training examples; nothing to aggregate")
    for _, arrays, _ in counted[1:]:
        if set(arrays) != set(counted[0][1]):
            diff = sorted(set(counted[0][1]).symmetric_difference(arrays))
            raise AggregationError(f"hospitals returned different parameter sets (e.g. {', '.join(diff[:3])})")
    return counted, sorted(k for k, v in counted[0][1].items() if is_trained(k, v))


def _as_float32(new: ArrayRecord, keys: list[str], shapes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The strategy's result for `keys` in float32, as `weighted_average` makes it, in the
    shapes of `shapes`' arrays; `+ 0.0` turns a -0.0 into 0.0, as its sum from zeros does."""
    return {k: (new[k].numpy().astype(np.float64) + 0.0).astype(np.float32).reshape(shapes[k].shape) for k in keys}


class Aggregation:
    """A run's aggregation: one Flower strategy object per phase.

    A strategy's state (FedAvgM's momentum, FedAdam's moments, its current arrays) belongs to
    the parameter groups of one phase, so a new phase gets a new strategy, as
    `ServerOptimizer`'s velocity restarts. None of it is checkpointed: a resumed run starts
    it afresh. Per round: `configure` before sending (returns what the strategy adds to the
    train config, e.g. FedProx's `proximal-mu`), `aggregate` on the accepted replies.
    strategy=cyclic has no strategy object: the aggregator relays the model from hospital to
    hospital (`server_app`), and `aggregate` takes the last one's (`strategy.relay_model`)."""

    def __init__(self, cfg: "RunConfig") -> None:
        self.cfg = cfg
        self.phase: str | None = None
        self.relay = cfg.strategy == STRATEGY_CYCLIC  # cyclic weight transfer: no Flower strategy, nothing averaged
        self.strategy: flwr_strategy.FedAvg | None = None if self.relay else build_strategy(cfg)
        # strategy=fedavg keeps fedssl's server step (server-lr, server-momentum) on the average.
        self.server_optimizer = ServerOptimizer(cfg.server_lr, cfg.server_momentum)
        self.sent: dict[int, Message] = {}  # node -> the strategy's train message of this round
        self.facts: dict = {}  # what the strategy decided about the round's updates, by node (median-cosine's cosines)
        # central dp: one accountant for the run (created at the first round, for `population`
        # hospitals), a clipping wrapper per round; `privacy` is the last round's spend.
        self.dp = cfg.dp in DP_CENTRAL
        # dp=local: the hospitals noised their updates (local_dp); the aggregation is the
        # strategy's own, and this keeps the account: rounds released so far, the budget.
        self.local_dp = cfg.dp == DP_LOCAL
        self.local_releases = 0
        self.population: int | None = None
        self.accountant = None
        self.sent_nodes: list[int] = []
        self.privacy: dict | None = None
        # dp=central-adaptive: the phase's clipping norm (adapted after each round) and the
        # round's Gaussian release, checked against the budget at configure, composed at aggregate.
        self.adaptive = cfg.dp == DP_CENTRAL_ADAPTIVE
        self.clipping_norm = cfg.dp_clipping_norm
        self.pending_event: GaussianPrivacyEvent | None = None

    def _start_phase(self, phase: str) -> None:
        if phase != self.phase:
            self.phase, self.strategy = phase, None if self.relay else build_strategy(self.cfg)
            self.clipping_norm = self.cfg.dp_clipping_norm

    def configure(self, phase: str, rnd: int, current: Mapping[str, np.ndarray], node_ids: Sequence[int]) -> dict:
        """Show the strategy round `rnd`'s global model (`current`: the phase's shared arrays)
        and the hospitals that train; returns the entries the strategy put in the train config
        beyond the round number (FedProx: `proximal-mu`), for the aggregator's messages."""
        self._start_phase(phase)
        if self.dp:
            return self._configure_private(rnd, current, node_ids)
        if self.local_dp:
            self._check_local_budget()
        if self.cfg.strategy in (STRATEGY_FEDAVG, STRATEGY_CYCLIC):
            return {}  # FedAvg adds nothing to the train config (its average is weighted_average's), nor does cyclic
        msgs = self._configure_strategy(rnd, current, node_ids)
        if not msgs:
            return {}
        config = msgs[0].content[CONFIG]
        return {k: v for k, v in config.items() if k != SERVER_ROUND}

    def _configure_strategy(self, rnd: int, current: Mapping[str, np.ndarray], node_ids: Sequence[int]) -> list[Message]:
        """`self.strategy.configure_train` on the trained parameters of `current` for `node_ids`;
        its messages, kept by node for the replies of `aggregate`."""
        trained = {k: v for k, v in current.items() if is_trained(k, v)}
        msgs = list(self.strategy.configure_train(rnd, _array_record(trained), ConfigRecord(), _Hospitals(node_ids)))
        self.sent = {m.metadata.dst_node_id: m for m in msgs}
        return msgs

    def aggregate(self, phase: str, rnd: int, current: Mapping[str, np.ndarray],
                  updates: Sequence[tuple[int, Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
        """The new global values of the phase's shared arrays from `updates` ((node,
        arrays, examples) of the accepted replies, already checked by `check_update`), given
        their `current` values (the ones `configure` was shown)."""
        self.facts = {}
        if self.dp:
            return self._aggregate_private(phase, rnd, current, updates)
        new = self._aggregate_strategy(phase, rnd, current, updates)
        if self.local_dp:
            self._account_local([node for node, _, _ in updates])
        return new

    def aggregate_average(self, phase: str, rnd: int, current: Mapping[str, np.ndarray], average: Mapping[str, np.ndarray],
                          nodes: Sequence[int]) -> dict[str, np.ndarray]:
        """The new global values from the hospitals' example-weighted `average` model, which is
        all secure aggregation reveals (`nodes`: the hospitals in it). The strategy gets it as
        one reply: its weighted mean is the average itself, and its server step (FedAvgM's
        momentum, FedAdam's moments) runs on it as on any round's mean."""
        self.facts = {}
        if self.dp:
            raise AggregationError(f"dp={self.cfg.dp} needs each hospital's update; secure aggregation reveals only their average")
        if not nodes:
            raise AggregationError("no hospital reported any training examples; nothing to aggregate")
        new = self._aggregate_strategy(phase, rnd, current, [(nodes[0], average, 1)])
        if self.local_dp:
            self._account_local(list(nodes))
        return new

    def _aggregate_strategy(self, phase: str, rnd: int, current: Mapping[str, np.ndarray],
                            updates: Sequence[tuple[int, Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
        if self.relay:  # `updates` in the order the hospitals trained: the last one's model, statistics averaged
            self._start_phase(phase)
            return relay_model([(arrays, n) for _, arrays, n in updates])
        if self.cfg.strategy == STRATEGY_FEDAVG:
            self._start_phase(phase)
            return self.server_optimizer.step(current, weighted_average([(arrays, n) for _, arrays, n in updates]), phase)
        if phase != self.phase or not self.sent:
            self.configure(phase, rnd, current, [node for node, _, _ in updates])
        counted, keys = _counted(updates)
        # Statistics and integer buffers: the plain average / the max.
        out = weighted_average([({k: v for k, v in arrays.items() if k not in keys}, n) for _, arrays, n in counted])
        replies = []
        for node, arrays, n in counted:
            sent = self.sent.get(node) or next(iter(self.sent.values()))
            content = RecordDict({ARRAYS: _array_record({k: arrays[k] for k in keys}),
                                  METRICS: MetricRecord({EXAMPLES: int(n)})})
            replies.append(Message(content, reply_to=sent))
        new, _ = self.strategy.aggregate_train(rnd, replies)
        last = getattr(self.strategy, "last", None)  # median-cosine: each update's cosine, who was left out
        self.facts = {} if not last else {"cosines": {node: c for (node, _, _), c in zip(counted, last["cosines"], strict=True)},
                                          "left_out": [counted[i][0] for i in last["left_out"]]}
        self.sent = {}
        if new is None:
            raise AggregationError(f"strategy {self.cfg.strategy} returned no arrays for {phase} round {rnd}")
        return out | _as_float32(new, keys, counted[0][1])

    # ---------------------------------------------------------------- differential privacy
    def _configure_private(self, rnd: int, current: Mapping[str, np.ndarray], node_ids: Sequence[int]) -> dict:
        """A fixed-clipping wrapper for this round's hospitals around FedAvg, on the run's
        accountant; its `configure_train` raises `PrivacyBudgetExhausted` when this round's
        release would pass dp-max-epsilon."""
        if self.accountant is None:
            self.population = max(self.population or 0, len(node_ids), 1)
            self.accountant = new_accountant(self.cfg, self.population)
        # More nodes than hospitals (one reconnected while its old node is still listed): the
        # budget check is the same for any sample (no amplification), and the release is
        # configured again at aggregation for the nodes that replied.
        node_ids = list(node_ids)[:self.accountant.config.population_size]
        sample = max(len(node_ids), 1)
        if self.adaptive:
            self.strategy = self._adaptive_wrapper(sample)
            # Flower's adaptive wrapper takes no accountant: the check its fixed-clipping one makes.
            self.pending_event = privacy_event(self.cfg, sample, self.accountant.config.population_size)
            if self.accountant.config.max_epsilon is not None and self.accountant.would_exceed(self.pending_event):
                spent = self.accountant.get_privacy_spent()
                raise _budget_exhausted(spent.epsilon, spent.delta)
        else:
            self.strategy = flwr_strategy.DifferentialPrivacyServerSideFixedClipping(
                build_strategy(self.cfg), self.cfg.dp_noise_multiplier, self.cfg.dp_clipping_norm, sample,
                accountant=self.accountant)
        self._configure_strategy(rnd, current, node_ids)
        self.sent_nodes = sorted(self.sent)
        return {}

    def _adaptive_wrapper(self, sample: int) -> AdaptiveClipping:
        """Flower's adaptive-clipping wrapper around FedAvg for `sample` hospitals, starting
        from the phase's current clipping norm; a noise multiplier the count's noise cannot
        share (Flower's ValueError) is named by its run config keys."""
        stddev = self.cfg.dp_clipped_count_stddev or None  # None: Flower's default, hospitals / 20
        need = self.cfg.dp_noise_multiplier / 2
        if (stddev if stddev is not None else sample / 20) <= need:
            raise AggregationError(
                f"dp=central-adaptive with {sample} hospitals: dp-noise-multiplier={self.cfg.dp_noise_multiplier} needs the "
                f"noise on the count of clipped updates above {need:g}, and Flower's default dp-clipped-count-stddev is "
                f"hospitals / 20 = {sample / 20:g}; set dp-clipped-count-stddev above {need:g} (e.g. "
                f"{self.cfg.dp_noise_multiplier:g}: the average then gets 1.15x the noise multiplier)")
        return AdaptiveClipping(build_strategy(self.cfg), self.cfg.dp_noise_multiplier, sample,
                                initial_clipping_norm=self.clipping_norm, target_clipped_quantile=self.cfg.dp_target_quantile,
                                clip_norm_lr=self.cfg.dp_clip_norm_lr, clipped_count_stddev=stddev)

    def _aggregate_private(self, phase: str, rnd: int, current: Mapping[str, np.ndarray],
                           updates: Sequence[tuple[int, Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
        counted, keys = _counted(updates)
        # Flower's wrapper adds noise for the hospitals it was configured with and insists they
        # all reply: when some did not (failed, refused, no examples), a wrapper for those that
        # did is configured for this round instead (nothing was released yet).
        if phase != self.phase or sorted(node for node, _, _ in counted) != self.sent_nodes:
            self._start_phase(phase)
            self._configure_private(rnd, current, [node for node, _, _ in counted])
        # BatchNorm statistics and integer buffers stay the global model's: averaged, they
        # would carry the hospitals' data outside the clipping and the noise.
        out = {k: np.array(current[k], copy=True) for k in counted[0][1] if k not in keys}
        before = self.accountant.get_privacy_spent().epsilon if self.accountant.num_releases else 0.0
        replies = [Message(RecordDict({ARRAYS: _array_record({k: arrays[k] for k in keys}),
                                       METRICS: MetricRecord({EXAMPLES: 1})}),  # equal weights: client-level DP
                           reply_to=self.sent[node]) for node, arrays, _ in counted]
        new, _ = self.strategy.aggregate_train(rnd, replies)
        self.sent, self.sent_nodes = {}, []
        if new is None:
            raise AggregationError(f"Flower's DP wrapper returned no arrays for {phase} round {rnd}")
        clipped_with, noise_multiplier, adaptive = self.cfg.dp_clipping_norm, self.cfg.dp_noise_multiplier, {}
        if self.adaptive:
            self.accountant.compose(self.pending_event)  # the release happened: Flower added the noise
            self.pending_event = None
            clipped_with, noise_multiplier = self.strategy.clipped_with, self.strategy.noise_multiplier
            self.clipping_norm = float(self.strategy.clipping_norm)
            adaptive = {"next_clipping_norm": self.clipping_norm, "target_quantile": float(self.cfg.dp_target_quantile),
                        "clipped_count_stddev": float(self.strategy.clipped_count_stddev)}
        spent = self.accountant.get_privacy_spent()
        self.privacy = {"mechanism": self.cfg.dp, "epsilon": float(spent.epsilon), "delta": float(spent.delta),
                        "round_epsilon": float(spent.epsilon - before), "releases": int(spent.num_releases),
                        "noise_multiplier": float(self.cfg.dp_noise_multiplier), "clipping_norm": float(clipped_with),
                        "noise_stdv": float(noise_multiplier * clipped_with / len(counted)),
                        "hospitals": len(counted), "population": int(self.accountant.config.population_size),
                        "max_epsilon": float(self.cfg.dp_max_epsilon) or None, "accounting": spent.accounting_method,
                        **adaptive}
        return out | _as_float32(new, keys, counted[0][1])

    # ---------------------------------------------------------------- local differential privacy
    def _check_local_budget(self) -> None:
        """dp=local with dp-max-epsilon: the round whose release would pass the budget (basic
        composition) is refused before it is sent, as Flower refuses a central one."""
        if self.cfg.dp_max_epsilon and local_dp.spent(self.cfg, self.local_releases + 1)[0] > self.cfg.dp_max_epsilon:
            raise _budget_exhausted(*local_dp.spent(self.cfg, self.local_releases))

    def _account_local(self, nodes: Sequence[int]) -> None:
        """One more local release by each hospital of the round, composed by basic composition."""
        self.local_releases += 1
        epsilon, delta = local_dp.spent(self.cfg, self.local_releases)
        self.population = max(self.population or 0, len(nodes))
        self.privacy = {"mechanism": self.cfg.dp, "epsilon": float(epsilon), "delta": float(delta),
                        "round_epsilon": float(self.cfg.dp_local_epsilon), "releases": self.local_releases,
                        "noise_multiplier": float(local_dp.noise_stdv(self.cfg) / local_dp.sensitivity(self.cfg)),
                        "clipping_norm": float(self.cfg.dp_clipping_norm), "noise_stdv": float(local_dp.noise_stdv(self.cfg)),
                        "hospitals": len(nodes), "population": int(self.population),
                        "max_epsilon": float(self.cfg.dp_max_epsilon) or None, "accounting": local_dp.ACCOUNTING,
                        "sensitivity": float(local_dp.sensitivity(self.cfg)), "round_delta": float(self.cfg.dp_delta)}

    def privacy_spent(self) -> dict | None:
        """The run's privacy spent so far (None with dp=off or before the first release)."""
        return dict(self.privacy) if self.privacy else None
