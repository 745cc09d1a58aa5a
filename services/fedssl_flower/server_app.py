"""The aggregator: a Flower ServerApp running federated SSL rounds, then federated fine-tuning.

This module is the phase loop; each of its parts has a module of its own:
- `messaging`: the SuperLink (Grid calls retried, replies paired with their nodes, re-sends);
- `hospitals`: who joined, on which node, with what data (start-up audit, reconnects);
- `aggregation`: Flower's strategy classes, on the accepted updates (`secure_aggregation`:
  Flower's SecAgg+ when `secure-aggregation = true`);
- `reporting`: each round's record (run folder, registry metrics, model versions with their
  lineage), the run's summary and the progress lines.

The round loop talks to hospitals only through Messages. One exchange per round: the train
message carries the previous round's global model, which each hospital scores on its held-out
split (with its local-only baseline) before it trains; the replies bring those scores and the
update (only the shared groups). So each round: finish the previous round's record →
aggregate this round's updates. The last model is scored by one evaluate exchange at the end.
Two exchanges per round would pay Flower's fixed cost (a ClientApp process per message, the
model through the SuperLink) twice. strategy=cyclic (cyclic weight transfer) is the exception:
a round is an evaluate exchange of the previous round's model with every hospital, then one
train exchange per hospital in turn, each carrying the model the hospital before returned.

Environment of the SuperLink (inherited by this process): FEDSSL_REGISTRY_URL,
FEDSSL_REGISTRY_TOKEN, FEDSSL_RUNS_DIR.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import add_exit_handler

from fedssl_core import hospital_batchnorm, names, weights
from fedssl_core.errors import WeightsError

from . import local, records, secure_aggregation, training
from .aggregation import Aggregation, PrivacyBudgetExhausted, check_update, update_norm
from .config import RunConfig
from .errors import ConfigError, RunFailed
from .hospitals import Hospitals
from .messaging import Messenger
from .registry_client import RegistryClient
from .reporting import RunReport, Trained, progress, secure_summary
from .strategy import relay_order

log = logging.getLogger("fedssl.aggregator")
# What a round makes of a hospital's train reply (`Aggregator._judge`).
FAILED, SKIPPED, REFUSED, TRAINED = "failed", "skipped", "refused", "trained"
# Strategies whose server step keeps state between rounds (not registered: a resumed run restarts it).
STATEFUL_STRATEGIES = (names.STRATEGY_FEDAVGM, names.STRATEGY_FEDADAM, names.STRATEGY_FEDYOGI, names.STRATEGY_FEDADAGRAD)

app = ServerApp()


class Aggregator:
    """One run: waits for the hospitals, then trains the schedule's rounds (SSL, then
    fine-tuning) and scores the last model; `messenger` sends, `hospitals` knows who is in,
    `aggregation` combines the updates, `report` records every round and the run's end."""

    def __init__(self, grid: Grid, cfg: RunConfig, run_id: str) -> None:
        self.cfg, self.run_id = cfg, run_id
        self.messenger = Messenger(grid, cfg)
        self.hospitals = Hospitals(self.messenger, cfg)
        self.report = RunReport(cfg, run_id, self.hospitals)  # the run folder, the registry client
        self.state: dict[str, torch.Tensor] = {}
        self.where, self.finished = "start-up", False  # where the run is, for a stop signal's record
        # Flower's strategy for `strategy` (and fedssl's server step for fedavg); its state
        # (momentum, moments) is not checkpointed: a resumed run restarts it.
        self.aggregation = Aggregation(cfg)

    # ---------------------------------------------------------------- model
    def _init_model(self) -> None:
        model = local.new_model(self.cfg, len(self.hospitals.class_names))
        self.state = {k: v.clone() for k, v in model.state_dict().items()}

    # ---------------------------------------------------------------- rounds
    def _messages(self, nodes: list[int], message_type: str, config: dict, phases: tuple[str, ...],
                  group_id: str, state: dict[str, torch.Tensor] | None = None) -> tuple[list[Message], int]:
        """One message per node with the global model's groups that `phases` share (the whole
        model at first contact) and `config`; returns them and the bytes of their weights.
        `state`: another model to send instead of the global one (strategy=cyclic's relay)."""
        groups = tuple(dict.fromkeys(g for p in phases for g in training.shared_groups(p, self.cfg.share, self.cfg.finetune_mode)))
        packed: dict[bool, ArrayRecord] = {}  # packed once per variant (shared groups, whole model), not per node
        msgs, sent = [], 0
        for n in nodes:
            known = n in self.hospitals.nodes_with_model
            if known not in packed:
                arrays = records.state_arrays(self.state if state is None else state, groups if known else None)
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
            m = records.from_metric_record(reply.content[records.EVAL_METRICS], len(self.hospitals.class_names))
            m["test_loss"] = m.pop(names.M_LOSS, None)
            if records.LOCAL_EVAL_METRICS in reply.content:
                local = records.from_metric_record(reply.content[records.LOCAL_EVAL_METRICS], len(self.hospitals.class_names))
                for k in (names.M_ACCURACY, names.M_BALANCED_ACCURACY, names.M_MACRO_AUC, names.M_F1, names.M_CONFUSION_MATRIX,
                          *names.GENERATIVE_SCORES):
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
        finished here), and whose replies are averaged into this round's global model.
        strategy=cyclic: the hospitals score the previous model in an evaluate exchange of
        their own, then train one after another (`_relay`)."""
        t0 = time.monotonic()
        nodes = self.hospitals.connected()
        relay = self.cfg.strategy == names.STRATEGY_CYCLIC
        config: dict[str, Any] = {"phase": phase, "round": rnd}
        phases: tuple[str, ...] = (phase,)
        if previous is not None and not relay:
            config |= {"evaluate-phase": previous.phase, "evaluate-round": previous.round}
            phases = (phase, previous.phase)
        expected = records.state_arrays(self.state, training.shared_groups(phase, self.cfg.share, self.cfg.finetune_mode))
        # What the strategy adds to the train config (FedProx: proximal-mu); it sees the current model.
        config |= self.aggregation.configure(phase, rnd, expected, nodes)
        if relay and previous is not None:  # its time is the previous round's record's, not this round's
            self._evaluate(previous, f"an evaluation before {phase} round {rnd}")
            t0, nodes = time.monotonic(), self.hospitals.connected()
        msgs, bytes_sent = ([], 0) if relay else self._messages(nodes, MessageType.TRAIN, config, phases, f"{phase}-{rnd}")
        t_send = time.monotonic()
        secure, sent_to, judged = None, {}, {}
        if relay:
            replies, missing, bytes_sent, sent_to, judged = self._relay(nodes, config, phase, rnd, expected)
        elif self.cfg.secure_aggregation:  # four exchanges of Flower's SecAgg+; the collect stage's replies are the round's
            secure = self._secure_exchange(msgs, phase, rnd, expected)
            replies = secure.replies
            missing = [n for n in nodes if n not in replies]
            bytes_sent = sum(s["bytes_sent"] for s in secure.stages)
        else:
            replies, missing = self.messenger.exchange(msgs)
        t_train = time.monotonic() - t_send
        if previous is not None and not relay:
            self.report.finish(previous, *self._evaluations(replies, previous), evaluated_in=f"{phase} round {rnd}")

        updates, per_hospital, examples, failed, skipped, refused, norms = [], {}, {}, [], {}, {}, {}
        bytes_received = 0
        for node, reply in (replies.items() if relay else sorted(replies.items())):  # cyclic: in the order they trained
            name = self.hospitals[node].name
            given = sent_to.get(node, expected)  # the model it trained from (cyclic: the previous hospital's)
            verdict, arrays, why = judged[node] if node in judged else self._judge(reply, given, secure is not None)
            if verdict == FAILED:
                failed.append(name)
                log.warning("hospital %s failed %s round %d: %s", name, phase, rnd, why)
                continue
            if verdict == SKIPPED:  # could not train: says why
                skipped[name] = why
                progress("%s round %d: hospital %s left out: %s", phase, rnd, name, why)
                continue
            if secure is None:
                bytes_received += reply.content[records.WEIGHTS].count_bytes()
            if verdict == REFUSED:  # garbage never reaches the strategy; the round goes on with the others
                refused[name] = why
                progress("%s round %d: hospital %s's update refused: %s", phase, rnd, name, why)
                continue
            if secure is None:
                norms[name] = update_norm(arrays, given)
            m = records.from_metric_record(reply.content[records.METRICS], len(self.hospitals.class_names))
            n_ex = int(m.get(names.M_EXAMPLES, 0))
            updates.append((node, arrays, n_ex))
            examples[name] = n_ex
            per_hospital[name] = m
            if records.LOCAL_METRICS in reply.content:
                local = records.from_metric_record(reply.content[records.LOCAL_METRICS], len(self.hospitals.class_names))
                per_hospital[name][names.LOCAL_ONLY_PREFIX + names.M_LOSS] = local.get(names.M_LOSS)
            self.hospitals.nodes_with_model.add(node)
        failed += [self.hospitals[n].name for n in missing]
        if len(updates) < self.cfg.min_hospitals:
            raise RunFailed(
                f"{phase} round {rnd}: only {len(updates)} hospital(s) trained (failed or timed out: "
                f"{', '.join(failed) or 'none'}; could not train: "
                f"{'; '.join(f'{h}: {why}' for h, why in skipped.items()) or 'none'}; refused: "
                f"{'; '.join(f'{h}: {why}' for h, why in refused.items()) or 'none'}); min-hospitals is {self.cfg.min_hospitals}"
            )
        for name in failed:
            progress("%s round %d: hospital %s did not answer; %s the %d others", phase, rnd, name,
                     "relayed the model past it to" if relay else "aggregating", len(updates))
        t_agg = time.monotonic()
        if secure is not None:
            bytes_received = sum(s["bytes_received"] for s in secure.stages)
            new = self.aggregation.aggregate_average(phase, rnd, expected, self._secure_average(secure, expected),
                                                     [node for node, _, n in updates if n > 0])
        else:
            new = self.aggregation.aggregate(phase, rnd, expected, updates)
        facts = self._strategy_facts(phase, rnd)
        for key, value in new.items():
            self.state[key] = torch.from_numpy(np.asarray(value)).to(self.state[key].dtype).reshape(self.state[key].shape)
        t_agg = time.monotonic() - t_agg
        return Trained(phase, rnd, total, {k: v.clone() for k, v in self.state.items()}, per_hospital, examples, failed, skipped,
                       refused, bytes_sent, bytes_received, t_train, t_agg, time.monotonic() - t0, self.aggregation.privacy_spent(),
                       {"hospitals": norms, "global": update_norm(new, expected), **facts},
                       None if secure is None else secure_summary(secure))

    def _relay(self, nodes: list[int], config: dict[str, Any], phase: str, rnd: int, expected: dict[str, Any]
               ) -> tuple[dict[int, Message], list[int], int, dict[int, dict[str, Any]], dict[int, tuple[str, Any, str | None]]]:
        """strategy=cyclic (cyclic weight transfer, Chang et al. 2018): the round's train
        messages one at a time, in `strategy.relay_order` of the hospitals' names. The first
        hospital gets the global model (`expected`: the phase's shared groups); each next one
        the model the one before it returned, once accepted; a hospital that fails, cannot
        train or is refused passes on the model it was given. Returns the replies in the order
        the hospitals trained, the nodes that never answered, the bytes sent, the model each
        hospital was sent (what its update is checked and measured against) and `_judge`'s
        verdict on each reply (so the round's loop does not unpack an update twice)."""
        order = relay_order(sorted(nodes, key=lambda n: (self.hospitals[n].name, n)), self.cfg.seed, phase, rnd)
        progress("%s round %d: cyclic, the model goes %s", phase, rnd, " -> ".join(self.hospitals[n].name for n in order))
        baton, replies, missing, sent_to, judged, sent = expected, {}, [], {}, {}, 0
        for i, node in enumerate(order, 1):
            state = self.state | {k: torch.as_tensor(np.array(v)).to(self.state[k].dtype).reshape(self.state[k].shape)
                                  for k, v in baton.items()}
            msgs, size = self._messages([node], MessageType.TRAIN, config, (phase,), f"{phase}-{rnd}", state)
            sent, sent_to[node] = sent + size, baton
            got, lost = self.messenger.exchange(msgs)
            replies |= got
            missing += lost
            if node not in got:
                continue  # reported with the round's replies; the model goes on as it came
            judged[node] = self._judge(got[node], baton, secure=False)
            if judged[node][0] == TRAINED:
                baton = judged[node][1]
                progress("%s round %d: hospital %s trained (%d of %d)", phase, rnd, self.hospitals[node].name, i, len(order))
        return replies, missing, sent, sent_to, judged

    def _strategy_facts(self, phase: str, rnd: int) -> dict:
        """What the round's strategy decided about each update, by hospital (median-cosine: its
        cosine with the others' median update, and who was left out), for the round record."""
        facts = self.aggregation.facts
        if not facts:
            return {}
        out = {"cosines": {self.hospitals[n].name: c for n, c in facts["cosines"].items()},
               "left_out": sorted(self.hospitals[n].name for n in facts["left_out"])}
        progress("%s round %d: %s: cosine to the others' median update %s%s", phase, rnd, self.cfg.strategy,
                 ", ".join(f"{h} {c:+.3f}" for h, c in sorted(out["cosines"].items())),
                 f"; left out: {', '.join(out['left_out'])}" if out["left_out"] else "")
        return out

    def _secure_exchange(self, msgs: list[Message], phase: str, rnd: int, expected: dict[str, Any]) -> secure_aggregation.SecureResult:
        """The round's train exchange as Flower's SecAgg+ (`secure_aggregation.SecureRound`):
        the weighted average of the hospitals' updates, never one hospital's."""
        keys = secure_aggregation.update_keys(expected, phase, self.cfg)
        by_node = {m.metadata.dst_node_id: m for m in msgs}
        max_weight = max([int(self.hospitals[n].audit.get("train_examples", 0) or 0) for n in by_node] + [1])
        result = secure_aggregation.SecureRound(self.cfg).run(
            self.messenger.exchange, {n: m.content for n, m in by_node.items()}, keys, {k: expected[k].shape for k in keys}, rnd, max_weight)
        for node, why in sorted(result.dropped.items()):
            progress("%s round %d: hospital %s dropped out of secure aggregation at %s", phase, rnd, self.hospitals[node].name, why)
        if result.average is None:  # below the reconstruction threshold: no sum to unmask, the round fails
            raise RunFailed(
                f"{phase} round {rnd}: secure aggregation halted at its {result.halted_at} stage: too few hospitals left to "
                f"unmask the sum (reconstruction threshold {result.threshold} of {result.num_shares} shares; dropped: "
                + ("; ".join(sorted(f"{self.hospitals[n].name} ({why})" for n, why in result.dropped.items())) or "none")
                + "); the global model stays at the previous round's")
        return result

    def _secure_average(self, secure: secure_aggregation.SecureResult, expected: dict[str, Any]) -> dict[str, Any]:
        """The hospitals' example-weighted average model: the global one plus the unmasked
        average update."""
        out = {}
        for key, value in expected.items():
            ref = np.asarray(value)
            delta = secure.average[key].reshape(ref.shape)
            new = np.rint(delta) + ref if np.issubdtype(ref.dtype, np.integer) else ref.astype(np.float64) + delta
            out[key] = np.asarray(new, dtype=ref.dtype).reshape(ref.shape)  # a 0-d sum is a numpy scalar
        return out

    def _judge(self, reply: Message, given: dict[str, Any], secure: bool) -> tuple[str, Any, str | None]:
        """What a round makes of one hospital's train reply, as (verdict, update, why):
        FAILED (an error reply), SKIPPED (it could not train, and says why), REFUSED
        (`_accepted` turned its update down) or TRAINED with its unpacked update (an empty
        dict under secure aggregation, whose updates are only ever summed masked)."""
        if reply.has_error():
            return FAILED, None, reply.error.reason
        info = reply.content[records.INFO] if records.INFO in reply.content else {}
        if records.SKIPPED in info or (not secure and records.WEIGHTS not in reply.content):
            return SKIPPED, None, str(info.get(records.SKIPPED, "its reply carried no weights"))
        if secure:
            return TRAINED, {}, None
        arrays, why = self._accepted(reply, given)
        return (REFUSED, None, str(why)) if arrays is None else (TRAINED, arrays, None)

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
        self._evaluate(trained, "a final evaluation", final=True)

    def _evaluate(self, trained: Trained, evaluated_in: str, final: bool = False) -> None:
        """Score `trained`'s global model in an evaluate exchange and finish its record (the
        final round's; with strategy=cyclic every round's, before the next one's relay)."""
        nodes = self.hospitals.connected()
        config = {"phase": trained.phase, "round": trained.round, "evaluate-phase": trained.phase, "evaluate-round": trained.round}
        local = final and self.cfg.register_local_models and trained.phase == names.PHASE_FINETUNE and self.report.registry is not None
        if local:
            config["send-local-model"] = True
        statistics = final and self.cfg.hospital_batchnorm and trained.phase == names.PHASE_FINETUNE
        if statistics:
            config["send-batchnorm-statistics"] = True
            counts = self.report.label_counts()
            if counts:  # each hospital also scores the classifier as :predict?hospital= will serve it
                config[records.FEDERATION_LABEL_COUNTS] = json.dumps([int(sum(c)) for c in zip(*counts.values())])
        msgs, sent = self._messages(nodes, MessageType.EVALUATE, config, (trained.phase,), f"{trained.phase}-{trained.round}-eval")
        t_eval = time.monotonic()
        replies, missing = self.messenger.exchange(msgs)
        t_eval = time.monotonic() - t_eval
        for n in missing:
            log.warning("hospital %s did not answer the evaluation of %s round %d", self.hospitals[n].name, trained.phase, trained.round)
        for node, reply in sorted(replies.items()):
            if reply.has_error():
                log.warning("hospital %s failed to evaluate %s round %d: %s", self.hospitals[node].name, trained.phase,
                            trained.round, reply.error.reason)
        trained.bytes_sent += sent
        record = self.report.finish(trained, *self._evaluations(replies, trained), evaluated_in=evaluated_in,
                                    evaluate_seconds=t_eval,
                                    hospital_stats=self._hospital_statistics(replies) if statistics else None,
                                    served=self._served_scores(replies) if statistics else None)
        if local:
            self.report.register_local_models(replies, record, self.state)

    def _hospital_statistics(self, replies: dict[int, Message]) -> dict[str, hospital_batchnorm.Statistics] | None:
        """Every hospital's BatchNorm statistics from the final evaluation's `replies`
        (hospital-batchnorm), each checked against the global model's layers; None, with a run
        warning naming the hospitals and why, unless every hospital sent them: a classifier
        serves each hospital its own statistics or none at all."""
        expected = {k: v for k, v in self.state.items()
                    if k.startswith("encoder.") and k.endswith(tuple(f".{s}" for s in hospital_batchnorm.STATISTICS))}
        nodes: dict[str, list[int]] = {}  # a hospital that reconnected has had more than one node
        for node, h in self.hospitals.items():
            nodes.setdefault(h.name, []).append(node)
        stats, problems = {}, []
        for name, own in sorted(nodes.items()):
            answered = [replies[n] for n in own if n in replies]
            reply = next((r for r in answered if not r.has_error() and records.HOSPITAL_BATCHNORM in r.content), None)
            if reply is None:
                failed = next((r for r in answered if r.has_error()), None)
                problems.append(f"{name}: " + (f"its reply failed ({failed.error.reason})" if failed is not None
                                               else "its reply carried none" if answered else "no reply"))
                continue
            try:
                got = {k: torch.from_numpy(np.array(v)) for k, v in records.from_array_record(reply.content[records.HOSPITAL_BATCHNORM]).items()}
                hospital_batchnorm.check(expected, {name: got})
            except (ValueError, WeightsError) as exc:
                problems.append(f"{name}: refused ({exc})")
                continue
            stats[name] = got
        if problems:
            warning = ("hospital-batchnorm: the classifier carries no hospital's BatchNorm statistics, as not every hospital "
                       "sent valid ones (" + "; ".join(problems) + "); :predict?hospital= serves the shared statistics")
            self.report.warnings.append(warning)
            progress("run %s: %s", self.run_id, warning)
            return None
        progress("run %s: every hospital's BatchNorm statistics received (%s); the classifier serves each its own",
                 self.run_id, ", ".join(sorted(stats)))
        return stats

    def _served_scores(self, replies: dict[int, Message]) -> dict[str, dict]:
        """Each hospital's scores of the final classifier as `:predict?hospital=` serves it
        (its own statistics and label prior, at every grid temperature; `local.score_as_served`)
        from the final evaluation's `replies`, by hospital. A malformed one is left out with a
        warning naming the hospital."""
        k, grid = len(self.hospitals.class_names), len(names.TEMPERATURE_GRID)
        out = {}
        for node, reply in sorted(replies.items()):
            if reply.has_error() or records.SERVED_EVAL_METRICS not in reply.content:
                continue
            name = self.hospitals[node].name
            m = reply.content[records.SERVED_EVAL_METRICS]
            confusion = np.asarray(m.get(names.M_SERVED_CONFUSION_BY_TEMPERATURE, []), dtype=np.float64)
            auc = m.get(names.M_SERVED_MACRO_AUC_BY_TEMPERATURE)
            if (confusion.size != grid * k * k or (confusion < 0).any() or confusion.sum() == 0
                    or (auc is not None and len(auc) != grid)):
                log.warning("hospital %s: its scores as served are malformed (expected %d confusion matrices of %d x %d "
                            "and %d macro AUCs); left out", name, grid, k, k, grid)
                continue
            out[name] = {names.M_SERVED_CONFUSION_BY_TEMPERATURE: confusion.reshape(grid, k, k).astype(np.int64),
                         names.M_SERVED_MACRO_AUC_BY_TEMPERATURE: None if auc is None else [float(a) for a in auc]}
        return out

    # ---------------------------------------------------------------- resume
    def _resume_point(self) -> tuple[str, int] | None:
        """The (phase, round) of the newest registered checkpoint, with its weights loaded."""
        registry = self.report.registry
        if registry is None:
            raise ConfigError("resume-from-registry needs a registry: set FEDSSL_REGISTRY_URL or registry-url")
        best = None
        order = {names.PHASE_SSL: 0, names.PHASE_FINETUNE: 1}
        for model_name in (names.CLASSIFIER_MODEL, names.ENCODER_MODEL):
            for v in registry.versions(model_name):
                lin = v.get("lineage") or {}
                if lin.get("phase") not in order:
                    continue
                key = (order[lin["phase"]], int(lin.get("round", 0)), model_name == names.CLASSIFIER_MODEL)
                if best is None or key > best[0]:
                    best = (key, model_name, v)
        if best is None:
            return None
        _, model_name, v = best
        state = weights.from_bytes(registry.download(model_name, int(v["version"])))
        for k, t in state.items():
            if k in self.state and self.state[k].shape == t.shape:
                self.state[k] = t
        lin = v["lineage"]
        progress("resuming from %s version %s (%s round %s of run %s)", model_name, v["version"], lin["phase"], lin["round"], lin.get("run_id"))
        return lin["phase"], int(lin["round"])

    # ---------------------------------------------------------------- run
    def summary(self, status: str, error: str | None = None) -> dict:
        """The run folder's summary.json as of now (`reporting.RunReport.summary`)."""
        return self.report.summary(status, error, self.aggregation.privacy_spent())

    def _record_failure(self, error: str, registry: RegistryClient | None) -> None:
        """The run's end as failed, with `error`: run folder, registry (when reachable), log."""
        self.finished = True
        self.report.record_failure(error, registry, self.aggregation.privacy_spent())

    def _stopped(self) -> None:
        """Flower's exit handler: a stop signal (the SuperLink shutting down, `flwr stop`) ends
        this process without unwinding `run`, so the stop is recorded here, with its round."""
        if self.finished:
            return
        # A client of its own: the signal may have interrupted the run's client mid-request.
        registry = (RegistryClient.from_environment(self.cfg.registry, retries=1, timeout=3.0)
                    if self.report.registry is not None else None)
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
                self.report.warnings.append(warning)
                progress("run %s: %s", self.run_id, warning)
                break
            if self.report.history:
                self.report.folder.write_summary(self.summary("running"))
                self.report.put_run("running")
        return trained

    def _diagnosis_schedule(self) -> list[tuple[str, int, int]]:
        """SSL rounds, then fine-tuning rounds; with resume-from-registry, those after the newest checkpoint."""
        start = (names.PHASE_SSL, 0)
        if self.cfg.resume_from_registry:
            start = self._resume_point() or start
            if start != (names.PHASE_SSL, 0) and (self.cfg.strategy in STATEFUL_STRATEGIES or self.cfg.server_momentum > 0):
                log.warning("resume-from-registry with strategy=%s: the server optimiser's state (momentum, moments) is "
                            "not registered with the model; the resumed rounds start it from zero", self.cfg.strategy)
        schedule = [(names.PHASE_SSL, r, self.cfg.ssl_rounds) for r in range(1, self.cfg.ssl_rounds + 1)]
        schedule += [(names.PHASE_FINETUNE, r, self.cfg.finetune_rounds) for r in range(1, self.cfg.finetune_rounds + 1)]
        order = {names.PHASE_SSL: 0, names.PHASE_FINETUNE: 1}
        schedule = [s for s in schedule if (order[s[0]], s[1]) > (order[start[0]], start[1])]
        progress("run %s: %d SSL + %d fine-tune rounds, %d hospitals (%s)", self.run_id, self.cfg.ssl_rounds,
                 self.cfg.finetune_rounds, len(self.hospitals.names()), ", ".join(self.hospitals.names()))
        return schedule

    def _generate_schedule(self) -> list[tuple[str, int, int]]:
        """task=generate: `generate-rounds` rounds of the class-conditional GAN, each averaged,
        scored and registered like a diagnosis round."""
        progress("run %s: %d generative rounds (class-conditional GAN, %d px, %d steps per round), %d hospitals (%s)", self.run_id,
                 self.cfg.generate_rounds, self.cfg.image_size, self.cfg.gan_steps, len(self.hospitals.names()),
                 ", ".join(self.hospitals.names()))
        return [(names.PHASE_GENERATE, r, self.cfg.generate_rounds) for r in range(1, self.cfg.generate_rounds + 1)]

    def run(self) -> None:
        add_exit_handler(self._stopped)
        try:
            nodes = self.hospitals.wait()
            self.hospitals.describe(nodes, strict=True)
            self.report.put_run("running")
            self._init_model()
            if any(h.audit.get("synthetic_data") for h in self.hospitals.values()):
                self.report.warnings.append("trained on SYNTHETIC images: not a model of real data")
            schedule = self._generate_schedule() if self.cfg.task == names.RUN_GENERATE else self._diagnosis_schedule()
            self.aggregation.population = len(self.hospitals.names())  # dp: the accountant's population
            trained = self._train(schedule)
            if trained is not None:
                self.where = "the final evaluation"
                self._final_evaluation(trained)
            self.report.publish()
            self.finished = True
            self.report.folder.write_summary(self.summary("succeeded"))
            progress("run %s succeeded; run folder %s", self.run_id, self.report.folder.path)
        except Exception as exc:
            self._record_failure(f"{type(exc).__name__}: {exc}", self.report.registry)
            raise
        finally:
            if self.report.registry is not None:
                self.report.registry.close()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Flower ships this process's logs to the SuperLink over HTTP; logging every one of those
    # requests would feed the log stream with itself.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = RunConfig.from_mapping(context.run_config)
    Aggregator(grid, cfg, str(context.run_id)).run()
