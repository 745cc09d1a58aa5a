"""What a run leaves behind and tells its user: round records, model versions, the run's summary.

A round's record is finished once its global model is scored (`Trained`: aggregated, not yet
scored; hospitals score it with the next round's train message or in the final evaluation).
`RunReport.finish` then writes it to the run folder (`outputs.RunFolder`), posts the round's
metrics to the registry, registers the model versions (encoder; classifier in fine-tuning,
temperature-scaled) with their lineage (recipe, budget, privacy), and prints the progress
line. The run's body in the registry, its `summary.json` and its end (succeeded or failed) are
written from here too. `progress` prints the lines `flwr log` and fedssl-submit show.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import Message

from fedssl_core import generative, hospital_batchnorm, label_shift, names, weights
from fedssl_core.models import TASK_GROUPS, select_groups

from . import aggregation, local_models, records
from .config import RunConfig
from .metrics import aggregate_metrics, from_confusion
from .outputs import RunFolder
from .registry_client import RegistryClient

if TYPE_CHECKING:
    from .hospitals import Hospitals
    from .secure_aggregation import SecureResult

log = logging.getLogger("fedssl.aggregator")


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


def progress(msg: str, *args: Any) -> None:
    """Progress lines: what `flwr log` / `kubectl logs` / fedssl-submit show the user."""
    line = msg % args if args else msg
    log.info(line)
    print(f"[fedssl] {line}", flush=True)


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


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("n/a" if value is None else str(value))


def served_temperature(aggregated: dict) -> float | None:
    """The temperature the classifier is served at (`temperature_scaled`): the grid temperature
    with the lowest held-out NLL over all hospitals where it lowers the NLL, else 1; None when
    the hospitals sent no NLL curve."""
    curve, t = aggregated.get(names.M_NLL_BY_TEMPERATURE), aggregated.get(names.M_TEMPERATURE)
    if not isinstance(curve, list) or not t or len(curve) != len(names.TEMPERATURE_GRID):
        return None
    return 1.0 if min(curve) >= curve[names.TEMPERATURE_GRID.index(1.0)] else float(t)


def temperature_scaled(state: dict[str, torch.Tensor], aggregated: dict) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The classifier served at the temperature with the lowest held-out NLL over all hospitals:
    dividing the last layer's weight and bias by T is softmax(logits / T) exactly, so the
    registry serves calibrated probabilities with no change (argmax, and so every accuracy,
    stays the same). Applied only when it lowers the NLL; returns what was done."""
    t = served_temperature(aggregated)
    if t is None:
        return state, None
    curve = aggregated[names.M_NLL_BY_TEMPERATURE]
    nll_at_1 = curve[names.TEMPERATURE_GRID.index(1.0)]
    best = min(curve)
    if t == 1.0:
        return state, {"temperature": 1.0, "nll": nll_at_1, "applied": False}
    scaled = dict(state)
    for key in (f"{names.GROUP_CLASSIFIER}.weight", f"{names.GROUP_CLASSIFIER}.bias"):
        scaled[key] = state[key] / t
    return scaled, {"temperature": t, "nll": best, "nll_at_temperature_1": nll_at_1, "applied": True,
                    "fitted_on": "hospitals' held-out splits, NLL summed by the aggregator"}


_DESCRIPTIONS = {
    names.TASK_EMBEDDING: "fedssl shared image encoder (federated self-supervised)",
    names.TASK_CLASSIFICATION: "fedssl diagnosis classifier (federated fine-tuned)",
    names.TASK_GENERATION: "fedssl class-conditional image generator (federated GAN): synthetic images, POST :generate",
}


def secure_summary(secure: SecureResult) -> dict:
    """What a secure round's record keeps: the protocol's parameters, each stage's cost, who
    dropped out where (by node id; hospital names are in the round's failed list)."""
    return {"protocol": "SecAgg+ (Flower)", "num_shares": secure.num_shares, "reconstruction_threshold": secure.threshold,
            "dropped": {str(n): why for n, why in sorted(secure.dropped.items())},
            "stages": [{k: v for k, v in s.items() if k not in ("errors", "missing")} for s in secure.stages],
            "seconds": round(sum(s["seconds"] for s in secure.stages), 3)}


