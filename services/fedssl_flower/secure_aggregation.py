"""Secure aggregation (run config `secure-aggregation = true`): Flower's SecAgg+ protocol, driven
over fedssl's messaging, so the aggregator only ever holds masked updates and their sum.

Flower 1.41 ships the protocol in two halves written for its legacy strategy loop:
`flwr.client.mod.secaggplus_mod` (the hospital's side: keys, Shamir shares, quantisation and
masks) and `flwr.server.workflow.SecAggPlusWorkflow` (the aggregator's side: four exchanges,
dropout handling, unmasking), which wants a `LegacyContext` with a legacy `Strategy` and
reads the trained parameters as a legacy `FitRes`. Nothing here is cryptography of fedssl's
own; this module only fits those two halves to fedssl's Message-API app:

- Hospital (`mod`, a ClientApp mod): a train message that carries SecAgg+'s config record goes
  through Flower's `secaggplus_mod`; in its "collect masked vectors" stage the mod calls
  fedssl's train handler, and `_as_fitres` turns that reply into what the mod masks: the
  hospital's *update* (trained shared arrays minus the global arrays it received, float64,
  in sorted key order) weighted by its example count. The plaintext weights are removed from
  the reply before the mask is applied, so they never leave the hospital; its metrics and its
  scores of the received model travel as usual. A non-finite update is refused at the
  hospital (its reply is then an error: a dropout the protocol absorbs).
- Aggregator (`SecureRound`): Flower's `SecAggPlusWorkflow`, its four stages unchanged,
  sending through the aggregator's `messaging.Messenger.exchange` (SuperLink retries,
  replies paired by `reply_to`), with a legacy strategy that hands it this round's hospitals
  and takes back the unmasked weighted average. The collect stage's messages carry fedssl's train content
  (the global model, the round's config) beside SecAgg+'s record.

What the aggregator learns: each hospital's masked vector (uniform noise modulo 2^32 without
the others' shares), its example count and training metrics (plaintext, as without secure
aggregation), and the example-weighted average of the updates. So only strategies that need
nothing but that average combine with it (fedavg, fedavgm, fedadam, fedyogi, fedadagrad,
fedprox); the robust ones (fedmedian, fedtrimmedavg, krum, multikrum) and central DP
(server-side clipping) need each hospital's update and are refused at config time; dp=local
combines (the hospitals noise before masking). `aggregation.check_update` cannot look inside
a masked update: a hospital's garbage is caught only by that hospital (`_as_fitres`).

Parameters (Flower's, see `SecAggPlusWorkflow`): `secagg-num-shares` (a fraction of the round's
hospitals, or a count > 2), `secagg-reconstruction-threshold` (a fraction of the shares, or a
count), `secagg-clipping-range` (each update value is clipped to +-range before stochastic
quantisation to 2^22 levels: values beyond it are counted, logged and reported in the
hospital's metrics as `secagg-clipped`). The weight cap (Flower's `max_weight`) is the largest
training set the round's hospitals announced at start-up, so the weight factor costs as
little precision as it can. Flower's masks come from numpy's Mersenne Twister seeded with 32
bits folded from each 32-byte secret (`secaggplus_utils.pseudo_rand_gen`): a cryptographic PRG
would be stronger; that is Flower's code and is used as is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedssl_core import names

from . import records, training
from .attack import hospital_name, node_attack
from .config import RunConfig

log = logging.getLogger("fedssl.secagg")

QUANTIZATION_RANGE = 2**22  # Flower's default: 2^32 / 2^22 = 1024 hospitals before the sum can overflow
MODULUS_RANGE = 2**32
CLIPPED = "secagg-clipped"  # METRICS key: update values the hospital clipped to +-secagg-clipping-range


# ------------------------------------------------------------------------------ hospital side
def is_secure(msg: Message) -> bool:
    return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


def update_keys(arrays: Mapping[str, np.ndarray], phase: str, cfg: RunConfig) -> list[str]:
    """The sorted keys of the phase's shared groups among `arrays`: the order, and so the
    shapes, every hospital's masked vector has (they are summed element by element)."""
    prefixes = tuple(f"{g}." for g in training.shared_groups(phase, cfg.share, cfg.finetune_mode))
    return sorted(k for k in arrays if k.startswith(prefixes))


