"""Loaded models: built from registry weights on first use, kept in a bounded cache.

Requests name a model and optionally a version or alias. Resolving that to a version is a
database read, so its answer is cached: a write in this process (alias moved, version added
or deleted) clears the cache at once, and entries expire after `resolve_ttl` seconds so a
write by another replica sharing the database shows within that time. The new version loads
on its first request.

What stays loaded, as a serving product keeps its deployed revisions up and loads others on
demand (KServe's ModelMesh, Triton's model control):
* pinned: each model's served versions, those an alias points at and its default (the
  `production` alias, else the latest version). Loaded on first use, never evicted to make
  room, and never refused: only a write with the token changes them.
* on demand: any other version asked for by number. At most `cache_size` stay loaded (least
  recently used evicted first), and each model loads at most `loads_per_minute` of them in
  any 60 s. Loading a version takes the torch thread for about a second (a ResNet-18 on 2
  cores), so a client cycling through more versions than the cache holds made every
  request, everyone's, wait for a load; past the limit it gets 429 with Retry-After instead.
"""

from __future__ import annotations

import asyncio
import functools
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from fedssl_core import generative, hospital_batchnorm, label_shift, names, weights
from fedssl_core import models as core_models
from fedssl_core.errors import FedSSLError
from fedssl_core.preprocessing import MAX_IMAGE_PIXELS, load_image, normalize

from ..core.errors import InvalidInput, ModelNotFound, ModelNotReady, TooManyLoads, WrongTask
from ..service import Registry, servable
from .batcher import DynamicBatcher
from .decode import DecodePool


# The tasks each way in serves; a model of another task is refused (`WrongTask`) naming
# the call that serves it (`served_by`).
IMAGE_TASKS = (names.TASK_EMBEDDING, names.TASK_CLASSIFICATION)  # :predict, /v2 `input` and `image`
GENERATION_TASKS = (names.TASK_GENERATION,)  # :generate, /v2 `class`


def served_by(name: str, task: str) -> str:
    """The calls that serve model `name` of `task`, for an error that sends a client there."""
    if task == names.TASK_GENERATION:
        return (f"POST /v1/models/{name}:generate with a JSON body {{\"class\", \"count\", \"seed\"}}, or /v2 infer "
                "with input 'class' (INT64) and 'seed' or 'latent'")
    return f"POST /v1/models/{name}:predict with an image upload, or /v2 infer with input 'image' (UINT8) or 'input' (FP32)"


def check_task(model: dict, tasks: tuple[str, ...], call: str) -> None:
    """Refuse `call` on `model` (a `Registry.model_dict`) unless its task is one of `tasks`."""
    if model["task"] not in tasks:
        raise WrongTask(f"model {model['name']!r} is a {model['task']} model, and {call} serves {' and '.join(tasks)} "
                        f"models; use {served_by(model['name'], model['task'])}")


