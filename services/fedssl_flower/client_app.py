"""The hospital: a Flower ClientApp that trains on data that never leaves the hospital.

Thin handlers. Each unpacks the server's Message, calls the plain-PyTorch code in
`training`, and replies with only the shared parameter groups and metrics. The hospital's
own model (task heads included), its local-only baseline and, with `keep-optimizer-state`, their
fine-tuning AdamW moments are kept between rounds in the hospital's state directory
(safetensors, written atomically), never sent anywhere; the one exception is opt-in: with
`register-local-models` the local-only classifier is sent once, after the last round.

Why not `context.state`: Flower 1.41 ships the whole Context from each ClientApp process to
the SuperNode in one HTTP request with a 30 s timeout. Two full ResNets (~90 MB) in it miss
that timeout on a busy CPU; the SuperNode then declares the task crashed and the round loses
the hospital. A file beside the hospital's data costs a fraction of a second and survives a
SuperNode restart.

Node config (per hospital, `flower-supernode --node-config`): `hospital`, `ssl-task`,
`threads`, `state-dir` (default `<cache dir>/state`), and the data keys of
`data.HospitalDataConfig`. For tests and benchmarks only: `attack` (`none`, `scale:<factor>`,
`sign-flip`, `drop:<secagg stage>`; `attack.py`) makes the hospital misbehave on purpose, with
a warning every round.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedssl_core import hospital_batchnorm, label_shift, names, weights
from fedssl_core.generative import ConditionalGAN
from fedssl_core.models import TASK_GROUPS, FedSSLModel, set_torch_threads

from . import local, local_dp, records, secure_aggregation, training
from .attack import Attack, hospital_name, misbehave, node_attack
from .config import RunConfig
from .data import HospitalData, cache, load_hospital_data
from .errors import ConfigError
from .ssl import micle

log = logging.getLogger("fedssl.hospital")

# secure-aggregation=true: a round's train messages go through Flower's SecAgg+ mod (secure_aggregation.mod).
app = ClientApp(mods=[secure_aggregation.mod])


def _hospital(context: Context) -> tuple[str, str]:
    name = hospital_name(context.node_config, context.node_id)
    task = str(context.node_config.get("ssl-task", names.SSL_SIMCLR))
    if task not in names.SSL_TASKS:
        raise ConfigError(f"hospital {name}: node config ssl-task={task!r}; expected one of {', '.join(names.SSL_TASKS)}")
    return name, task


def _attack(context: Context) -> Attack:
    """Node config `attack` (tests and benchmarks only): how this hospital misbehaves."""
    return node_attack(context.node_config, context.node_id)


def _setup(context: Context) -> tuple[RunConfig, str, str, HospitalData]:
    cfg = RunConfig.from_mapping(context.run_config)
    threads = context.node_config.get("threads")
    set_torch_threads(int(threads) if threads else None)
    name, task = _hospital(context)
    _attack(context)  # a bad value fails at start-up (describe), not in a round
    data = load_hospital_data(context.node_config, cfg.image_size, cfg.seed)
    if task == names.SSL_MICLE and cfg.ssl_rounds:
        micle.require_pairs(data.train_groups, f"hospital {name}")  # at start-up (describe), not in a round
    return cfg, name, task, data


def _state_path(context: Context, key: str) -> Path:
    """Where this hospital keeps model `key` of this run."""
    root = context.node_config.get("state-dir") or ""
    base = Path(str(root)) if root else Path(str(context.node_config.get("cache-dir") or cache.default_cache_dir())) / "state"
    # Hospitals may share a cache dir on one machine; a name is one safe path component.
    hospital = re.sub(r"[^A-Za-z0-9._-]", "_", _hospital(context)[0]).lstrip(".") or "_"
    return base / f"run-{context.run_id}" / hospital / f"{key}.safetensors"


def _has_model(context: Context, key: str) -> bool:
    return _state_path(context, key).is_file()


def _model(context: Context, key: str, cfg: RunConfig, num_classes: int) -> FedSSLModel | ConditionalGAN:
    """The hospital's model `key` from its state directory; a seeded fresh one the first time
    (the server's initial model is identical, so the local-only baseline starts where the
    federation starts). A generative run's model is its GAN (`local.new_model`)."""
    saved = _has_model(context, key)
    model = local.new_model(cfg, num_classes, pretrained=cfg.pretrained and not saved)
    if saved:
        weights.load_into(model, weights.load_file(_state_path(context, key)))
    return model