def _as_fitres(reply: Message, msg: Message, context: Context) -> Message:
    """fedssl's train reply as the legacy FitRes Flower's mod masks: the update (trained minus
    received, float64, sorted keys) and the example count; the plaintext weights removed."""
    if reply.has_error():
        return reply
    cfg = RunConfig.from_mapping(context.run_config)
    received = records.from_array_record(msg.content[records.WEIGHTS], cfg.update_encoding)
    keys = update_keys(received, str(msg.content[records.CONFIG]["phase"]), cfg)
    content = reply.content
    examples = 0
    if records.WEIGHTS in content:  # trained: its update; else (it could not train) zeros that weigh nothing
        trained = records.from_array_record(content[records.WEIGHTS], cfg.update_encoding)
        if sorted(trained) != keys:
            raise ValueError(f"secure aggregation: the trained update has tensors {sorted(set(trained) ^ set(keys))[:3]} "
                             "that the round's shared groups do not, or lacks them")
        del content[records.WEIGHTS]
        examples = int(content[records.METRICS].get(names.M_EXAMPLES, 0))
        update = [np.asarray(trained[k], dtype=np.float64) - np.asarray(received[k], dtype=np.float64) for k in keys]
    else:
        update = [np.zeros(np.shape(received[k]), dtype=np.float64) for k in keys]
    bad = [k for k, u in zip(keys, update, strict=True) if not np.isfinite(u).all()]
    if bad:  # never masked: the mask would hide it from every check
        raise ValueError(f"secure aggregation: this hospital's update holds NaN or infinite values in {bad[0]} "
                         f"({len(bad)} tensor(s)); it is not sent")
    state = context.state.config_records[RECORD_KEY_STATE]
    limit = float(state["clipping_range"])
    # Flower's mod multiplies the update by its quantised weight, then clips: count what it will clip.
    weight = round(examples / float(state["max_weight"]) * int(state["target_range"])) / int(state["target_range"])
    clipped = int(sum(int(np.count_nonzero(np.abs(u) * weight > limit)) for u in update))
    if clipped:
        log.warning("secure aggregation: %d update value(s) beyond secagg-clipping-range=%g are clipped before "
                    "masking (the average is biased there; raise secagg-clipping-range)", clipped, limit)
    if records.METRICS in content:
        content[records.METRICS][CLIPPED] = clipped
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(update), examples, {})
    for key, record in compat.fitres_to_recorddict(fitres, keep_input=False).items():
        content[key] = record
    return Message(content, reply_to=msg)


def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: train messages of a secure round go through Flower's `secaggplus_mod`
    (with fedssl's reply made its FitRes); every other message passes straight through."""
    if not is_secure(msg):
        return call_next(msg, context)
    attack = node_attack(context.node_config, context.node_id)
    stage = str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, ""))
    if attack.kind == names.ATTACK_DROP and attack.stage == stage:  # fault injection (tests only)
        hospital = hospital_name(context.node_config, context.node_id)
        log.warning("hospital %s LEAVES secure aggregation ON PURPOSE at its %s stage (node config attack=%s, tests only)",
                    hospital, stage, attack)
        raise RuntimeError(f"hospital {hospital} left secure aggregation at its {stage} stage on purpose (node config attack={attack})")
    return secaggplus_mod(msg, context, lambda m, c: _as_fitres(call_next(m, c), m, c))


# ------------------------------------------------------------------------------ aggregator side
@dataclass
class _Proxy:
    """What SecAggPlusWorkflow keeps of a legacy ClientProxy: its node id."""

    node_id: int


class _RoundStrategy(Strategy):
    """The legacy Strategy SecAggPlusWorkflow asks for: this round's hospitals (configure_fit),
    and the unmasked average it hands back (aggregate_fit). Nothing else is used."""

    def __init__(self, node_ids: Sequence[int]) -> None:
        self.node_ids = list(node_ids)
        self.average: Parameters | None = None

    def initialize_parameters(self, client_manager):  # pragma: no cover - not called by the workflow
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Proxy(n), FitIns(Parameters([], ""), {})) for n in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        self.average = results[0][1].parameters if results else None
        return self.average, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # pragma: no cover
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # pragma: no cover
        return None, {}

    def evaluate(self, server_round, parameters):  # pragma: no cover
        return None


@dataclass
class SecureResult:
    """One secure round: the weighted average of the updates (None when the protocol halted),
    the collect stage's replies by node (fedssl's metrics, scores, skips; no weights), the
    hospitals that dropped out and at which stage, and what each stage cost."""

    average: dict[str, np.ndarray] | None
    replies: dict[int, Message]
    dropped: dict[int, str]
    stages: list[dict] = field(default_factory=list)
    halted_at: str | None = None
    threshold: int = 0
    num_shares: int = 0


