"""The aggregator: a Flower ServerApp running federated SSL rounds, then federated fine-tuning.

The round loop talks to hospitals only through Messages; the averaging is `strategy`, the
metrics `metrics`, the bookkeeping `outputs` (run folder) and `registry_client`. One exchange
per round: the train message carries the previous round's global model, which each hospital
scores on its held-out split (with its local-only baseline) before it trains; the replies
bring those scores and the update (only the shared groups). So each round: finish the
previous round's record (run folder, registry metrics, model version with its lineage) →
aggregate this round's updates. The last model is scored by one evaluate exchange at the end.
Two exchanges per round would pay Flower's fixed cost (a ClientApp process per message, the
model through the SuperLink) twice.

Environment of the SuperLink (inherited by this process): FEDSSL_REGISTRY_URL,
FEDSSL_REGISTRY_TOKEN, FEDSSL_RUNS_DIR.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import add_exit_handler

from fedssl_core import names, weights
from fedssl_core.models import TASK_GROUPS, FedSSLModel, select_groups

from . import aggregation, local_models, records, secure_aggregation, training
from .aggregation import Aggregation, PrivacyBudgetExhausted, check_update, update_norm
from .client_app import parse_info
from .config import RunConfig
from .errors import ConfigError, RunFailed
from .metrics import aggregate_metrics
from .outputs import RunFolder
from .registry_client import RegistryClient

log = logging.getLogger("fedssl.aggregator")

T = TypeVar("T")
SUPERLINK_RETRY_SECONDS = 300.0  # how long a SuperLink call is retried while it fails transiently
PULL_INTERVAL_SECONDS = 1.0  # between pulls for replies (Flower's Grid.send_and_receive waits 3 s; a round here can take 5 s)

app = ServerApp()


@dataclass
class Trained:
    """A round whose global model is aggregated but not yet scored: hospitals score it when the
    next round's train message brings it (or in the run's final evaluation)."""

    phase: str
    round: int
    total: int
    state: dict[str, torch.Tensor]  # the global model after this round
    per_hospital: dict[str, dict]  # training metrics by hospital
    examples: dict[str, int]  # training examples by hospital that trained
    failed: list[str]
    skipped: dict[str, str]  # hospital -> why it could not train this round
    refused: dict[str, str]  # hospital -> why its update was refused (not the shared model, or not finite)
    bytes_sent: int
    bytes_received: int
    train_seconds: float
    aggregate_seconds: float
    seconds: float  # the round's wall time, its registration excluded
    privacy: dict | None = None  # dp: the privacy spent up to this round's release (aggregation.privacy_spent)
    # How far each accepted update and the new global model moved from the round's global
    # model (`aggregation.update_norm`): one hospital far above the others is worth a look.
    update_norms: dict | None = None
    secure_aggregation: dict | None = None  # secure-aggregation: its stages (seconds, bytes), dropouts, threshold


@dataclass
class Hospital:
    name: str
    ssl_task: str
    class_names: list[str]
    audit: dict[str, Any]
    node_ids: list[int] = field(default_factory=list)


def superlink_call(what: str, call: Callable[[], T], *, retry_seconds: float = SUPERLINK_RETRY_SECONDS) -> T:
    """One Runtime API call, retried with backoff while the SuperLink fails transiently.

    Flower's own client retries 502/503/504 and dropped connections, not a 500; the SuperLink
    answers 500 while its SQLite state stays locked by a burst of writes (many hospitals
    pushing their models at once), which passes. A 4xx is a real error and is raised at once.
    """
    deadline = time.monotonic() + retry_seconds
    delay = 1.0
    while True:
        try:
            return call()
        except (httpx.HTTPStatusError, httpx.TransportError) as e:
            transient = not isinstance(e, httpx.HTTPStatusError) or e.response.status_code >= 500
            if not transient or time.monotonic() + delay > deadline:
                raise
            _progress("SuperLink %s failed (%s); trying again in %.0fs", what, _short(e), delay)
            time.sleep(delay)
            delay = min(2 * delay, 15.0)


def _copy(m: Message) -> Message:
    """The same message as a new one (new id): for sending again."""
    return Message(m.content, dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type,
                   group_id=m.metadata.group_id)


def _short(e: Exception) -> str:
    if isinstance(e, httpx.HTTPStatusError):
        return f"HTTP {e.response.status_code}"
    return f"{type(e).__name__}: {e}"


def _finite(value: Any) -> Any:
    """`value` with NaN and infinite floats replaced by None: JSON has no such numbers, and one
    hospital's undefined metric must not stop the round's record from being posted."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _progress(msg: str, *args: Any) -> None:
    """Progress lines: what `flwr log` / `kubectl logs` / fedssl-submit show the user."""
    line = msg % args if args else msg
    log.info(line)
    print(f"[fedssl] {line}", flush=True)