@dataclass
class LoadedModel:
    name: str
    version: int
    task: str
    spec: dict
    module: torch.nn.Module
    batcher: DynamicBatcher | None  # None for a generator: see `ModelRepository.generate`
    label_ratios: dict[str, np.ndarray] = field(default_factory=dict)  # hospital -> its prior over the federation's
    # hospital -> the batcher of the model with that hospital's BatchNorm statistics (fedssl_core.hospital_batchnorm)
    hospital_batchers: dict[str, DynamicBatcher] = field(default_factory=dict)

    def for_hospital(self, hospital: str | None) -> tuple[DynamicBatcher, np.ndarray | None]:
        """The batcher and prior ratio that serve `hospital` (`label_ratio`): its own BatchNorm
        statistics' model where this version carries them, else the shared model; the shared
        model and no ratio when the request names no hospital."""
        ratio = self.label_ratio(hospital)
        assert self.batcher is not None
        return (self.hospital_batchers.get(hospital, self.batcher) if hospital is not None else self.batcher), ratio

    async def infer(self, x: np.ndarray, hospital: str | None = None) -> np.ndarray:
        """The one inference path of an image model, behind `:predict` and v2 `infer` alike:
        normalised float32 (N, 3, S, S) → probabilities or embeddings (N, D), batched with
        other requests (`DynamicBatcher`), checked finite, and for a request that names its
        `hospital`, served by that hospital's BatchNorm statistics where this version
        carries them and adjusted to its label mix (`for_hospital`)."""
        batcher, ratio = self.for_hospital(hospital)
        out = self.check_finite(await batcher.submit(x))
        return out if ratio is None else label_shift.adjust(out, ratio)

    def label_ratio(self, hospital: str | None) -> np.ndarray | None:
        """The prior ratio that serves `hospital` its own label mix (`fedssl_core.label_shift`),
        or None when the request names no hospital. InvalidInput when this version cannot."""
        if hospital is None:
            return None
        if self.task != names.TASK_CLASSIFICATION:
            raise InvalidInput(f"'hospital' adjusts a classifier's probabilities to a hospital's label mix; model "
                               f"{self.name!r} is a {self.task} model: leave it out")
        if not self.label_ratios:
            raise InvalidInput(f"model {self.name!r} version {self.version} records no hospitals' label counts (trained "
                               "without balanced softmax, or registered before versions carried them): leave 'hospital' out")
        if hospital not in self.label_ratios:
            raise InvalidInput(f"unknown hospital {hospital!r}; model {self.name!r} version {self.version} was trained by "
                               f"{', '.join(sorted(self.label_ratios))} (a caller from outside the federation names none)")
        return self.label_ratios[hospital]

    @property
    def image_size(self) -> int:
        return int(self.spec["image_size"])

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.get("class_names", []))

    def close(self) -> None:
        for b in (self.batcher, *self.hospital_batchers.values()):
            if b is not None:
                b.close()

    def generate(self, labels: np.ndarray, seed: int, latent: np.ndarray | None = None) -> np.ndarray:
        """A generator's uint8 (N, S, S, 3) RGB images of class indices `labels` (N,), from
        latents drawn with `seed` or given as `latent` (N, z_dim): `generative.sample`,
        channels last as image files and the v2 `images` output have them. Torch: run it on
        the torch thread."""
        # copies: a v2 binary tensor is a read-only view of the request body, which torch will not wrap
        z = None if latent is None else torch.tensor(latent, dtype=torch.float32)
        images = generative.sample(self.module, torch.tensor(labels, dtype=torch.long), seed, z=z)
        return np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())

    def forward(self, x: np.ndarray, module: torch.nn.Module | None = None) -> np.ndarray:
        """Normalised float32 (N, 3, S, S) → probabilities (classification) or embeddings, by
        `module` (a hospital's statistics, `hospital_batchers`) or this version's own."""
        with torch.inference_mode():
            out = (module or self.module)(torch.from_numpy(x))
            out = torch.softmax(out, dim=1) if self.task == names.TASK_CLASSIFICATION else out
            return out.numpy().astype(np.float32, copy=False)

    def check_finite(self, out: np.ndarray) -> np.ndarray:
        """`out` (this request's rows of `forward`), unless a value is NaN or infinite: then
        an InvalidInput, never an answer with no numbers in it. The upload's probe makes that
        rare; extreme FP32 input values still overflow."""
        if not np.isfinite(out).all():
            what = "probabilities" if self.task == names.TASK_CLASSIFICATION else "embedding"
            raise InvalidInput(f"model {self.name!r} version {self.version} gives non-finite {what} (NaN or infinity) "
                               "for this input; normalised inputs are expected within a few units of 0")
        return out

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.spec.get("mean") or names.IMAGENET_MEAN)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.spec.get("std") or names.IMAGENET_STD)

    def preprocess(self, data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
        """An uploaded JPEG/PNG → the normalised float32 (1, 3, S, S) array `forward` takes: the
        hospitals' `load_image` and `normalize`, with this version's image size, mean and std.
        Numpy and Pillow only (no torch): it runs on the decode pool. Raises ImageDecodeError."""
        return normalize(load_image(data, self.image_size, max_pixels)[None], self.mean, self.std)


def torch_thread(threads: int | None = None) -> ThreadPoolExecutor:
    """The one thread on which a registry process runs torch, with `threads` intra-op threads
    (None: the CPUs this process may use).

    A forward already uses every core torch was given. Each further thread that calls torch
    gets its own OpenMP team, and once a process has more OpenMP threads than cores, libgomp
    stops spinning at barriers and sleeps instead: measured on 2 cores, a ResNet-18 forward
    went from 7 to 10.5 ms after one upload had been validated on another thread. The event
    loop therefore only handles bytes and numpy arrays.
    """
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedssl-torch")
    executor.submit(core_models.set_torch_threads, threads).result()
    return executor


def pinned_versions(model: dict) -> frozenset[int]:
    """The versions of `model` (a `Registry.model_dict`) that stay loaded: the alias targets
    and the default an unversioned request gets (`production`, else the latest)."""
    aliases = model.get("aliases") or {}
    default = aliases.get("production", model.get("latest_version"))
    return frozenset(v for v in (*aliases.values(), default) if v is not None)


class LoadLimit:
    """At most `per_minute` on-demand loads per model in any 60 s (0: no limit)."""

    WINDOW = 60.0

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute, self.clock = per_minute, clock
        self._loads: dict[str, deque[float]] = {}

    def take(self, model: str) -> int | None:
        """Counts one load of `model` and returns None, or, when the limit is reached, the
        whole seconds until a load is allowed again (and counts nothing)."""
        if self.per_minute <= 0:
            return None
        now = self.clock()
        loads = self._loads.setdefault(model, deque())
        while loads and now - loads[0] >= self.WINDOW:
            loads.popleft()
        if len(loads) >= self.per_minute:
            return max(1, math.ceil(loads[0] + self.WINDOW - now))
        loads.append(now)
        return None


class ModelRepository:
    def __init__(self, registry: Registry, *, cache_size: int, max_batch_size: int, max_wait_ms: float,
                 metrics=None, resolve_ttl: float = 1.0, executor: ThreadPoolExecutor | None = None,
                 decode_workers: int = 2, loads_per_minute: int = 0) -> None:
        self.registry = registry
        self.resolve_ttl = resolve_ttl
        self._resolved: dict[tuple, tuple[float, dict, dict]] = {}
        self.cache_size = max(1, cache_size)
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms
        self.metrics = metrics
        self._cache: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()  # least recently used first
        self._pinned: dict[str, frozenset[int]] = {}  # per model, as of its last resolution
        self.load_limit = LoadLimit(loads_per_minute)
        self._lock = threading.Lock()
        self._load_locks: dict[tuple[str, int], asyncio.Lock] = {}
        # Every torch operation of the service runs on one thread (`torch_thread`): loads,
        # forwards, and the registry's upload validation.
        self.executor = executor or torch_thread()
        # Request decoding (Pillow, json, numpy) on its own bounded threads (`decode.DecodePool`).
        self.decoder = DecodePool(decode_workers, metrics)

    def on_registry_event(self, event: str, payload: dict) -> None:
        """Registry listener: any change to models, versions or aliases invalidates resolution."""
        if event in ("model", "version", "version_deleted", "alias"):
            self._resolved.clear()
            self._pinned.pop(payload.get("model") or payload.get("name"), None)
        if event == "version_deleted":
            self.forget(payload["model"], payload["version"])

    def resolve(self, name: str, version: int | None = None, alias: str | None = None) -> tuple[dict, dict]:
        key = (name, version, alias)
        hit = self._resolved.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.resolve_ttl:
            return hit[1], hit[2]
        model, ver = self.registry.resolve(name, version, alias)
        if len(self._resolved) > 1024:  # bounded: names in requests are user input
            self._resolved.clear()
        self._resolved[key] = (time.monotonic(), model, ver)
        self._pinned[model["name"]] = pinned_versions(model)
        return model, ver

    def _pinned_of(self, name: str) -> frozenset[int]:
        pinned = self._pinned.get(name)
        if pinned is None:  # a write cleared it
            try:
                pinned = self._pinned[name] = pinned_versions(self.registry.get_model(name))
            except ModelNotFound:
                pinned = frozenset()
        return pinned

    def loaded(self) -> list[tuple[str, int]]:
        return list(self._cache)

    def _build(self, model: dict, version: dict) -> LoadedModel:
        name, number = model["name"], version["version"]
        path = self.registry.weights_path(name, number)
        try:  # the upload checks again: a version stored before they existed may not pass them
            data = path.read_bytes()
            served = servable(model, weights.from_bytes(data), weights.read_metadata(data))
        except FedSSLError as exc:
            raise ModelNotReady(f"model {name!r} version {number} cannot be loaded: {exc}") from exc
        hospital_modules = {h: hospital_batchnorm.with_statistics(served.module, s) for h, s in served.hospital_stats.items()}
        loaded = LoadedModel(name, number, model["task"], model["input_spec"], served.module, None, served.label_ratios)
        if model["task"] == names.TASK_GENERATION:
            return loaded
        on_batch = (lambda n, s: self.metrics.observe_batch(name, n, s)) if self.metrics else None

        def batcher(forward) -> DynamicBatcher:
            return DynamicBatcher(forward, max_batch_size=self.max_batch_size, max_wait_ms=self.max_wait_ms,
                                  executor=self.executor, on_batch=on_batch)

        loaded.batcher = batcher(loaded.forward)
        loaded.hospital_batchers = {h: batcher(functools.partial(loaded.forward, module=m)) for h, m in hospital_modules.items()}
        return loaded

    async def get(self, name: str, version: int | None = None, alias: str | None = None, *,
                  tasks: tuple[str, ...] | None = None, call: str = "") -> LoadedModel:
        """The loaded version a request names (see `resolve`), loading it if need be. With
        `tasks`, a model of another task is refused (`check_task`, naming `call`) before
        anything is loaded."""
        model, ver = self.resolve(name, version, alias)
        if tasks is not None:
            check_task(model, tasks, call)
        key = (model["name"], ver["version"])
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        lock = self._load_locks.setdefault(key, asyncio.Lock())
        async with lock:  # one load per version, however many requests wait for it
            with self._lock:
                if key in self._cache:
                    return self._cache[key]
            pinned = self._pinned_of(key[0])
            if key[1] not in pinned:
                wait = self.load_limit.take(key[0])
                if wait is not None:
                    if self.metrics:
                        self.metrics.model_loads_refused.labels(key[0]).inc()
                    served = ", ".join(map(str, sorted(pinned))) or "none"
                    raise TooManyLoads(
                        f"model {key[0]!r} version {key[1]} is not loaded, and loading it would exceed this model's "
                        f"{self.load_limit.per_minute} loads per minute of versions no alias points at "
                        f"(FEDSSL_REGISTRY_MODEL_LOADS_PER_MINUTE); retry after {wait} s, or ask for a version kept "
                        f"loaded (the production alias, else the latest, and other aliases: {served})", wait)
            loaded = await asyncio.get_running_loop().run_in_executor(self.executor, self._build, model, ver)
            if self.metrics:
                self.metrics.model_loads.labels(key[0], "pinned" if key[1] in pinned else "on_demand").inc()
            evicted = []
            pins = {n: self._pinned_of(n) for n in {k[0] for k in self._cache}}  # a database read may happen: not under the lock
            with self._lock:
                self._cache[key] = loaded
                on_demand = [k for k in self._cache if k[1] not in pins.get(k[0], pinned)]
                for old in on_demand[: max(0, len(on_demand) - self.cache_size)]:
                    evicted.append(self._cache.pop(old))
            for m in evicted:
                m.close()
            if self.metrics:
                self.metrics.loaded_models.set(len(self._cache))
            return loaded

    async def generate(self, model: LoadedModel, labels: np.ndarray, seed: int, latent: np.ndarray | None = None) -> np.ndarray:
        """`model.generate` on the torch thread, counted in the metrics.

        Not through the dynamic batcher: a request's latents are drawn together from its
        seed (`generative.latents`), so requests are not merged, and each is one turn of the
        torch thread; the count limit (FEDSSL_REGISTRY_MAX_GENERATE_COUNT) bounds that turn."""
        t0 = time.perf_counter()
        images = await asyncio.get_running_loop().run_in_executor(self.executor, model.generate, labels, seed, latent)
        if self.metrics:
            self.metrics.observe_generation(model.name, len(images), time.perf_counter() - t0)
        return images

    def forget(self, name: str, version: int | None = None) -> None:
        with self._lock:
            for key in [k for k in self._cache if k[0] == name and (version is None or k[1] == version)]:
                self._cache.pop(key).close()

    def close(self) -> None:
        for m in self._cache.values():
            m.close()
        self.decoder.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
