"""Registry operations over the database and the artifact store: the data plane of /v1.

Transport-independent: routes call these methods and turn `RegistryError`s into JSON.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import threading
from dataclasses import dataclass, field
from collections.abc import Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from fedssl_core import generative, hospital_batchnorm, label_shift, names, weights
from fedssl_core import models as core_models
from fedssl_core.errors import ConfigError, FedSSLError, WeightsError
from fedssl_core.preprocessing import normalize

from . import db
from .core.errors import Conflict, InvalidInput, ModelNotFound
from .schemas import MAX_JSON_DEPTH, NAME_RE, ModelCreate, RoundCreate, RunUpsert, VersionMetadata
from .storage import ArtifactStore, Upload

log = logging.getLogger("fedssl.registry")

ROUND_CSV_SCALARS = (
    "examples", "loss", *(names.ssl_loss_key(task) for task in names.SSL_TASKS), "finetune_loss", "test_loss", "accuracy",
    "balanced_accuracy", "macro_auc", "test_examples", "local_only_loss", "local_only_accuracy",
    "local_only_balanced_accuracy", "local_only_macro_auc",
    # the final classifier as :predict?hospital= serves each hospital (hospital-batchnorm)
    names.M_SERVED_ACCURACY, names.M_SERVED_BALANCED_ACCURACY, names.M_SERVED_MACRO_AUC,
    # a generative run's rounds: the GAN's losses and the hospitals' scores of its generators
    names.M_GENERATOR_LOSS, names.M_DISCRIMINATOR_LOSS, *names.GENERATIVE_SCORES, names.LOCAL_ONLY_PREFIX + names.M_FID,
)


def _head(items: list[str]) -> str:
    return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _check_tensors(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load `state` into `module` if every tensor has the dtype the module has for it (float32
    parameters; a bool or int8 file of the right shapes would be cast silently, bool to NaN),
    no value is NaN or infinite, and keys and shapes fit; else a WeightsError naming them."""
    expected = module.state_dict()
    wrong = sorted(f"{k} is {_dtype(state[k])}, expected {_dtype(expected[k])}"
                   for k in set(expected) & set(state) if state[k].dtype != expected[k].dtype)
    if wrong:
        raise WeightsError(f"wrong dtype: {_head(wrong)}")
    non_finite = sorted(k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if non_finite:
        raise WeightsError(f"NaN or infinite values in {_head(non_finite)}")
    weights.load_into(module, state)


@dataclass
class Servable:
    """What a version's weights file serves with (`servable`)."""

    module: torch.nn.Module  # in eval mode
    # a classifier's hospital -> its label prior over the federation's (`fedssl_core.label_shift`); {} without counts
    label_ratios: dict[str, np.ndarray] = field(default_factory=dict)
    # a classifier's hospital -> its encoder BatchNorm statistics (`fedssl_core.hospital_batchnorm`); {} without
    hospital_stats: dict[str, hospital_batchnorm.Statistics] = field(default_factory=dict)


def servable(model: dict, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Servable:
    """The serving module of registered `model` (a `Registry.model_dict`) holding `state`,
    in eval mode, with what its `metadata` and extra tensors carry for `:predict?hospital=`,
    decoded once. Torch: run it on the torch thread. `metadata` is the safetensors file's
    (`weights.read_metadata`): a generator's shape is read from it (`servable_generator`).

    Raises a FedSSLError saying why unless the weights can answer patients: the tensors pass
    `_check_tensors`, and a forward pass of a probe image (mid-grey, the spec's size,
    normalised with its mean/std) gives finite outputs: probabilities for a classifier, an
    embedding otherwise; and a classifier's hospitals' label counts, if it carries them
    (`fedssl_core.label_shift`), give each hospital a prior, and its hospitals' BatchNorm
    statistics, if it carries them (`fedssl_core.hospital_batchnorm`), fit its layers and name
    the same hospitals.
    """
    if model["task"] == names.TASK_GENERATION:
        return Servable(servable_generator(model, state, metadata or {}))
    spec = model["input_spec"]
    classification = model["task"] == names.TASK_CLASSIFICATION
    module = core_models.build_inference_model(model["task"], model["architecture"], len(spec.get("class_names", [])) or None,
                                               spec.get("test_time_augmentation") or names.TTA_NONE)
    state, hospital_stats = hospital_batchnorm.split(state, metadata)
    if hospital_stats and not classification:
        raise WeightsError(f"{hospital_batchnorm.META_KEY}: hospitals' BatchNorm statistics serve `:predict?hospital=`, "
                           f"a classifier's; this is a {model['task']} model")
    _check_tensors(module, state)
    ratios = {}
    if classification and label_shift.META_KEY in (metadata or {}):  # what `:predict?hospital=` serves with
        ratios = label_shift.decode(metadata[label_shift.META_KEY], len(spec.get("class_names", [])))
    if hospital_stats:
        hospital_batchnorm.check(hospital_batchnorm.statistics_of(module), hospital_stats)
        if set(hospital_stats) != set(ratios):
            raise WeightsError(f"{hospital_batchnorm.META_KEY} names hospitals {sorted(hospital_stats)}, but the label counts "
                               f"({label_shift.META_KEY}) name {sorted(ratios) or 'none'}: a hospital is served its own "
                               "statistics with its own label mix, so both must name the same hospitals")
    module.eval()
    size = int(spec["image_size"])
    try:
        probe = normalize(np.full((1, 3, size, size), 128, dtype=np.uint8), spec.get("mean") or names.IMAGENET_MEAN,
                          spec.get("std") or names.IMAGENET_STD)
    except ValueError as exc:  # a model registered before input_spec was checked (std 0)
        raise ConfigError(f"input_spec cannot normalise an image: {exc}") from None
    with torch.inference_mode():
        out = module(torch.from_numpy(probe))
        out = torch.softmax(out, dim=1) if classification else out
    if not bool(torch.isfinite(out).all()):
        what = "probabilities" if classification else "embedding"
        raise WeightsError(f"on a probe image (mid-grey, {size}x{size}) the model's {what} are not finite (NaN or infinity)")
    return Servable(module, ratios, hospital_stats)


def servable_generator(model: dict, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> generative.Generator:
    """The generator of registered generation `model` holding `state` (its `generator.*`
    tensors only), in eval mode, built to the shape its weights' `metadata` names
    (`generative.build_generator`). Torch: run it on the torch thread.

    Raises a FedSSLError saying why unless it can serve what the model promises: the
    metadata's classes, image size and latent width are the model's input_spec ones (a
    client picks classes by name and sends latents of `z_dim`), the tensors pass
    `_check_tensors`, and one probe image per class (seed 0) is finite before it becomes
    pixels (NaN would turn into arbitrary bytes).
    """
    spec = model["input_spec"]
    # The shape comes from the file's metadata: check it against the file's own tensors on the
    # meta device first, so metadata cannot make serving allocate a model larger than its file.
    with torch.device("meta"):
        shape_only = generative.build_generator(metadata)
    weights.check_fits({f"{names.GROUP_GENERATOR}.{k}": t for k, t in shape_only.state_dict().items()}, state)
    generator = generative.build_generator(metadata)
    classes = list(spec.get("class_names") or [])
    differ = [f"{what} {got} (the model's input_spec: {want})" for what, got, want in (
        ("num_classes", generator.num_classes, len(classes)), ("image_size", generator.image_size, spec.get("image_size")),
        ("z_dim", generator.z_dim, spec.get("z_dim"))) if got != want]
    if differ:
        raise WeightsError(f"the generator in these weights (safetensors metadata) has {'; '.join(differ)}; register it "
                           "under a model whose input_spec has its classes, image size and z_dim")
    # A holder whose state-dict keys are the registered ones (`generator.*`), so a file with
    # other keys (the discriminator's, say) is refused naming them.
    holder = torch.nn.Module()
    holder.add_module(names.GROUP_GENERATOR, generator)
    _check_tensors(holder, state)
    generator.eval()
    with torch.inference_mode():
        n = generator.num_classes
        out = generator(generative.latents(n, generator.z_dim, 0), torch.arange(n))
    if not bool(torch.isfinite(out).all()):
        raise WeightsError("on a probe (one latent of seed 0 per class) the generator's images are not finite (NaN or infinity)")
    return generator


def generation_spec(body: ModelCreate) -> dict:
    """The input_spec stored for a generation model: what it draws (`image_size`, `channels`,
    `class_names`) and its latent width (`z_dim`). A generator normalises nothing, so a
    mean, std or test-time augmentation sent for it is refused rather than stored unused."""
    spec = body.input_spec
    if body.architecture != names.ARCH_CGAN:
        raise InvalidInput(f"a generation model has architecture {names.ARCH_CGAN!r} (fedssl_core.generative), "
                           f"got {body.architecture!r}")
    if not spec.class_names:
        raise InvalidInput("a generation model needs input_spec.class_names (at least 1): the classes it draws, "
                           "in the generator's class-index order")
    if spec.z_dim is None:
        raise InvalidInput("a generation model needs input_spec.z_dim: the length of its generator's latent vectors")
    if spec.image_size not in generative.IMAGE_SIZES:
        raise InvalidInput(f"a generation model's input_spec.image_size is one of {', '.join(map(str, generative.IMAGE_SIZES))}, "
                           f"got {spec.image_size}")
    unused = sorted({"mean", "std", "test_time_augmentation"} & spec.model_fields_set)
    if unused:
        raise InvalidInput(f"{', '.join('input_spec.' + k for k in unused)}: not used by a generation model (it draws "
                           "pixels and normalises nothing); send image_size, channels, class_names and z_dim")
    return spec.model_dump(include={"image_size", "channels", "class_names", "z_dim"})


def version_metadata(form_value: str | None) -> VersionMetadata:
    """An upload's `metadata` form field (JSON) as VersionMetadata; none is empty metadata.
    InvalidInput names what is wrong."""
    if not form_value:
        return VersionMetadata()
    try:
        return VersionMetadata.model_validate(json.loads(form_value))
    except RecursionError:
        raise InvalidInput(f"metadata is not valid: it nests deeper than {MAX_JSON_DEPTH} levels of objects and arrays") from None
    except ValidationError as exc:
        msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"metadata is not valid: {msg}") from None
    except ValueError as exc:
        raise InvalidInput(f"metadata is not valid: {exc}") from None


def check_name(name: str, what: str = "model name") -> str:
    if not NAME_RE.match(name or ""):
        raise InvalidInput(f"invalid {what} {name!r}: expected ^[a-z0-9][a-z0-9._-]{{0,62}}$")
    return name


class Registry:
    def __init__(self, sessions: sessionmaker, store: ArtifactStore, torch_executor: Executor | None = None) -> None:
        """`torch_executor`: the service's one torch thread (see `ModelRepository`); upload
        validation builds a model there. None runs it in the calling thread."""
        self.sessions = sessions
        self.store = store
        self.torch_executor = torch_executor
        self._version_lock = threading.Lock()  # one writer picks version numbers at a time
        self.listeners: list = []  # callables(event: str, payload: dict) — metrics, caches

    def _emit(self, event: str, payload: dict) -> None:
        """Tell the listeners about a committed change. A listener that fails is logged: the
        change is stored, so the client must not be told it failed."""
        for fn in self.listeners:
            try:
                fn(event, payload)
            except Exception:
                log.exception("registry listener %r failed on a %s event", fn, event)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _model(s: Session, name: str) -> db.RegisteredModel:
        check_name(name)
        m = s.scalar(select(db.RegisteredModel).where(db.RegisteredModel.name == name))
        if m is None:
            raise ModelNotFound(f"model {name!r} not found")
        return m

    @staticmethod
    def _version(s: Session, m: db.RegisteredModel, version: int) -> db.ModelVersion:
        v = s.scalar(select(db.ModelVersion).where(db.ModelVersion.model_id == m.id, db.ModelVersion.version == version))
        if v is None:
            raise ModelNotFound(f"model {m.name!r} has no version {version}")
        return v

    @staticmethod
    def model_dict(m: db.RegisteredModel) -> dict:
        latest = max((v.version for v in m.versions), default=None)
        return {
            "name": m.name, "description": m.description, "task": m.task, "architecture": m.architecture,
            "input_spec": m.input_spec, "latest_version": latest, "versions": len(m.versions),
            "aliases": {a.alias: a.version for a in sorted(m.aliases, key=lambda a: a.alias)},
            "created_at": db.iso(m.created_at),
        }

    @staticmethod
    def version_dict(m: db.RegisteredModel, v: db.ModelVersion) -> dict:
        return {
            "model": m.name, "version": v.version, "sha256": v.sha256, "size_bytes": v.size_bytes,
            "created_at": db.iso(v.created_at), "tags": v.tags or {}, "lineage": v.lineage or {},
            "aliases": sorted(a.alias for a in m.aliases if a.version == v.version),
            "data_source": v.data_source, "synthetic_data": v.synthetic_data,
        }

    # ------------------------------------------------------------------ models
    def create_model(self, body: ModelCreate) -> dict:
        if body.task == "classification" and len(body.input_spec.class_names) < 2:
            raise InvalidInput("a classification model needs input_spec.class_names with at least 2 classes")
        spec = generation_spec(body) if body.task == names.TASK_GENERATION else body.input_spec.model_dump(exclude={"z_dim"})
        if body.task != names.TASK_GENERATION and (body.architecture == names.ARCH_CGAN or body.input_spec.z_dim is not None):
            raise InvalidInput(f"architecture {names.ARCH_CGAN!r} and input_spec.z_dim are for task {names.TASK_GENERATION!r} "
                               f"(a class-conditional image generator), not {body.task!r}")
        with self.sessions.begin() as s:
            if s.scalar(select(db.RegisteredModel).where(db.RegisteredModel.name == body.name)) is not None:
                raise Conflict(f"model {body.name!r} already exists")
            m = db.RegisteredModel(name=body.name, description=body.description, task=body.task,
                                   architecture=body.architecture, input_spec=spec)
            s.add(m)
            s.flush()
            out = self.model_dict(m)
        self._emit("model", out)
        return out

    def list_models(self) -> list[dict]:
        with self.sessions() as s:
            return [self.model_dict(m) for m in s.scalars(select(db.RegisteredModel).order_by(db.RegisteredModel.name))]

    def get_model(self, name: str) -> dict:
        with self.sessions() as s:
            return self.model_dict(self._model(s, name))

    # ------------------------------------------------------------------ versions
    def _validate_weights(self, m: dict, path: Path) -> None:
        try:
            data = path.read_bytes()
            servable(m, weights.from_bytes(data), weights.read_metadata(data))
        except FedSSLError as exc:
            raise InvalidInput(f"weights rejected for {m['name']!r} ({m['task']}, {m['architecture']}): {exc}") from exc

    def create_version(self, name: str, upload: Upload, meta: VersionMetadata) -> dict:
        """Turn a received upload (`ArtifactStore.receive`) into the next version: validate,
        store, then one transaction; concurrent uploads get distinct, gap-free numbers, and a
        number is never given twice, even after its version was deleted."""
        try:
            model = self.get_model(name)
            if self.torch_executor is not None:
                self.torch_executor.submit(self._validate_weights, model, upload.path).result()
            else:
                self._validate_weights(model, upload.path)
            self.store.commit(upload)
        finally:
            upload.path.unlink(missing_ok=True)
        sha, size = upload.sha256, upload.size
        for _ in range(5):
            with self._version_lock:
                try:
                    with self.sessions.begin() as s:
                        m = self._model(s, name)
                        # Never a number the model had before, even one whose version was
                        # deleted: clients may hold it. MAX(version) covers databases from
                        # before the counter existed.
                        counter = s.get(db.VersionCounter, m.id)
                        highest = s.scalar(select(func.max(db.ModelVersion.version)).where(db.ModelVersion.model_id == m.id)) or 0
                        number = max(highest, counter.last_version if counter else 0) + 1
                        if counter is None:
                            s.add(db.VersionCounter(model_id=m.id, last_version=number))
                        else:
                            counter.last_version = number
                        v = db.ModelVersion(model_id=m.id, version=number, sha256=sha, size_bytes=size, tags=meta.tags,
                                            lineage=meta.lineage, data_source=meta.data_source, synthetic_data=meta.synthetic_data)
                        s.add(v)
                        s.flush()
                        s.refresh(m)
                        out = self.version_dict(m, v)
                    break
                except IntegrityError:  # another process took the number (or created the counter): try the next one
                    continue
        else:
            raise Conflict(f"could not allocate a version number for {name!r}; retry the upload")
        self._emit("version", out)
        return out

    def list_versions(self, name: str) -> list[dict]:
        with self.sessions() as s:
            m = self._model(s, name)
            return [self.version_dict(m, v) for v in m.versions]

    def get_version(self, name: str, version: int) -> dict:
        with self.sessions() as s:
            m = self._model(s, name)
            return self.version_dict(m, self._version(s, m, version))

    def resolve(self, name: str, version: int | None = None, alias: str | None = None) -> tuple[dict, dict]:
        """(model, version) for a request: an explicit version, an alias, else `production`,
        else the latest."""
        with self.sessions() as s:
            m = self._model(s, name)
            aliases = {a.alias: a.version for a in m.aliases}
            if version is None:
                if alias is not None:
                    if alias not in aliases:
                        raise ModelNotFound(f"model {name!r} has no alias {alias!r}")
                    version = aliases[alias]
                elif "production" in aliases:
                    version = aliases["production"]
                elif m.versions:
                    version = max(v.version for v in m.versions)
                else:
                    raise ModelNotFound(f"model {name!r} has no versions yet")
            return self.model_dict(m), self.version_dict(m, self._version(s, m, version))

    def weights_path(self, name: str, version: int) -> Path:
        v = self.get_version(name, version)
        path = self.store.path(v["sha256"])
        if not path.is_file():
            raise ModelNotFound(f"weights of {name!r} version {version} are missing from the artifact store")
        return path

    def delete_version(self, name: str, version: int) -> None:
        with self.sessions.begin() as s:
            m = self._model(s, name)
            v = self._version(s, m, version)
            held = sorted(a.alias for a in m.aliases if a.version == version)
            if held:
                raise Conflict(f"version {version} of {name!r} is held by alias(es) {', '.join(held)}; move or delete them first")
            sha = v.sha256
            s.delete(v)
        with self.sessions() as s:
            still_used = s.scalar(select(func.count()).select_from(db.ModelVersion).where(db.ModelVersion.sha256 == sha))
        if not still_used:
            self.store.path(sha).unlink(missing_ok=True)
        self._emit("version_deleted", {"model": name, "version": version})

    # ------------------------------------------------------------------ aliases
    def set_alias(self, name: str, alias: str, version: int) -> dict:
        check_name(alias, "alias")
        with self.sessions.begin() as s:
            m = self._model(s, name)
            self._version(s, m, version)
            existing = next((a for a in m.aliases if a.alias == alias), None)
            if existing:
                existing.version = version
            else:
                s.add(db.Alias(model_id=m.id, alias=alias, version=version))
        self._emit("alias", {"model": name, "alias": alias, "version": version})
        return self.get_model(name)

    def delete_alias(self, name: str, alias: str) -> None:
        with self.sessions.begin() as s:
            m = self._model(s, name)
            existing = next((a for a in m.aliases if a.alias == alias), None)
            if existing is None:
                raise ModelNotFound(f"model {name!r} has no alias {alias!r}")
            s.delete(existing)
        self._emit("alias", {"model": name, "alias": alias, "version": None})

    def referenced_shas(self) -> set[str]:
        with self.sessions() as s:
            return set(s.scalars(select(db.ModelVersion.sha256)))

    # ------------------------------------------------------------------ runs
    @staticmethod
    def _run_dict(r: db.Run, rounds: list[db.Round]) -> dict:
        done = {}
        for rd in rounds:
            done[rd.phase] = max(done.get(rd.phase, 0), rd.round)
        return {**r.body, "run_id": r.run_id, "rounds_done": done, "rounds_total": len(rounds),
                "created_at": db.iso(r.created_at), "updated_at": db.iso(r.updated_at)}

    def upsert_run(self, run_id: str, body: RunUpsert) -> dict:
        check_name(run_id, "run id")
        with self.sessions.begin() as s:
            r = s.get(db.Run, run_id)
            if r is None:
                r = db.Run(run_id=run_id, body=body.model_dump())
                s.add(r)
            else:
                r.body = body.model_dump()
                r.updated_at = db.utcnow()
            s.flush()
            out = self._run_dict(r, list(s.scalars(select(db.Round).where(db.Round.run_id == run_id))))
        self._emit("run", out)
        return out

    def add_round(self, run_id: str, body: RoundCreate) -> dict:
        check_name(run_id, "run id")
        with self.sessions.begin() as s:
            if s.get(db.Run, run_id) is None:
                raise ModelNotFound(f"run {run_id!r} not found; PUT /v1/runs/{run_id} first")
            existing = s.scalar(select(db.Round).where(db.Round.run_id == run_id, db.Round.phase == body.phase, db.Round.round == body.round))
            data = body.model_dump()
            if existing:  # a retried POST replaces, never duplicates
                existing.body = data
            else:
                s.add(db.Round(run_id=run_id, phase=body.phase, round=body.round, body=data))
            run = s.get(db.Run, run_id)
            run.updated_at = db.utcnow()
        self._emit("round", {"run_id": run_id, **data})
        return {"run_id": run_id, **data}

    def list_runs(self) -> list[dict]:
        with self.sessions() as s:
            runs = list(s.scalars(select(db.Run).order_by(db.Run.created_at.desc())))
            return [self._run_dict(r, list(s.scalars(select(db.Round).where(db.Round.run_id == r.run_id)))) for r in runs]

    def get_run(self, run_id: str) -> dict:
        check_name(run_id, "run id")
        with self.sessions() as s:
            r = s.get(db.Run, run_id)
            if r is None:
                raise ModelNotFound(f"run {run_id!r} not found")
            return self._run_dict(r, list(s.scalars(select(db.Round).where(db.Round.run_id == run_id))))

    def rounds(self, run_id: str) -> list[dict]:
        self.get_run(run_id)
        with self.sessions() as s:
            rows = s.scalars(select(db.Round).where(db.Round.run_id == run_id).order_by(db.Round.id))
            order = {"ssl": 0, "finetune": 1, "generate": 2}
            return sorted((r.body for r in rows), key=lambda b: (order.get(b["phase"], 9), b["round"]))

    def rounds_csv(self, run_id: str) -> str:
        buf = io.StringIO()
        cols = ["phase", "round", "hospital", *ROUND_CSV_SCALARS, "duration_seconds", "bytes_sent", "bytes_received"]
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for rd in self.rounds(run_id):
            base = {"phase": rd["phase"], "round": rd["round"]}
            w.writerow({**base, "hospital": "aggregated", **_scalars(rd.get("aggregated", {})),
                        "duration_seconds": rd.get("duration_seconds"), "bytes_sent": rd.get("bytes_sent"),
                        "bytes_received": rd.get("bytes_received")})
            for h, m in sorted(rd.get("hospitals", {}).items()):
                w.writerow({**base, "hospital": h, **_scalars(m)})
        return buf.getvalue()


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