class RunReport:
    """The run's records: its run folder, and the registry when one is configured (`registry`;
    the run closes it at its end). Keeps the round history, the registered versions and the
    run's warnings."""

    def __init__(self, cfg: RunConfig, run_id: str, hospitals: Hospitals) -> None:
        self.cfg, self.run_id, self.hospitals = cfg, run_id, hospitals
        self.folder = RunFolder(cfg.runs_root, run_id)
        self.registry = RegistryClient.from_environment(cfg.registry) if cfg.registry else None
        self.history: list[dict] = []
        self.started, self.t_start = _now(), time.monotonic()
        self.warnings: list[str] = [cfg.data_warning] if cfg.data_warning else []
        self.registered: dict[str, int] = {}
        self.local_models: dict[str, dict] = {}  # hospital -> its registered local-only classifier, or why not
        if cfg.register_local_models and self.registry is None:
            log.warning("register-local-models=true but no registry is configured: local-only models stay at the hospitals")

    # ---------------------------------------------------------------- the run
    def run_body(self, status: str, error: str | None = None) -> dict:
        """The run as the registry keeps it (PUT /v1/runs/{run_id})."""
        source, synthetic = self.hospitals.data_facts()
        return {
            "status": status,
            "phase": self.history[-1]["phase"] if self.history else self._phases()[0],
            "planned_rounds": self._planned_rounds(),
            "config": self.cfg.as_dict(),
            "data_source": source,
            "synthetic_data": synthetic,
            "warnings": self.warnings,
            "class_names": self.hospitals.class_names,
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

    def _phases(self) -> tuple[str, ...]:
        return (names.PHASE_GENERATE,) if self.cfg.task == names.RUN_GENERATE else names.PHASES

    def _planned_rounds(self) -> dict[str, int]:
        if self.cfg.task == names.RUN_GENERATE:
            return {names.PHASE_GENERATE: self.cfg.generate_rounds}
        return {names.PHASE_SSL: self.cfg.ssl_rounds, names.PHASE_FINETUNE: self.cfg.finetune_rounds}

    def put_run(self, status: str) -> None:
        """The run's body, as of now, to the registry (when one is configured)."""
        if self.registry is not None:
            self.registry.put_run(self.run_id, self.run_body(status))

    def publish(self) -> None:
        """The run succeeded: its registered versions (global and local-only) get the
        production alias, and the registry records the run as succeeded."""
        if self.registry is None:
            return
        for model_name, version in self.registered.items():
            self.registry.set_alias(model_name, self.cfg.production_alias, version)
            progress("registered %s version %d as '%s'", model_name, version, self.cfg.production_alias)
        for entry in self.local_models.values():
            if "model" in entry:
                self.registry.set_alias(entry["model"], self.cfg.production_alias, entry["version"])
        self.registry.put_run(self.run_id, self.run_body("succeeded"))

    def summary(self, status: str, error: str | None = None, privacy: dict | None = None) -> dict:
        """The run folder's summary.json; `privacy`: the run's privacy spent (dp), if any."""
        last = {p: next((r["aggregated"] for r in reversed(self.history) if r["phase"] == p), None) for p in self._phases()}
        model = ({"arch": names.ARCH_CGAN, "image_size": self.cfg.image_size, "num_classes": len(self.hospitals.class_names),
                  "z_dim": self.cfg.gan_z_dim, "width": self.cfg.gan_width} if self.cfg.task == names.RUN_GENERATE else
                 {"arch": self.cfg.arch, "image_size": self.cfg.image_size, "num_classes": len(self.hospitals.class_names),
                  "finetune_mode": self.cfg.finetune_mode, "share": self.cfg.share})
        return {
            "run_id": self.run_id, "status": status, "error": error,
            "model": model,
            "classes": self.hospitals.class_names,
            "data": self.hospitals.data_facts()[0], "synthetic_data": self.hospitals.data_facts()[1], "warnings": self.warnings,
            "hospitals": {h.name: {"ssl_task": h.ssl_task, "audit": h.audit} for h in self.hospitals.values()},
            "rounds_done": len(self.history), "final_metrics": last, "registered": self.registered, "local_models": self.local_models,
            **({"privacy": privacy} if privacy else {}),
            "config": self.cfg.as_dict(), "started_at": self.started, "finished_at": _now(),
        }

    def record_failure(self, error: str, registry: RegistryClient | None, privacy: dict | None) -> None:
        """The run's end as failed, with `error`: run folder, registry (when reachable), log."""
        self.folder.write_summary(self.summary("failed", error, privacy))
        if registry is not None:
            try:
                registry.put_run(self.run_id, self.run_body("failed", error))
            except Exception as reg_exc:  # the run's own error matters more
                log.error("could not record the failure in the registry: %s", reg_exc)
        progress("run %s FAILED: %s", self.run_id, error)

    # ---------------------------------------------------------------- rounds
    def finish(self, t: Trained, scores: dict[str, dict], test_examples: dict[str, int], *, evaluated_in: str,
               evaluate_seconds: float = 0.0, hospital_stats: dict[str, dict[str, torch.Tensor]] | None = None,
               served: dict[str, dict] | None = None) -> dict:
        """Round `t`'s record, now that its global model is scored: the run folder, the
        registry's round metrics and model versions, the progress line. `hospital_stats`:
        every hospital's BatchNorm statistics, which the classifier version then carries
        (hospital-batchnorm; `fedssl_core.hospital_batchnorm`). `served`: each hospital's
        scores of the classifier as `:predict?hospital=` serves it, at every grid
        temperature (`local.score_as_served`), recorded at the temperature it is served at."""
        class_names = self.hospitals.class_names
        per_hospital = {h: dict(m) for h, m in t.per_hospital.items()}
        for h, m in scores.items():
            per_hospital.setdefault(h, {}).update(m)
        eval_part = {h: {k: v for k, v in m.items() if not (k.startswith(names.LOCAL_ONLY_PREFIX) and isinstance(v, list))}
                     for h, m in scores.items()}
        aggregated = aggregate_metrics(t.per_hospital, t.examples, class_names)
        aggregated.update(aggregate_metrics(eval_part, test_examples, class_names))
        # Per-SSL-task losses average over the hospitals running that task only.
        for task in names.SSL_TASKS:
            key = names.ssl_loss_key(task)
            vals = [(m[key], t.examples[h]) for h, m in t.per_hospital.items() if m.get(key) is not None]
            if vals and sum(w for _, w in vals):
                aggregated[key] = sum(v * w for v, w in vals) / sum(w for _, w in vals)

        served_line = None
        if served and hospital_stats and set(hospital_stats) == set(self.label_counts()):
            served_line = self._served_metrics(served, per_hospital, aggregated, test_examples)
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
            self._register(t.state, phase, rnd, aggregated, sorted(t.examples), t.privacy, hospital_stats)
        finally:  # the round is on disk even when the registry is unreachable
            record["timing"]["register_seconds"] = time.monotonic() - t_reg
            self.folder.append_round(record)
        self.history.append(record)
        if phase == names.PHASE_GENERATE:
            self._generate_progress(t, aggregated, evaluate_seconds)
            return record
        loss = aggregated.get(names.M_FINETUNE_LOSS if phase == names.PHASE_FINETUNE else names.M_LOSS)
        progress("phase=%s round=%d/%d hospitals=%d loss=%s balanced_accuracy=%s macro_auc=%s (%.1fs)",
                 phase, rnd, t.total, len(t.examples), _fmt(loss), _fmt(aggregated.get(names.M_BALANCED_ACCURACY)),
                 _fmt(aggregated.get(names.M_MACRO_AUC)), t.seconds + evaluate_seconds)
        if served_line:
            progress("phase=%s round=%d %s", phase, rnd, served_line)
        if t.privacy:
            p = t.privacy
            progress("phase=%s round=%d privacy: epsilon=%.4f spent in total (+%.4f this round) at delta=%g after %d release(s); "
                     "noise multiplier %g, clipping norm %g%s", phase, rnd, p["epsilon"], p["round_epsilon"], p["delta"],
                     p["releases"], p["noise_multiplier"], p["clipping_norm"],
                     (f" (next round's {p['next_clipping_norm']:.4g})" if "next_clipping_norm" in p else "")
                     + (f", budget {p['max_epsilon']:g}" if p.get("max_epsilon") else ""))
        return record

    def _served_metrics(self, served: dict[str, dict], per_hospital: dict[str, dict], aggregated: dict,
                        test_examples: dict[str, int]) -> str:
        """Adds the scores as served to each hospital (`served`, at every grid temperature) at the
        temperature the classifier is served at: `served_*` per hospital and over all of them
        (confusion matrices summed, as for the plain scores; macro AUC weighted by held-out
        images). Returns the progress line's text."""
        t = served_temperature(aggregated) or 1.0
        i = names.TEMPERATURE_GRID.index(t)  # a grid temperature: the NLL curve's argmin, or 1
        matrices, aucs = {}, {}
        for h, m in sorted(served.items()):
            cm = m[names.M_SERVED_CONFUSION_BY_TEMPERATURE][i]
            one = from_confusion(cm)
            matrices[h] = cm
            row = {names.M_SERVED_ACCURACY: one[names.M_ACCURACY], names.M_SERVED_BALANCED_ACCURACY: one[names.M_BALANCED_ACCURACY],
                   names.M_SERVED_CONFUSION_MATRIX: one[names.M_CONFUSION_MATRIX]}
            if m.get(names.M_SERVED_MACRO_AUC_BY_TEMPERATURE):
                row[names.M_SERVED_MACRO_AUC] = aucs[h] = m[names.M_SERVED_MACRO_AUC_BY_TEMPERATURE][i]
            per_hospital.setdefault(h, {}).update(row)
        total = from_confusion(sum(matrices.values()))
        aggregated[names.M_SERVED_ACCURACY] = total[names.M_ACCURACY]
        aggregated[names.M_SERVED_BALANCED_ACCURACY] = total[names.M_BALANCED_ACCURACY]
        aggregated[names.M_SERVED_CONFUSION_MATRIX] = total[names.M_CONFUSION_MATRIX]
        weights_ = {h: test_examples.get(h, 0) for h in aucs}
        if aucs and sum(weights_.values()) > 0:
            aggregated[names.M_SERVED_MACRO_AUC] = sum(aucs[h] * w for h, w in weights_.items()) / sum(weights_.values())
        return ("as served to each hospital naming itself (:predict?hospital=: its own BatchNorm statistics and label mix, "
                f"temperature {_fmt(t)}): served_balanced_accuracy={_fmt(aggregated[names.M_SERVED_BALANCED_ACCURACY])} "
                f"served_macro_auc={_fmt(aggregated.get(names.M_SERVED_MACRO_AUC))} over "
                f"{int(sum(cm.sum() for cm in matrices.values()))} held-out images; by hospital: "
                + ", ".join(f"{h} {per_hospital[h][names.M_SERVED_BALANCED_ACCURACY]:.4f}" for h in sorted(matrices)))

    def _generate_progress(self, t: Trained, aggregated: dict, evaluate_seconds: float) -> None:
        """A generative round's progress line; a warning when hospitals found generated images
        nearer their training images than real unseen images ever are (possible copies)."""
        progress("phase=%s round=%d/%d hospitals=%d generator_loss=%s discriminator_loss=%s fid=%s precision=%s recall=%s "
                 "too_close=%s (%.1fs)", t.phase, t.round, t.total, len(t.examples), _fmt(aggregated.get(names.M_GENERATOR_LOSS)),
                 _fmt(aggregated.get(names.M_DISCRIMINATOR_LOSS)), _fmt(aggregated.get(names.M_FID)),
                 _fmt(aggregated.get(names.M_GEN_PRECISION)), _fmt(aggregated.get(names.M_GEN_RECALL)),
                 _fmt(aggregated.get(names.M_TOO_CLOSE)), t.seconds + evaluate_seconds)
        for key, space in ((names.M_TOO_CLOSE, "features"), (names.M_TOO_CLOSE_PIXELS, "pixels")):
            close = {h: m[key] for h, m in self.history[-1]["hospitals"].items() if m.get(key)}
            if close:
                progress("phase=%s round=%d memorisation (%s): generated images nearer a training image than 99%% of held-out "
                         "images are, by hospital: %s", t.phase, t.round, space,
                         ", ".join(f"{h} {v:.1%}" for h, v in sorted(close.items())))

    # ---------------------------------------------------------------- registered versions
    def _input_spec(self, task: str = names.TASK_CLASSIFICATION) -> dict:
        """How the registered model reads images; a classifier also how it was scored (test-time
        augmentation); a generator what it draws (its image size, classes and latent size)."""
        if task == names.TASK_GENERATION:
            return {"image_size": self.cfg.image_size, "channels": 3, "class_names": self.hospitals.class_names,
                    "z_dim": self.cfg.gan_z_dim}
        mean, std = names.NORMALIZATION[self.cfg.arch]
        return {"image_size": self.cfg.image_size, "channels": 3, "mean": list(mean), "std": list(std),
                "class_names": self.hospitals.class_names} | (
            {"test_time_augmentation": self.cfg.test_time_augmentation} if task == names.TASK_CLASSIFICATION else {})

    def label_counts(self) -> dict[str, list[int]]:
        """Each hospital's training images per class (its start-up audit, in the federation's
        class order), which a classifier version carries so that `:predict` can serve a
        hospital its own label mix (`fedssl_core.label_shift`). Only for balanced softmax,
        whose logits leave each hospital's own prior out; empty otherwise, or when a
        hospital reported no counts."""
        if self.cfg.finetune_loss != names.LOSS_BALANCED_SOFTMAX:
            return {}
        out = {}
        for h in {h.name: h for h in self.hospitals.values()}.values():
            train = h.audit.get("class_counts", {}).get("train")
            if not train:
                return {}
            out[h.name] = [int(train.get(c, 0)) for c in self.hospitals.class_names]
        return out

    def _weights_meta(self, task: str, phase: str, rnd: int) -> dict[str, str]:
        """The safetensors metadata of a registered version's weights."""
        return {"fedssl.arch": self.cfg.arch, "fedssl.task": task, "fedssl.num_classes": str(len(self.hospitals.class_names)),
                "fedssl.image_size": str(self.cfg.image_size), "fedssl.run_id": self.run_id,
                "fedssl.round": str(rnd), "fedssl.phase": phase}

    def _register(self, state: dict[str, torch.Tensor], phase: str, rnd: int, aggregated: dict, hospitals: list[str],
                  privacy: dict | None = None, hospital_stats: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        if self.registry is None:
            return
        source, synthetic = self.hospitals.data_facts()
        scalars = {k: v for k, v in aggregated.items() if isinstance(v, (int, float))}
        targets = [(names.ENCODER_MODEL, names.TASK_EMBEDDING)]
        if phase == names.PHASE_GENERATE:
            targets = [(names.GENERATOR_MODEL, names.TASK_GENERATION)]
        elif phase == names.PHASE_FINETUNE:
            targets.append((names.CLASSIFIER_MODEL, names.TASK_CLASSIFICATION))
        for model_name, task in targets:
            self.registry.ensure_model(
                model_name, task=task, architecture=names.ARCH_CGAN if task == names.TASK_GENERATION else self.cfg.arch,
                input_spec=self._input_spec(task), description=_DESCRIPTIONS[task],
            )
            meta = self._weights_meta(task, phase, rnd)
            if task == names.TASK_GENERATION:
                meta |= {"fedssl.arch": names.ARCH_CGAN} | generative.generator_meta(
                    {"num_classes": len(self.hospitals.class_names), "image_size": self.cfg.image_size,
                     "z_dim": self.cfg.gan_z_dim, "width": self.cfg.gan_width})
            served = select_groups(state, TASK_GROUPS[task])
            calibration, counts = None, {}
            if task == names.TASK_CLASSIFICATION:
                served, calibration = temperature_scaled(served, aggregated)
                if calibration:
                    meta["fedssl.temperature"] = str(calibration["temperature"])
                counts = self.label_counts()
                if counts:
                    meta[label_shift.META_KEY] = label_shift.encode(counts)
                if hospital_stats and set(hospital_stats) != set(counts):  # served together: the same hospitals or neither
                    warning = (f"hospital-batchnorm: statistics from {', '.join(sorted(hospital_stats))} but label counts from "
                               f"{', '.join(sorted(counts)) or 'no hospital'}; the classifier carries no statistics")
                    self.warnings.append(warning)
                    progress("run %s: %s", self.run_id, warning)
                    hospital_stats = None
                if hospital_stats:
                    tensors, stats_meta = hospital_batchnorm.pack(hospital_stats)
                    served, meta = {**served, **tensors}, meta | stats_meta
            blob = weights.to_bytes(served, meta)
            tags = {"phase": phase, "round": str(rnd), "ssl_tasks": ",".join(sorted({h.ssl_task for h in self.hospitals.values()}))}
            if self.warnings:
                tags["warning"] = " | ".join(self.warnings)
            version = self.registry.upload_version(model_name, blob, {
                "tags": tags,
                "lineage": {"run_id": self.run_id, "round": rnd, "phase": phase, "hospitals": hospitals, "metrics": scalars,
                            "recipe": self.recipe(), "budget": self._budget(phase),
                            **({"calibration": calibration} if calibration else {}),
                            # the hospitals `:predict?hospital=` can serve their own label mix (the
                            # weights' fedssl.label_counts, which the registry serves from)
                            **({"label_counts": counts} if counts else {}),
                            # the hospitals whose images `:predict?hospital=` normalises with their own statistics
                            **({"hospital_batchnorm": sorted(hospital_stats)} if task == names.TASK_CLASSIFICATION and hospital_stats else {}),
                            # dp: the privacy this model cost, all rounds up to it (epsilon at delta)
                            **({"privacy": privacy} if privacy else {})},
                "data_source": source,
                "synthetic_data": synthetic,
            })
            self.registered[model_name] = int(version["version"])

    def register_local_models(self, replies: dict[int, Message], record: dict, global_state: dict[str, torch.Tensor]) -> None:
        """Each hospital's local-only classifier from the final evaluation's `replies`
        (register-local-models), registered as fedssl-local-<hospital> with the scores it got
        on its hospital's own held-out images and the global version it was trained beside.
        A hospital that sent none, or sent something that is not the federation's
        classifier (`global_state`'s shape), is logged and recorded on the run; the others
        are registered."""
        assert self.registry is not None
        by_node = {node: self.hospitals[node].name for node in replies}
        model_names = local_models.model_names(self.hospitals.names())
        source, synthetic = self.hospitals.data_facts()
        global_version = self.registered.get(names.CLASSIFIER_MODEL)
        for node, reply in sorted(replies.items(), key=lambda item: by_node[item[0]]):
            name = by_node[node]
            if reply.has_error() or records.LOCAL_WEIGHTS not in reply.content:
                why = f"its reply failed: {reply.error.reason}" if reply.has_error() else "its reply carried no local-only model"
                self.local_models[name] = {"error": why}
                progress("hospital %s: local-only model not registered: %s", name, why)
                continue
            try:
                arrays = records.from_array_record(reply.content[records.LOCAL_WEIGHTS], self.cfg.update_encoding)
                state = local_models.classifier_state(arrays, global_state)
            except ValueError as exc:
                self.local_models[name] = {"error": f"refused: {exc}"}
                progress("hospital %s: local-only model refused, not registered: %s", name, exc)
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
                            "recipe": self.recipe(), "budget": self._budget(record["phase"], recorded=True)},
                "data_source": source,
                "synthetic_data": synthetic,
            })
            self.local_models[name] = {"model": model_name, "version": int(version["version"]),
                                       "global_model": {"name": names.CLASSIFIER_MODEL, "version": global_version}}
            progress("registered hospital %s's local-only classifier as %s version %d", name, model_name, int(version["version"]))

    def recipe(self) -> dict:
        """The training recipe behind a registered version: every run-config key that shapes the model."""
        if self.cfg.task == names.RUN_GENERATE:
            config = self.cfg.as_dict()
            keep = ("task", "image-size", "batch-size", "generate-rounds", "gan-steps", "gan-lr", "gan-lr-discriminator",
                    "gan-z-dim", "gan-width", "gan-diffaugment", "gan-eval-samples", "strategy", "server-lr", "server-momentum",
                    "update-encoding", "seed", "dp", "dp-noise-multiplier", "dp-clipping-norm", "dp-delta", "dp-max-epsilon")
            return {k: config[k] for k in keep} | {"strategy_parameters": aggregation.parameters(self.cfg)}
        keep = ("arch", "pretrained", "image-size", "batch-size", "ssl-rounds", "finetune-rounds", "local-epochs", "local-steps",
                "lr", "finetune-lr", "lr-schedule", "weight-decay", "keep-optimizer-state", "finetune-loss", "augment", "head-warmup-epochs",
                "finetune-mode", "share", "test-time-augmentation", "ssl-colour-jitter", "ssl-batchnorm",
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
        rounds = {p: sum(1 for h in self.history if h["phase"] == p) + (p == phase and not recorded) for p in self._phases()}
        if self.cfg.task == names.RUN_GENERATE:
            return {"rounds": rounds, "gan_steps_per_round": self.cfg.gan_steps, "batch_size": self.cfg.batch_size,
                    "wall_seconds": round(time.monotonic() - self.t_start, 1)}
        return {"rounds": rounds, "local_steps_per_round": self.cfg.local_steps or None, "local_epochs_per_round":
                None if self.cfg.local_steps else self.cfg.local_epochs, "batch_size": self.cfg.batch_size,
                "wall_seconds": round(time.monotonic() - self.t_start, 1)}