def _seconds_since_process_start() -> float | None:
    """Wall time since this process started (Linux /proc), None where unavailable."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _keep(context: Context, key: str, model: FedSSLModel) -> None:
    path = _state_path(context, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights.save_file(path, model.state_dict())  # atomic: a killed process leaves the previous round's file


def _moments(context: Context, key: str, cfg: RunConfig, phase: str) -> dict | None:
    """The carried optimizer state of model `key` (`keep-optimizer-state`, fine-tuning only):
    a dict for `local.train_round`, filled from the state directory when a round left one."""
    if not cfg.keep_optimizer_state or phase != names.PHASE_FINETUNE:
        return None
    path = _state_path(context, key)
    return {"adamw": weights.load_file(path) if path.is_file() else None}


def _keep_moments(context: Context, key: str, carried: dict | None) -> None:
    if carried and carried.get("adamw"):
        weights.save_file(_state_path(context, key), carried["adamw"])  # atomic_write creates the folder


def _feature_cache_path(context: Context) -> Path:
    return _state_path(context, records.STATE_REAL_FEATURES).with_suffix(".npz")


def _feature_cache(context: Context) -> dict:
    """A generative run's cache of the real images' features (`generative_metrics`), kept
    beside the hospital's models: each round scores new generators against the same real
    images, so their features are extracted once per run, not twice a round."""
    path = _feature_cache_path(context)
    if not path.is_file():
        return {}
    try:
        with np.load(path) as saved:
            return {k: saved[k] for k in saved.files}
    except (OSError, ValueError) as exc:  # a torn or foreign file: extract again, never fail the round
        log.warning("ignoring the feature cache %s (%s); extracting the features again", path, exc)
        return {}


def _keep_feature_cache(context: Context, cache: dict) -> None:
    path = _feature_cache_path(context)
    buf = io.BytesIO()
    np.savez(buf, **cache)
    weights.atomic_write(path, buf.getvalue())


def _info(name: str, task: str, data: HospitalData) -> dict:
    return {"hospital": name, "ssl-task": task, "class-names": data.class_names, "audit": data.audit}


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Start-up audit: who this hospital is and what data it holds (counts, never images)."""
    _, name, task, data = _setup(context)
    return Message(RecordDict({records.INFO: records.config_record(_info(name, task, data))}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training of the federated model (and of the local-only baseline)."""
    t_start, startup = time.perf_counter(), _seconds_since_process_start()
    cfg, name, task, data = _setup(context)
    t_setup = time.perf_counter() - t_start
    instr = msg.content[records.CONFIG]
    phase, rnd = str(instr["phase"]), int(instr["round"])
    seed = local.round_seed(cfg.seed, phase, rnd)

    model = _model(context, records.STATE_MODEL, cfg, len(data.class_names))
    received = records.from_array_record(msg.content[records.WEIGHTS], cfg.update_encoding)
    records.load_arrays(model, received)
    # The received model is the previous round's global model: score it here, before training,
    # so a round costs one exchange (and one ClientApp process) instead of two.
    evaluation = _evaluation(context, model, cfg, data, instr)
    blocker = training.cannot_train(phase, len(data.train_images), cfg.finetune_mode)
    if blocker:  # left out of this round with the reason; its scores of the previous model still count
        log.warning("hospital %s left out of %s round %d: %s", name, phase, rnd, blocker)
        return Message(RecordDict({
            records.INFO: records.config_record({"hospital": name, "ssl-task": task, records.SKIPPED: blocker}),
            records.METRICS: records.to_metric_record({names.M_EXAMPLES: 0}),
            **evaluation,
        }), reply_to=msg)
    t0 = time.perf_counter()
    moments = _moments(context, records.STATE_OPTIMIZER, cfg, phase)
    # FedProx (strategy=fedprox): Flower's strategy puts proximal-mu in the train config.
    proximal_mu = float(instr[records.PROXIMAL_MU]) if records.PROXIMAL_MU in instr else 0.0
    metrics = local.train_round(model, data, task, phase, cfg, seed, rnd, moments, proximal_mu=proximal_mu)
    metrics[names.M_COMPUTE_SECONDS] = time.perf_counter() - t0
    _keep_moments(context, records.STATE_OPTIMIZER, moments)
    metrics[names.M_SETUP_SECONDS] = t_setup
    if startup is not None:
        metrics[names.M_STARTUP_SECONDS] = startup
    _keep(context, records.STATE_MODEL, model)
    shared = training.shared_groups(phase, cfg.share, cfg.finetune_mode)
    # In the frozen-backbone set-up a rotation hospital trains no shared group: it replies
    # with zero examples so it weighs nothing in the average.
    contributes = bool(set(shared) & set(training.trainable_groups(phase, task, cfg.share, cfg.finetune_mode)))
    if not contributes:
        metrics[names.M_EXAMPLES] = 0

    reply = records.state_arrays(model.state_dict(), shared)
    if cfg.dp == names.DP_LOCAL:  # clipped and noised here, before it leaves the hospital
        reply = local_dp.release(reply, received, cfg)
    attack = _attack(context)
    if attack.changes_update:  # fault injection: the hospital keeps its honest model, the aggregator gets this
        log.warning("hospital %s MISBEHAVES ON PURPOSE (node config attack=%s, tests and benchmarks only): its %s round %d "
                    "update is multiplied by %g before it is sent", name, attack, phase, rnd, attack.factor)
        reply = misbehave(attack, reply, received)
    content = RecordDict({
        records.WEIGHTS: records.to_array_record(reply, cfg.update_encoding),
        records.INFO: records.config_record({"hospital": name, "ssl-task": task}),
        **evaluation,
    })
    if cfg.local_baseline:
        t0 = time.perf_counter()
        baseline = _model(context, records.STATE_LOCAL_ONLY, cfg, len(data.class_names))
        baseline_moments = _moments(context, records.STATE_LOCAL_ONLY_OPTIMIZER, cfg, phase)
        baseline_metrics = local.train_round(baseline, data, task, phase, cfg, seed, rnd, baseline_moments)
        _keep(context, records.STATE_LOCAL_ONLY, baseline)
        _keep_moments(context, records.STATE_LOCAL_ONLY_OPTIMIZER, baseline_moments)
        content[records.LOCAL_METRICS] = records.to_metric_record(baseline_metrics)
        metrics[names.M_BASELINE_SECONDS] = time.perf_counter() - t0
    metrics[names.M_HANDLER_SECONDS] = time.perf_counter() - t_start
    content[records.METRICS] = records.to_metric_record(metrics)
    log.info("hospital %s %s round %d: %s", name, phase, rnd, {k: v for k, v in metrics.items() if isinstance(v, float)})
    return Message(content, reply_to=msg)


def _evaluation(context: Context, model: FedSSLModel, cfg: RunConfig, data: HospitalData, instr) -> dict:
    """Scores of the global `model` (and of the local-only baseline as it stands) on the
    held-out split, as reply records, when the message asks for them (`evaluate-phase`: the
    phase of the round that produced the model); {} otherwise."""
    if "evaluate-phase" not in instr:
        return {}
    if not len(data.test_images):  # nothing held out to score on: the aggregator logs the missing scores
        log.warning("hospital %s has no held-out images: the global model is not scored here", _hospital(context)[0])
        return {}
    t0 = time.perf_counter()
    phase = str(instr["evaluate-phase"])
    cache = _feature_cache(context) if phase == names.PHASE_GENERATE else None
    scores = local.score(model, data, phase, cfg, cache)
    out = {}
    if cfg.local_baseline and _has_model(context, records.STATE_LOCAL_ONLY):
        baseline = _model(context, records.STATE_LOCAL_ONLY, cfg, len(data.class_names))
        out[records.LOCAL_EVAL_METRICS] = records.to_metric_record(local.score(baseline, data, phase, cfg, cache))
    if cache is not None:
        _keep_feature_cache(context, cache)
    scores[names.M_EVALUATE_SECONDS] = time.perf_counter() - t0
    out[records.EVAL_METRICS] = records.to_metric_record(scores)
    return out


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the aggregated global model (and the local-only baseline) on local held-out data:
    the run's last model (every other global model is scored by the next round's train message)."""
    cfg, name, task, data = _setup(context)
    instr = msg.content[records.CONFIG]
    model = _model(context, records.STATE_MODEL, cfg, len(data.class_names))
    records.load_arrays(model, records.from_array_record(msg.content[records.WEIGHTS], cfg.update_encoding))
    _keep(context, records.STATE_MODEL, model)
    content = RecordDict({
        records.INFO: records.config_record({"hospital": name, "ssl-task": task}),
        **_evaluation(context, model, cfg, data, instr),
    })
    if "send-local-model" in instr and bool(instr["send-local-model"]) and cfg.register_local_models:
        local_model = _local_model(context, cfg, data, name)
        if local_model is not None:
            content[records.LOCAL_WEIGHTS] = local_model
    if "send-batchnorm-statistics" in instr and bool(instr["send-batchnorm-statistics"]) and cfg.hospital_batchnorm:
        own = _batchnorm_statistics(model, cfg, data, name)
        if own is not None:
            stats, served_model = own
            content[records.HOSPITAL_BATCHNORM] = stats
            if records.FEDERATION_LABEL_COUNTS in instr and len(data.test_images):
                content[records.SERVED_EVAL_METRICS] = _served_scores(served_model, cfg, data, name,
                                                                      str(instr[records.FEDERATION_LABEL_COUNTS]))
    return Message(content, reply_to=msg)


def _batchnorm_statistics(model: FedSSLModel, cfg: RunConfig, data: HospitalData,
                          name: str) -> tuple[ArrayRecord, FedSSLModel] | None:
    """The global model's encoder BatchNorm statistics recomputed over this hospital's training
    images in batches of `batch-size`, as its training batches normalised them (a mean and a
    variance per channel and layer; no image leaves), for `:predict?hospital=` to normalise
    this hospital's images with (`hospital-batchnorm`; `fedssl_core.hospital_batchnorm`), and
    the model that holds them (what that route serves this hospital, before its label prior)."""
    if len(data.train_images) < 2:  # the aggregator records that none came
        log.warning("hospital %s has %d training image(s): no BatchNorm statistics to send (they need at least 2)",
                    name, len(data.train_images))
        return None
    t0 = time.perf_counter()
    served = copy.deepcopy(model)
    stats = training.recompute_batchnorm(served, data.train_images, batch_size=cfg.batch_size)
    arrays = {f"{layer}.{s}": t.numpy() for layer, pair in stats.items() for s, t in zip(hospital_batchnorm.STATISTICS, pair)}
    log.info("hospital %s sends its BatchNorm statistics over %d training images (%d layers, %.1fs; hospital-batchnorm)",
             name, len(data.train_images), len(stats), time.perf_counter() - t0)
    return records.to_array_record(arrays), served


def _served_scores(model: FedSSLModel, cfg: RunConfig, data: HospitalData, name: str,
                   federation_counts: str) -> MetricRecord:
    """The final classifier scored on the held-out split as `:predict?hospital=` will serve this
    hospital (`local.score_as_served`): `model` with the hospital's own statistics, its label
    prior over the federation's (`federation_counts`, the aggregator's sum of every hospital's
    audited training counts), at every grid temperature."""
    t0 = time.perf_counter()
    own = np.bincount(data.train_labels.numpy(), minlength=len(data.class_names))
    try:
        federation = json.loads(federation_counts)
        ratio = label_shift.ratio(own, federation)
    except (ValueError, TypeError) as exc:  # LabelCountsError is a ValueError
        raise ConfigError(f"the aggregator's {records.FEDERATION_LABEL_COUNTS} {federation_counts[:80]!r} cannot give "
                          f"hospital {name}'s label prior ({exc})") from None
    scores = local.score_as_served(model, data, ratio, cfg)
    confusion = scores.pop(names.M_SERVED_CONFUSION_BY_TEMPERATURE)
    record = records.to_metric_record(scores)
    record[names.M_SERVED_CONFUSION_BY_TEMPERATURE] = [int(x) for x in confusion.reshape(-1)]
    log.info("hospital %s scored the final classifier as :predict?hospital= serves it (own statistics and label prior) "
             "in %.1fs", name, time.perf_counter() - t0)
    return record


def _local_model(context: Context, cfg: RunConfig, data: HospitalData, name: str) -> ArrayRecord | None:
    """The local-only classifier (encoder + classifier; no SSL heads) as a reply record, for
    the aggregator to register beside the global model. Sent only when the run asks for it
    (`register-local-models`, off by default) and the message says so: once, after the last
    fine-tune round."""
    if not _has_model(context, records.STATE_LOCAL_ONLY):
        log.warning("hospital %s has no local-only model to send (it never trained one)", name)
        return None
    baseline = _model(context, records.STATE_LOCAL_ONLY, cfg, len(data.class_names))
    groups = TASK_GROUPS[names.TASK_CLASSIFICATION]
    log.info("hospital %s sends its local-only classifier for registration (register-local-models)", name)
    return records.to_array_record(records.state_arrays(baseline.state_dict(), groups), cfg.update_encoding)


def parse_info(record) -> dict:
    """The INFO ConfigRecord of a reply as a dict (JSON fields decoded)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, str) and value[:1] in "[{":
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out