def _temperature_scaled(state: dict[str, torch.Tensor], aggregated: dict) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The classifier served at the temperature with the lowest held-out NLL over all hospitals:
    dividing the last layer's weight and bias by T is softmax(logits / T) exactly, so the
    registry serves calibrated probabilities with no change (argmax, and so every accuracy,
    stays the same). Applied only when it lowers the NLL; returns what was done."""
    curve, t = aggregated.get(names.M_NLL_BY_TEMPERATURE), aggregated.get(names.M_TEMPERATURE)
    if not isinstance(curve, list) or not t or len(curve) != len(names.TEMPERATURE_GRID):
        return state, None
    nll_at_1 = curve[names.TEMPERATURE_GRID.index(1.0)]
    best = min(curve)
    if best >= nll_at_1 or t == 1.0:
        return state, {"temperature": 1.0, "nll": nll_at_1, "applied": False}
    scaled = dict(state)
    for key in (f"{names.GROUP_CLASSIFIER}.weight", f"{names.GROUP_CLASSIFIER}.bias"):
        scaled[key] = state[key] / t
    return scaled, {"temperature": t, "nll": best, "nll_at_temperature_1": nll_at_1, "applied": True,
                    "fitted_on": "hospitals' held-out splits, NLL summed by the aggregator"}


class Aggregator:
    def __init__(self, grid: Grid, cfg: RunConfig, run_id: str) -> None:
        self.grid, self.cfg, self.run_id = grid, cfg, run_id
        self.folder = RunFolder(cfg.runs_root, run_id)
        self.registry = RegistryClient.from_environment(cfg.registry) if cfg.registry else None
        self.hospitals: dict[int, Hospital] = {}  # node id → hospital
        self.nodes_with_model: set[int] = set()  # nodes that hold the full model already
        self.class_names: list[str] = []
        self.state: dict[str, torch.Tensor] = {}
        self.history: list[dict] = []
        self.started, self.t_start = _now(), time.monotonic()
        self.where, self.finished = "start-up", False  # where the run is, for a stop signal's record
        self.warnings: list[str] = [cfg.data_warning] if cfg.data_warning else []
        self.registered: dict[str, int] = {}
        self.local_models: dict[str, dict] = {}  # hospital -> its registered local-only classifier, or why not
        if cfg.register_local_models and self.registry is None:
            log.warning("register-local-models=true but no registry is configured: local-only models stay at the hospitals")
        # Flower's strategy for `strategy` (and fedssl's server step for fedavg); its state
        # (momentum, moments) is not checkpointed: a resumed run restarts it.
        self.aggregation = Aggregation(cfg)

    # ---------------------------------------------------------------- messaging
    def _node_ids(self) -> list[int]:
        return superlink_call("get-nodes", lambda: list(self.grid.get_node_ids()))

    def _push(self, msgs: list[Message]) -> dict[str, int]:
        """Push messages; returns message id → destination node. A push that failed part way
        is retried with fresh copies (new ids): the SuperLink may hold the first ones already,
        and their late replies are ignored."""
        attempts = 0

        def push() -> list[str]:
            nonlocal attempts
            sent = [_copy(m) for m in msgs] if attempts else msgs
            attempts += 1
            ids = list(self.grid.push_messages(sent))
            if len(ids) != len(sent):  # Flower logs a 413 (payload too large) and returns []
                raise RunFailed(f"the SuperLink took {len(ids)} of {len(sent)} messages ({sent[0].metadata.group_id}); "
                                "see the SuperLink's log above")
            return ids

        ids = superlink_call("push-messages", push)
        return {mid: m.metadata.dst_node_id for mid, m in zip(ids, msgs, strict=True) if mid}

    def _send_and_receive(self, msgs: list[Message]) -> dict[int, Message]:
        """Grid.send_and_receive with every SuperLink call retried on transient failures;
        replies by the node they answer for, matched on `reply_to_message_id`."""
        waiting = self._push(msgs)
        deadline = time.monotonic() + self.cfg.round_timeout
        out: dict[int, Message] = {}
        while waiting:
            for reply in superlink_call("pull-messages", lambda: list(self.grid.pull_messages(list(waiting)))):
                node = waiting.pop(reply.metadata.reply_to_message_id, None)
                if node is None:  # not one we are waiting for
                    log.warning("ignoring a reply to unknown message %r", reply.metadata.reply_to_message_id)
                    continue
                out[node] = reply
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(PULL_INTERVAL_SECONDS)
        return out

    def _exchange(self, msgs: list[Message]) -> tuple[dict[int, Message], list[int]]:
        """Send, wait up to round-timeout, and pair every reply with the node it was sent to.

        Replies are matched on `reply_to_message_id`, never on `src_node_id`: when a node is
        gone, the SuperLink answers in its place with an error whose source is the SuperLink
        itself. A node that is still connected but never answered (its ClientApp task was
        lost, or the SuperLink lost its reply) gets the message again, `message-retries`
        times. Returns (replies by node, nodes that never answered).
        """
        out: dict[int, Message] = {}
        pending = list(msgs)
        for attempt in range(self.cfg.message_retries + 1):
            out.update(self._send_and_receive(pending))
            if attempt == self.cfg.message_retries:
                break
            connected = set(self._node_ids())
            pending = [_copy(m) for m in pending if m.metadata.dst_node_id not in out and m.metadata.dst_node_id in connected]
            if not pending:
                break
            _progress("no answer from node(s) %s within %.0fs (%s); sending again",
                      ", ".join(str(m.metadata.dst_node_id) for m in pending), self.cfg.round_timeout, pending[0].metadata.group_id)
        return out, [m.metadata.dst_node_id for m in msgs if m.metadata.dst_node_id not in out]

    # ---------------------------------------------------------------- hospitals
    def _wait_for_hospitals(self) -> list[int]:
        deadline = time.monotonic() + self.cfg.wait_for_hospitals
        while True:
            nodes = sorted(self._node_ids())
            if len(nodes) >= self.cfg.min_hospitals:
                return nodes
            if time.monotonic() > deadline:
                raise RunFailed(
                    f"only {len(nodes)} hospital(s) connected after {self.cfg.wait_for_hospitals:.0f}s; "
                    f"min-hospitals is {self.cfg.min_hospitals}: start more SuperNodes or lower min-hospitals"
                )
            time.sleep(1.0)

    def _describe(self, node_ids: list[int], *, strict: bool) -> None:
        """Ask new nodes who they are and what data they hold. At start-up (strict) any
        failing hospital fails the run with its error; later a failing node is skipped."""
        new = [n for n in node_ids if n not in self.hospitals]
        if not new:
            return
        msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY, group_id="describe") for n in new]
        replies, missing = self._exchange(msgs)
        errors = []
        for node, reply in sorted(replies.items()):
            if reply.has_error():
                errors.append(f"node {node}: {reply.error.reason}")
                continue
            info = parse_info(reply.content[records.INFO])
            hospital = Hospital(info["hospital"], info["ssl-task"], list(info["class-names"]), info["audit"], [node])
            if self.class_names and hospital.class_names != self.class_names:
                errors.append(f"hospital {hospital.name} has classes {hospital.class_names}, others {self.class_names}")
                continue
            same_name = [n for n, h in self.hospitals.items() if h.name == hospital.name]
            if same_name and strict:
                errors.append(f"nodes {same_name[0]} and {node} both say they are hospital {hospital.name!r}: "
                              "give every SuperNode its own `hospital` in --node-config")
                continue
            for old in same_name:  # the hospital came back as a new SuperNode: its old node is gone
                hospital.node_ids = self.hospitals.pop(old).node_ids + [node]
                self.nodes_with_model.discard(old)
                _progress("hospital %s reconnected as node %s (was node %s)", hospital.name, node, old)
            self.class_names = self.class_names or hospital.class_names
            self.hospitals[node] = hospital
            _progress("hospital %s joined (node %s): ssl-task=%s, %s data, %d train / %d test images",
                      hospital.name, node, hospital.ssl_task, hospital.audit.get("data_source"),
                      hospital.audit.get("train_examples", 0), hospital.audit.get("test_examples", 0))
        errors += [f"node {n}: no answer within {self.cfg.round_timeout:.0f}s" for n in sorted(missing)]
        if errors and strict:
            raise RunFailed("hospital(s) failed at start-up: " + "; ".join(errors))
        for e in errors:
            log.warning("skipping a hospital this round: %s", e)

    def _hospital_nodes(self) -> list[int]:
        """The connected nodes that are known hospitals, newcomers described first."""
        nodes = sorted(self._node_ids())
        self._describe(nodes, strict=False)
        return [n for n in nodes if n in self.hospitals]

    def _hospital_names(self) -> list[str]:
        return sorted({h.name for h in self.hospitals.values()})

    # ---------------------------------------------------------------- model
    def _init_model(self) -> None:
        torch.manual_seed(self.cfg.seed)
        model = FedSSLModel(self.cfg.arch, num_classes=len(self.class_names), pretrained=self.cfg.pretrained)
        self.state = {k: v.clone() for k, v in model.state_dict().items()}

    # ---------------------------------------------------------------- registry
    def _data_facts(self) -> tuple[str, bool]:
        sources = sorted({h.audit.get("data_source", "?") for h in self.hospitals.values()})
        synthetic = any(h.audit.get("synthetic_data") for h in self.hospitals.values())
        return (sources[0] if len(sources) == 1 else "mixed:" + ",".join(sources)), synthetic

    def _run_body(self, status: str, error: str | None = None) -> dict:
        source, synthetic = self._data_facts()
        return {
            "status": status,
            "phase": self.history[-1]["phase"] if self.history else names.PHASE_SSL,
            "planned_rounds": {names.PHASE_SSL: self.cfg.ssl_rounds, names.PHASE_FINETUNE: self.cfg.finetune_rounds},
            "config": self.cfg.as_dict(),
            "data_source": source,
            "synthetic_data": synthetic,
            "warnings": self.warnings,
            "class_names": self.class_names,
            "hospitals": {
                h.name: {
                    "ssl_task": h.ssl_task,
                    "data_source": h.audit.get("data_source"),
                    "partition": h.audit.get("partition"),
                    "train_examples": h.audit.get("train_examples"),
                    "test_examples": h.audit.get("test_examples"),
                    "class_counts": h.audit.get("class_counts", {}).get("train", {}),
                    "test_class_counts": h.audit.get("class_counts", {}).get("test", {}),
                    "skipped_files": len(h.audit.get("skipped_files", [])),
                    # Class folders as this hospital named them -> the federation's classes (imagefolder data).
                    "label_map": h.audit.get("label_map"),
                }
                for h in {h.name: h for h in self.hospitals.values()}.values()
            },
            **({"local_models": self.local_models} if self.local_models else {}),
            "started_at": self.started,
            "finished_at": _now() if status != "running" else None,
            "error": error,
        }

    def _input_spec(self) -> dict:
        mean, std = names.NORMALIZATION[self.cfg.arch]
        return {"image_size": self.cfg.image_size, "channels": 3, "mean": list(mean), "std": list(std),
                "class_names": self.class_names}

    def _weights_meta(self, task: str, phase: str, rnd: int) -> dict[str, str]:
        """The safetensors metadata of a registered version's weights."""
        return {"fedssl.arch": self.cfg.arch, "fedssl.task": task, "fedssl.num_classes": str(len(self.class_names)),
                "fedssl.image_size": str(self.cfg.image_size), "fedssl.run_id": self.run_id,
                "fedssl.round": str(rnd), "fedssl.phase": phase}

    def _register(self, state: dict[str, torch.Tensor], phase: str, rnd: int, aggregated: dict, hospitals: list[str],
                  privacy: dict | None = None) -> None:
        if self.registry is None:
            return
        source, synthetic = self._data_facts()
        spec = self._input_spec()
        scalars = {k: v for k, v in aggregated.items() if isinstance(v, (int, float))}
        targets = [(names.ENCODER_MODEL, names.TASK_EMBEDDING)]
        if phase == names.PHASE_FINETUNE:
            targets.append((names.CLASSIFIER_MODEL, names.TASK_CLASSIFICATION))
        for model_name, task in targets:
            self.registry.ensure_model(
                model_name, task=task, architecture=self.cfg.arch, input_spec=spec,
                description=("fedssl shared image encoder (federated self-supervised)" if task == names.TASK_EMBEDDING
                             else "fedssl diagnosis classifier (federated fine-tuned)"),
            )
            meta = self._weights_meta(task, phase, rnd)
            served = select_groups(state, TASK_GROUPS[task])
            calibration = None
            if task == names.TASK_CLASSIFICATION:
                served, calibration = _temperature_scaled(served, aggregated)
                if calibration:
                    meta["fedssl.temperature"] = str(calibration["temperature"])
            blob = weights.to_bytes(served, meta)
            tags = {"phase": phase, "round": str(rnd), "ssl_tasks": ",".join(sorted({h.ssl_task for h in self.hospitals.values()}))}
            if self.warnings:
                tags["warning"] = " | ".join(self.warnings)
            version = self.registry.upload_version(model_name, blob, {
                "tags": tags,
                "lineage": {"run_id": self.run_id, "round": rnd, "phase": phase, "hospitals": hospitals, "metrics": scalars,
                            "recipe": self._recipe(), "budget": self._budget(phase),
                            **({"calibration": calibration} if calibration else {}),
                            # dp: the privacy this model cost, all rounds up to it (epsilon at delta)
                            **({"privacy": privacy} if privacy else {})},
                "data_source": source,
                "synthetic_data": synthetic,
            })
            self.registered[model_name] = int(version["version"])

    def _recipe(self) -> dict:
        """The training recipe behind a registered version: every run-config key that shapes the model."""
        keep = ("arch", "pretrained", "image-size", "batch-size", "ssl-rounds", "finetune-rounds", "local-epochs", "local-steps",
                "lr", "finetune-lr", "lr-schedule", "weight-decay", "keep-optimizer-state", "finetune-loss", "finetune-mode", "share",
                "strategy", "server-lr", "server-momentum", "update-encoding", "seed",
                "dp", "dp-noise-multiplier", "dp-clipping-norm", "dp-delta", "dp-max-epsilon")
        if self.cfg.dp == names.DP_CENTRAL_ADAPTIVE:
            keep += ("dp-target-quantile", "dp-clip-norm-lr", "dp-clipped-count-stddev")
        if self.cfg.dp == names.DP_LOCAL:
            keep += ("dp-local-epsilon",)
        config = self.cfg.as_dict()
        return ({k: config[k] for k in keep} | {"strategy_parameters": aggregation.parameters(self.cfg)}
                | {"ssl_tasks": {h.name: h.ssl_task for h in self.hospitals.values()}})

    def _budget(self, phase: str, recorded: bool = False) -> dict:
        """What the model cost up to this registration: rounds per phase (this one included;
        `recorded`: it is in the history already), local steps per round at each hospital,
        and the run's wall time so far."""
        rounds = {p: sum(1 for h in self.history if h["phase"] == p) + (p == phase and not recorded) for p in names.PHASES}
        return {"rounds": rounds, "local_steps_per_round": self.cfg.local_steps or None, "local_epochs_per_round":
                None if self.cfg.local_steps else self.cfg.local_epochs, "batch_size": self.cfg.batch_size,
                "wall_seconds": round(time.monotonic() - self.t_start, 1)}

    # ---------------------------------------------------------------- rounds
    def _messages(self, nodes: list[int], message_type: str, config: dict, phases: tuple[str, ...],
                  group_id: str) -> tuple[list[Message], int]:
        """One message per node with the global model's groups that `phases` share (the whole
        model at first contact) and `config`; returns them and the bytes of their weights."""
        groups = tuple(dict.fromkeys(g for p in phases for g in training.shared_groups(p, self.cfg.share, self.cfg.finetune_mode)))
        packed: dict[bool, ArrayRecord] = {}  # packed once per variant (shared groups, whole model), not per node
        msgs, sent = [], 0
        for n in nodes:
            known = n in self.nodes_with_model
            if known not in packed:
                arrays = records.state_arrays(self.state, groups if known else None)
                packed[known] = records.to_array_record(arrays, self.cfg.update_encoding)
            content = RecordDict({records.WEIGHTS: packed[known], records.CONFIG: records.config_record(config)})
            sent += packed[known].count_bytes()
            msgs.append(Message(content, dst_node_id=n, message_type=message_type, group_id=group_id))
        return msgs, sent

    def _evaluations(self, replies: dict[int, Message], trained: Trained) -> tuple[dict[str, dict], dict[str, int]]:
        """The held-out scores of `trained`'s global model in `replies`, by hospital, and each
        hospital's number of held-out images."""
        scores, test_examples = {}, {}
        for node, reply in sorted(replies.items()):
            name = self.hospitals[node].name
            if reply.has_error() or records.EVAL_METRICS not in reply.content:
                continue  # a failed reply is reported with the round it trained for
            m = records.from_metric_record(reply.content[records.EVAL_METRICS], len(self.class_names))
            m["test_loss"] = m.pop(names.M_LOSS, None)
            if records.LOCAL_EVAL_METRICS in reply.content:
                local = records.from_metric_record(reply.content[records.LOCAL_EVAL_METRICS], len(self.class_names))
                for k in (names.M_ACCURACY, names.M_BALANCED_ACCURACY, names.M_MACRO_AUC, names.M_F1, names.M_CONFUSION_MATRIX):
                    if k in local:
                        m[names.LOCAL_ONLY_PREFIX + k] = local[k]
            scores[name] = m
            test_examples[name] = int(m.get(names.M_TEST_EXAMPLES, 0))
        for node in sorted(set(self.hospitals) & set(replies)):
            if self.hospitals[node].name not in scores and not replies[node].has_error():
                log.warning("hospital %s sent no evaluation of %s round %d", self.hospitals[node].name, trained.phase, trained.round)
        return scores, test_examples

    def _round(self, phase: str, rnd: int, total: int, previous: Trained | None) -> Trained:
        """Train round `rnd`: one exchange whose messages carry the previous round's global
        model, which every hospital scores before it trains (so that round's record is
        finished here), and whose replies are averaged into this round's global model."""
        t0 = time.monotonic()
        nodes = self._hospital_nodes()
        config: dict[str, Any] = {"phase": phase, "round": rnd}
        phases: tuple[str, ...] = (phase,)
        if previous is not None:
            config |= {"evaluate-phase": previous.phase, "evaluate-round": previous.round}
            phases = (phase, previous.phase)
        expected = records.state_arrays(self.state, training.shared_groups(phase, self.cfg.share, self.cfg.finetune_mode))
        # What the strategy adds to the train config (FedProx: proximal-mu); it sees the current model.
        config |= self.aggregation.configure(phase, rnd, expected, nodes)
        msgs, bytes_sent = self._messages(nodes, MessageType.TRAIN, config, phases, f"{phase}-{rnd}")
        t_send = time.monotonic()
        secure = None
        if self.cfg.secure_aggregation:  # four exchanges of Flower's SecAgg+; the collect stage's replies are the round's
            secure = self._secure_exchange(msgs, phase, rnd, expected)
            replies = secure.replies
            missing = [n for n in nodes if n not in replies]
            bytes_sent = sum(s["bytes_sent"] for s in secure.stages)
        else:
            replies, missing = self._exchange(msgs)
        t_train = time.monotonic() - t_send
        if previous is not None:
            self._finish(previous, *self._evaluations(replies, previous), evaluated_in=f"{phase} round {rnd}")

        updates, per_hospital, examples, failed, skipped, refused, norms = [], {}, {}, [], {}, {}, {}
        bytes_received = 0
        for node, reply in sorted(replies.items()):
            name = self.hospitals[node].name
            if reply.has_error():
                failed.append(name)
                log.warning("hospital %s failed %s round %d: %s", name, phase, rnd, reply.error.reason)
                continue
            info = reply.content[records.INFO] if records.INFO in reply.content else {}
            if records.SKIPPED in info or (secure is None and records.WEIGHTS not in reply.content):  # could not train: says why
                skipped[name] = str(info.get(records.SKIPPED, "its reply carried no weights"))
                _progress("%s round %d: hospital %s left out: %s", phase, rnd, name, skipped[name])
                continue
            if secure is None:
                bytes_received += reply.content[records.WEIGHTS].count_bytes()
                arrays, why = self._accepted(reply, expected)
                if arrays is None:  # garbage never reaches the strategy; the round goes on with the others
                    refused[name] = str(why)
                    _progress("%s round %d: hospital %s's update refused: %s", phase, rnd, name, why)
                    continue
                norms[name] = update_norm(arrays, expected)
            m = records.from_metric_record(reply.content[records.METRICS], len(self.class_names))
            n_ex = int(m.get(names.M_EXAMPLES, 0))
            updates.append((node, arrays if secure is None else {}, n_ex))
            examples[name] = n_ex
            per_hospital[name] = m
            if records.LOCAL_METRICS in reply.content:
                local = records.from_metric_record(reply.content[records.LOCAL_METRICS], len(self.class_names))
                per_hospital[name][names.LOCAL_ONLY_PREFIX + names.M_LOSS] = local.get(names.M_LOSS)
            self.nodes_with_model.add(node)
        failed += [self.hospitals[n].name for n in missing]
        if len(updates) < self.cfg.min_hospitals:
            raise RunFailed(
                f"{phase} round {rnd}: only {len(updates)} hospital(s) trained (failed or timed out: "
                f"{', '.join(failed) or 'none'}; could not train: "
                f"{'; '.join(f'{h}: {why}' for h, why in skipped.items()) or 'none'}; refused: "
                f"{'; '.join(f'{h}: {why}' for h, why in refused.items()) or 'none'}); min-hospitals is {self.cfg.min_hospitals}"
            )
        for name in failed:
            _progress("%s round %d: hospital %s did not answer; aggregating the %d others", phase, rnd, name, len(updates))
        t_agg = time.monotonic()
        if secure is not None:
            bytes_received = sum(s["bytes_received"] for s in secure.stages)
            new = self.aggregation.aggregate_average(phase, rnd, expected, self._secure_average(secure, phase, rnd, expected),
                                                     [node for node, _, n in updates if n > 0])
        else:
            new = self.aggregation.aggregate(phase, rnd, expected, updates)
        for key, value in new.items():
            self.state[key] = torch.from_numpy(np.asarray(value)).to(self.state[key].dtype).reshape(self.state[key].shape)
        t_agg = time.monotonic() - t_agg
        return Trained(phase, rnd, total, {k: v.clone() for k, v in self.state.items()}, per_hospital, examples, failed, skipped,
                       refused, bytes_sent, bytes_received, t_train, t_agg, time.monotonic() - t0, self.aggregation.privacy_spent(),
                       {"hospitals": norms, "global": update_norm(new, expected)},
                       None if secure is None else _secure_summary(secure))

    def _secure_exchange(self, msgs: list[Message], phase: str, rnd: int, expected: dict[str, Any]) -> secure_aggregation.SecureResult:
        """The round's train exchange as Flower's SecAgg+ (`secure_aggregation.SecureRound`):
        the weighted average of the hospitals' updates, never one hospital's."""
        keys = secure_aggregation.update_keys(expected, phase, self.cfg)
        by_node = {m.metadata.dst_node_id: m for m in msgs}
        max_weight = max([int(self.hospitals[n].audit.get("train_examples", 0) or 0) for n in by_node] + [1])
        result = secure_aggregation.SecureRound(self.cfg).run(
            self._exchange, {n: m.content for n, m in by_node.items()}, keys, {k: expected[k].shape for k in keys}, rnd, max_weight)
        for node, why in sorted(result.dropped.items()):
            _progress("%s round %d: hospital %s dropped out of secure aggregation at %s", phase, rnd, self.hospitals[node].name, why)
        return result

    def _secure_average(self, secure: secure_aggregation.SecureResult, phase: str, rnd: int,
                        expected: dict[str, Any]) -> dict[str, Any]:
        """The hospitals' example-weighted average model from the unmasked average update, or
        RunFailed when the protocol could not unmask it."""
        if secure.average is None:
            left = len(secure.replies) - sum(1 for r in secure.replies.values() if r.has_error())
            raise RunFailed(
                f"{phase} round {rnd}: secure aggregation halted at its {secure.halted_at} stage: too few hospitals left to "
                f"unmask the sum (reconstruction threshold {secure.threshold} of {secure.num_shares} shares; dropped: "
                + ("; ".join(f"{self.hospitals[n].name} ({why})" for n, why in sorted(secure.dropped.items())) or "none")
                + f"; {left} answered the collect stage); the global model stays at the previous round's")
        out = {}
        for key, value in expected.items():
            ref = np.asarray(value)
            delta = secure.average[key].reshape(ref.shape)
            new = np.rint(delta) + ref if np.issubdtype(ref.dtype, np.integer) else ref.astype(np.float64) + delta
            out[key] = np.asarray(new, dtype=ref.dtype).reshape(ref.shape)  # a 0-d sum is a numpy scalar
        return out

    def _accepted(self, reply: Message, expected: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """The update in `reply`, unpacked, or None and why it is refused: weights that cannot
        be read, metrics without an example count, or `aggregation.check_update` against
        `expected` (the global model's shared groups for the phase)."""
        try:
            arrays = records.from_array_record(reply.content[records.WEIGHTS], self.cfg.update_encoding)
        except Exception as exc:  # a foreign or corrupt buffer: refused, never fatal to the round
            return None, f"its weights could not be read: {type(exc).__name__}: {exc}"
        n_ex = reply.content[records.METRICS].get(names.M_EXAMPLES) if records.METRICS in reply.content else None
        if isinstance(n_ex, bool) or not isinstance(n_ex, int) or n_ex < 0:
            return None, f"its example count {n_ex!r} is not an integer >= 0"
        why = check_update(arrays, expected)
        return (None, why) if why else (arrays, None)

    def _final_evaluation(self, trained: Trained) -> None:
        """Score the run's last global model: an exchange of its own, as no round follows."""
        nodes = self._hospital_nodes()
        config = {"phase": trained.phase, "round": trained.round, "evaluate-phase": trained.phase, "evaluate-round": trained.round}
        local = self.cfg.register_local_models and trained.phase == names.PHASE_FINETUNE and self.registry is not None
        if local:
            config["send-local-model"] = True
        msgs, sent = self._messages(nodes, MessageType.EVALUATE, config, (trained.phase,), f"{trained.phase}-{trained.round}-eval")
        t_eval = time.monotonic()
        replies, missing = self._exchange(msgs)
        t_eval = time.monotonic() - t_eval
        for n in missing:
            log.warning("hospital %s did not answer the evaluation of %s round %d", self.hospitals[n].name, trained.phase, trained.round)
        for node, reply in sorted(replies.items()):
            if reply.has_error():
                log.warning("hospital %s failed to evaluate %s round %d: %s", self.hospitals[node].name, trained.phase,
                            trained.round, reply.error.reason)
        trained.bytes_sent += sent
        record = self._finish(trained, *self._evaluations(replies, trained), evaluated_in="a final evaluation", evaluate_seconds=t_eval)
        if local:
            self._register_local_models(replies, record)

    def _register_local_models(self, replies: dict[int, Message], record: dict) -> None:
        """Each hospital's local-only classifier from the final evaluation's `replies`
        (register-local-models), registered as fedssl-local-<hospital> with the scores it got
        on its hospital's own held-out images and the global version it was trained beside.
        A hospital that sent none, or sent something that is not the federation's
        classifier, is logged and recorded on the run; the others are registered."""
        assert self.registry is not None
        by_node = {node: self.hospitals[node].name for node in replies}
        model_names = local_models.model_names(self._hospital_names())
        source, synthetic = self._data_facts()
        global_version = self.registered.get(names.CLASSIFIER_MODEL)
        for node, reply in sorted(replies.items(), key=lambda item: by_node[item[0]]):
            name = by_node[node]
            if reply.has_error() or records.LOCAL_WEIGHTS not in reply.content:
                why = f"its reply failed: {reply.error.reason}" if reply.has_error() else "its reply carried no local-only model"
                self.local_models[name] = {"error": why}
                _progress("hospital %s: local-only model not registered: %s", name, why)
                continue
            try:
                arrays = records.from_array_record(reply.content[records.LOCAL_WEIGHTS], self.cfg.update_encoding)
                state = local_models.classifier_state(arrays, self.state)
            except ValueError as exc:
                self.local_models[name] = {"error": f"refused: {exc}"}
                _progress("hospital %s: local-only model refused, not registered: %s", name, exc)
                continue
            model_name = model_names[name]
            metrics = local_models.scores(record["hospitals"].get(name, {}))
            self.registry.ensure_model(
                model_name, task=names.TASK_CLASSIFICATION, architecture=self.cfg.arch, input_spec=self._input_spec(),
                description=f"hospital {name}'s local-only classifier: trained on its own images alone, beside the "
                            "federated fedssl-classifier (register-local-models)")
            meta = self._weights_meta(names.TASK_CLASSIFICATION, record["phase"], record["round"]) | {"fedssl.local_only": name}
            version = self.registry.upload_version(model_name, weights.to_bytes(state, meta), {
                "tags": {"kind": "local-only", "hospital": name, "phase": record["phase"], "round": str(record["round"]),
                         **({"warning": " | ".join(self.warnings)} if self.warnings else {})},
                "lineage": {"run_id": self.run_id, "round": record["round"], "phase": record["phase"], "hospitals": [name],
                            "local_only": True, "hospital": name, "metrics": _finite(metrics),
                            "scored_on": f"{name}'s own held-out images",
                            "global_model": {"name": names.CLASSIFIER_MODEL, "version": global_version},
                            "recipe": self._recipe(), "budget": self._budget(record["phase"], recorded=True)},
                "data_source": source,
                "synthetic_data": synthetic,
            })
            self.local_models[name] = {"model": model_name, "version": int(version["version"]),
                                       "global_model": {"name": names.CLASSIFIER_MODEL, "version": global_version}}
            _progress("registered hospital %s's local-only classifier as %s version %d", name, model_name, int(version["version"]))

    def _finish(self, t: Trained, scores: dict[str, dict], test_examples: dict[str, int], *, evaluated_in: str,
                evaluate_seconds: float = 0.0) -> dict:
        """Round `t`'s record, now that its global model is scored: the run folder, the
        registry's round metrics and model versions, the progress line."""
        per_hospital = {h: dict(m) for h, m in t.per_hospital.items()}
        for h, m in scores.items():
            per_hospital.setdefault(h, {}).update(m)
        eval_part = {h: {k: v for k, v in m.items() if not (k.startswith(names.LOCAL_ONLY_PREFIX) and isinstance(v, list))}
                     for h, m in scores.items()}
        aggregated = aggregate_metrics(t.per_hospital, t.examples, self.class_names)
        aggregated.update(aggregate_metrics(eval_part, test_examples, self.class_names))
        # Per-SSL-task losses average over the hospitals running that task only.
        for task in names.SSL_TASKS:
            key = names.ssl_loss_key(task)
            vals = [(m[key], t.examples[h]) for h, m in t.per_hospital.items() if m.get(key) is not None]
            if vals and sum(w for _, w in vals):
                aggregated[key] = sum(v * w for v, w in vals) / sum(w for _, w in vals)

        phase, rnd = t.phase, t.round
        aggregated = _finite(aggregated)
        record = {
            "phase": phase, "round": rnd, "aggregated": aggregated, "hospitals": _finite(per_hospital),
            "examples": t.examples, "failed_hospitals": t.failed, "skipped_hospitals": t.skipped, "refused_hospitals": t.refused,
            "duration_seconds": t.seconds + evaluate_seconds,
            "bytes_sent": t.bytes_sent, "bytes_received": t.bytes_received,
            "timing": {"train_seconds": t.train_seconds, "aggregate_seconds": t.aggregate_seconds,
                       "evaluate_seconds": evaluate_seconds, "evaluated_in": evaluated_in},
        }
        if t.privacy:
            record["privacy"] = t.privacy
        if t.update_norms:
            record["update_norms"] = t.update_norms
        if t.secure_aggregation:
            record["secure_aggregation"] = t.secure_aggregation
        self.folder.save_weights(phase, rnd, t.state, {"fedssl.arch": self.cfg.arch, "fedssl.phase": phase, "fedssl.round": str(rnd),
                                                       "fedssl.run_id": self.run_id})
        t_reg = time.monotonic()
        try:
            if self.registry is not None:
                self.registry.post_round(self.run_id, {k: record[k] for k in ("phase", "round", "aggregated", "hospitals", "examples",
                                                                              "skipped_hospitals", "refused_hospitals",
                                                                              "duration_seconds", "bytes_sent",
                                                                              "bytes_received", "privacy") if k in record})
            self._register(t.state, phase, rnd, aggregated, sorted(t.examples), t.privacy)
        finally:  # the round is on disk even when the registry is unreachable
            record["timing"]["register_seconds"] = time.monotonic() - t_reg
            self.folder.append_round(record)
        self.history.append(record)
        loss = aggregated.get(names.M_FINETUNE_LOSS if phase == names.PHASE_FINETUNE else names.M_LOSS)
        _progress("phase=%s round=%d/%d hospitals=%d loss=%s balanced_accuracy=%s macro_auc=%s (%.1fs)",
                  phase, rnd, t.total, len(t.examples), _fmt(loss), _fmt(aggregated.get(names.M_BALANCED_ACCURACY)),
                  _fmt(aggregated.get(names.M_MACRO_AUC)), t.seconds + evaluate_seconds)
        if t.privacy:
            p = t.privacy
            _progress("phase=%s round=%d privacy: epsilon=%.4f spent in total (+%.4f this round) at delta=%g after %d release(s); "
                      "noise multiplier %g, clipping norm %g%s", phase, rnd, p["epsilon"], p["round_epsilon"], p["delta"],
                      p["releases"], p["noise_multiplier"], p["clipping_norm"],
                      (f" (next round's {p['next_clipping_norm']:.4g})" if "next_clipping_norm" in p else "")
                      + (f", budget {p['max_epsilon']:g}" if p.get("max_epsilon") else ""))
        return record

    # ---------------------------------------------------------------- resume
    def _resume_point(self) -> tuple[str, int] | None:
        """The (phase, round) of the newest registered checkpoint, with its weights loaded."""
        if self.registry is None:
            raise ConfigError("resume-from-registry needs a registry: set FEDSSL_REGISTRY_URL or registry-url")
        best = None
        order = {names.PHASE_SSL: 0, names.PHASE_FINETUNE: 1}
        for model_name in (names.CLASSIFIER_MODEL, names.ENCODER_MODEL):
            for v in self.registry.versions(model_name):
                lin = v.get("lineage") or {}
                if lin.get("phase") not in order:
                    continue
                key = (order[lin["phase"]], int(lin.get("round", 0)), model_name == names.CLASSIFIER_MODEL)
                if best is None or key > best[0]:
                    best = (key, model_name, v)
        if best is None:
            return None
        _, model_name, v = best
        state = weights.from_bytes(self.registry.download(model_name, int(v["version"])))
        for k, t in state.items():
            if k in self.state and self.state[k].shape == t.shape:
                self.state[k] = t
        lin = v["lineage"]
        _progress("resuming from %s version %s (%s round %s of run %s)", model_name, v["version"], lin["phase"], lin["round"], lin.get("run_id"))
        return lin["phase"], int(lin["round"])

    # ---------------------------------------------------------------- run
    def summary(self, status: str, error: str | None = None) -> dict:
        last = {p: next((r["aggregated"] for r in reversed(self.history) if r["phase"] == p), None) for p in names.PHASES}
        return {
            "run_id": self.run_id, "status": status, "error": error,
            "model": {"arch": self.cfg.arch, "image_size": self.cfg.image_size, "num_classes": len(self.class_names),
                      "finetune_mode": self.cfg.finetune_mode, "share": self.cfg.share},
            "classes": self.class_names,
            "data": self._data_facts()[0], "synthetic_data": self._data_facts()[1], "warnings": self.warnings,
            "hospitals": {h.name: {"ssl_task": h.ssl_task, "audit": h.audit} for h in self.hospitals.values()},
            "rounds_done": len(self.history), "final_metrics": last, "registered": self.registered, "local_models": self.local_models,
            **({"privacy": self.aggregation.privacy_spent()} if self.aggregation.privacy_spent() else {}),
            "config": self.cfg.as_dict(), "started_at": self.started, "finished_at": _now(),
        }

    def _record_failure(self, error: str, registry: RegistryClient | None) -> None:
        """The run's end as failed, with `error`: run folder, registry (when reachable), log."""
        self.finished = True
        self.folder.write_summary(self.summary("failed", error))
        if registry is not None:
            try:
                registry.put_run(self.run_id, self._run_body("failed", error))
            except Exception as reg_exc:  # the run's own error matters more
                log.error("could not record the failure in the registry: %s", reg_exc)
        _progress("run %s FAILED: %s", self.run_id, error)

    def _stopped(self) -> None:
        """Flower's exit handler: a stop signal (the SuperLink shutting down, `flwr stop`) ends
        this process without unwinding `run`, so the stop is recorded here, with its round."""
        if self.finished:
            return
        # A client of its own: the signal may have interrupted the run's client mid-request.
        registry = RegistryClient.from_environment(self.cfg.registry, retries=1, timeout=3.0) if self.registry is not None else None
        try:
            self._record_failure(f"stopped during {self.where}: the aggregator got a stop signal (the SuperLink shut down, "
                                 "or the run was stopped); the registered rounds are kept: resubmit with "
                                 "resume-from-registry=true to continue after the newest", registry)
        finally:
            if registry is not None:
                registry.close()

    def _train(self, schedule: list[tuple[str, int, int]]) -> Trained | None:
        """Run `schedule`'s rounds; returns the last one (scored by the final evaluation). With
        dp and dp-max-epsilon, Flower refuses a round whose release would pass the budget before
        it is sent: the run stops there, as succeeded with a warning, its last round's model the
        one the final evaluation scores and the production alias gets."""
        trained = None
        for phase, rnd, total in schedule:
            self.where = f"{phase} round {rnd}"
            try:
                trained = self._round(phase, rnd, total, trained)
            except PrivacyBudgetExhausted as exc:
                spent = self.aggregation.privacy_spent()
                if trained is None:
                    raise RunFailed(f"privacy budget dp-max-epsilon={self.cfg.dp_max_epsilon:g} allows no round: {exc}") from exc
                done = f"{trained.phase} round {trained.round}"
                warning = (f"privacy budget reached: stopped before {phase} round {rnd} of the planned schedule, as its release "
                           f"would pass dp-max-epsilon={self.cfg.dp_max_epsilon:g} (spent: epsilon={spent['epsilon']:.4f} at "
                           f"delta={spent['delta']:g} after {spent['releases']} rounds); the last model is {done}'s")
                self.warnings.append(warning)
                _progress("run %s: %s", self.run_id, warning)
                break
            if self.history:
                self.folder.write_summary(self.summary("running"))
                if self.registry is not None:
                    self.registry.put_run(self.run_id, self._run_body("running"))
        return trained

    def run(self) -> None:
        add_exit_handler(self._stopped)
        try:
            nodes = self._wait_for_hospitals()
            self._describe(nodes, strict=True)
            if self.registry is not None:
                self.registry.put_run(self.run_id, self._run_body("running"))
            self._init_model()
            if any(h.audit.get("synthetic_data") for h in self.hospitals.values()):
                self.warnings.append("trained on SYNTHETIC images: not a model of real data")
            start = (names.PHASE_SSL, 0)
            if self.cfg.resume_from_registry:
                start = self._resume_point() or start
            schedule = [(names.PHASE_SSL, r, self.cfg.ssl_rounds) for r in range(1, self.cfg.ssl_rounds + 1)]
            schedule += [(names.PHASE_FINETUNE, r, self.cfg.finetune_rounds) for r in range(1, self.cfg.finetune_rounds + 1)]
            order = {names.PHASE_SSL: 0, names.PHASE_FINETUNE: 1}
            schedule = [s for s in schedule if (order[s[0]], s[1]) > (order[start[0]], start[1])]
            _progress("run %s: %d SSL + %d fine-tune rounds, %d hospitals (%s)", self.run_id, self.cfg.ssl_rounds,
                      self.cfg.finetune_rounds, len(self._hospital_names()), ", ".join(self._hospital_names()))
            self.aggregation.population = len(self._hospital_names())  # dp: the accountant's population
            trained = self._train(schedule)
            if trained is not None:
                self.where = "the final evaluation"
                self._final_evaluation(trained)
            if self.registry is not None:
                for model_name, version in self.registered.items():
                    self.registry.set_alias(model_name, self.cfg.production_alias, version)
                    _progress("registered %s version %d as '%s'", model_name, version, self.cfg.production_alias)
                for entry in self.local_models.values():
                    if "model" in entry:
                        self.registry.set_alias(entry["model"], self.cfg.production_alias, entry["version"])
                self.registry.put_run(self.run_id, self._run_body("succeeded"))
            self.finished = True
            self.folder.write_summary(self.summary("succeeded"))
            _progress("run %s succeeded; run folder %s", self.run_id, self.folder.path)
        except Exception as exc:
            self._record_failure(f"{type(exc).__name__}: {exc}", self.registry)
            raise
        finally:
            if self.registry is not None:
                self.registry.close()


def _secure_summary(secure: secure_aggregation.SecureResult) -> dict:
    """What a secure round's record keeps: the protocol's parameters, each stage's cost, who
    dropped out where (by node id; hospital names are in the round's failed list)."""
    return {"protocol": "SecAgg+ (Flower)", "num_shares": secure.num_shares, "reconstruction_threshold": secure.threshold,
            "dropped": {str(n): why for n, why in sorted(secure.dropped.items())},
            "stages": [{k: v for k, v in s.items() if k not in ("errors", "missing")} for s in secure.stages],
            "seconds": round(sum(s["seconds"] for s in secure.stages), 3)}


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("n/a" if value is None else str(value))


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Flower ships this process's logs to the SuperLink over HTTP; logging every one of those
    # requests would feed the log stream with itself.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = RunConfig.from_mapping(context.run_config)
    Aggregator(grid, cfg, str(context.run_id)).run()