class _StageGrid:
    """The Grid SecAggPlusWorkflow sends through: each stage's messages go out by the
    aggregator's `exchange` (retries, replies paired by reply_to) and come back as a list;
    every stage's replies, seconds and bytes are kept."""

    def __init__(self, exchange: Callable[[list[Message]], tuple[dict[int, Message], list[int]]]) -> None:
        self.exchange = exchange
        self.replies: dict[str, dict[int, Message]] = {}
        self.stages: list[dict] = []

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) if messages else "?"
        t0 = time.monotonic()
        replies, missing = self.exchange(list(messages))
        self.replies[stage] = replies
        self.stages.append({
            "stage": stage, "seconds": round(time.monotonic() - t0, 3), "sent": len(messages),
            "answered": sum(not r.has_error() for r in replies.values()),
            "bytes_sent": sum(_bytes(m.content) for m in messages),
            "bytes_received": sum(_bytes(r.content) for r in replies.values() if not r.has_error()),
            "missing": sorted(missing),
            "errors": {n: r.error.reason for n, r in replies.items() if r.has_error()},
        })
        return list(replies.values())


def _bytes(content: RecordDict) -> int:
    """The payload bytes of a message's records (as Flower's count_bytes counts them; its
    ConfigRecord.count_bytes fails on an empty list, which SecAgg+ sends to a lone hospital)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += record.count_bytes()
            continue
        for key, value in record.items():
            total += len(key)
            for v in value if isinstance(value, list) else [value]:
                total += len(v) if isinstance(v, (bytes, str)) else 1 if isinstance(v, bool) else 8
    return total


class SecureRound(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow for one fedssl round: `run` takes the round's train content
    per node and returns a `SecureResult`."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(num_shares=_fraction_or_count(cfg.secagg_num_shares),
                         reconstruction_threshold=_fraction_or_count(cfg.secagg_reconstruction_threshold),
                         clipping_range=cfg.secagg_clipping_range, quantization_range=QUANTIZATION_RANGE,
                         modulus_range=MODULUS_RANGE)
        self.contents: dict[int, RecordDict] = {}
        self.workflow_state = None

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        # A hospital that left at setup or share keys never exchanged shares or masks with the
        # others; Flower 1.41 still lists it as dead at unmask, where every hospital then fails
        # looking up a share it never got (KeyError), and would remove masks nobody applied
        # for it. The round goes on with the hospitals that completed share keys, as if only
        # they had been sampled.
        active = set(state.active_node_ids)
        state.sampled_node_ids = active
        state.nid_to_neighbours = {nid: neighbours & active for nid, neighbours in state.nid_to_neighbours.items() if nid in active}
        # fedssl's train content (global model, round config) instead of the legacy FitIns.
        state.nid_to_fitins = {nid: self.contents[nid] for nid in state.nid_to_fitins}
        self.workflow_state = state
        return super().collect_masked_vectors_stage(grid, context, state)

    def setup_stage(self, grid, context, state) -> bool:
        self.workflow_state = state
        return super().setup_stage(grid, context, state)

    def run(self, exchange: Callable[[list[Message]], tuple[dict[int, Message], list[int]]], contents: Mapping[int, RecordDict],
            keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]], rnd: int, max_weight: float) -> SecureResult:
        self.contents = dict(contents)
        self.max_weight = max(float(max_weight), 1.0)
        grid = _StageGrid(exchange)
        strategy = _RoundStrategy(sorted(contents))
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                                strategy=strategy, client_manager=SimpleClientManager())
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: int(rnd)})
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        self(grid, context)
        replies = grid.replies.get(Stage.COLLECT_MASKED_VECTORS, {})
        sampled = set(contents)
        dropped: dict[int, str] = {}
        for info in grid.stages:
            for n in sampled - set(dropped):
                if n in info["missing"] or n in info["errors"]:
                    dropped[n] = f"{info['stage']}: " + (info["errors"].get(n) or "no answer")
        average = None
        if strategy.average is not None:
            arrays = parameters_to_ndarrays(strategy.average)
            average = {k: np.asarray(a, dtype=np.float64).reshape(shapes[k]) for k, a in zip(keys, arrays, strict=True)}
        halted = None if average is not None else (grid.stages[-1]["stage"] if grid.stages else Stage.SETUP)
        state = self.workflow_state
        return SecureResult(average, {n: r for n, r in replies.items() if n in sampled}, dropped, grid.stages, halted,
                            int(getattr(state, "threshold", 0) or 0), int(getattr(state, "num_shares", 0) or 0))


def _fraction_or_count(value: float) -> int | float:
    """Flower's convention: a float is a fraction, an int a count; run config gives floats."""
    return int(value) if value > 1 else float(value)
