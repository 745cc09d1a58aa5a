"""Loaded models: built from registry weights on first use, kept in a bounded LRU cache.

Requests name a model and optionally a version or alias. Resolving that to a version is a
database read, so its answer is cached: a write in this process (alias moved, version added
or deleted) clears the cache at once, and entries expire after `resolve_ttl` seconds so a
write by another replica sharing the database shows within that time. The new version loads
on its first request.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from fedssl_core import models as core_models
from fedssl_core import names, weights
from fedssl_core.errors import FedSSLError
from fedssl_core.preprocessing import MAX_IMAGE_PIXELS, load_image, normalize

from ..core.errors import ModelNotReady
from ..service import Registry
from .batcher import DynamicBatcher


@dataclass
class LoadedModel:
    name: str
    version: int
    task: str
    spec: dict
    module: torch.nn.Module
    batcher: DynamicBatcher

    @property
    def image_size(self) -> int:
        return int(self.spec["image_size"])

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.get("class_names", []))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalised float32 (N, 3, S, S) → probabilities (classification) or embeddings."""
        with torch.inference_mode():
            out = self.module(torch.from_numpy(x))
            out = torch.softmax(out, dim=1) if self.task == names.TASK_CLASSIFICATION else out
            return out.numpy().astype(np.float32, copy=False)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.spec.get("mean") or names.IMAGENET_MEAN)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.spec.get("std") or names.IMAGENET_STD)

    def preprocess(self, data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
        """An uploaded JPEG/PNG → the normalised float32 (1, 3, S, S) array `forward` takes: the
        hospitals' `load_image` and `normalize`, with this version's image size, mean and std.
        Numpy and Pillow only, so any thread may run it. Raises ImageDecodeError."""
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


class ModelRepository:
    def __init__(self, registry: Registry, *, cache_size: int, max_batch_size: int, max_wait_ms: float,
                 metrics=None, resolve_ttl: float = 1.0, executor: ThreadPoolExecutor | None = None) -> None:
        self.registry = registry
        self.resolve_ttl = resolve_ttl
        self._resolved: dict[tuple, tuple[float, dict, dict]] = {}
        self.cache_size = max(1, cache_size)
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms
        self.metrics = metrics
        self._cache: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._load_locks: dict[tuple[str, int], asyncio.Lock] = {}
        # Every torch operation of the service runs on one thread (`torch_thread`): loads,
        # forwards, and the registry's upload validation.
        self.executor = executor or torch_thread()

    def on_registry_event(self, event: str, payload: dict) -> None:
        """Registry listener: any change to models, versions or aliases invalidates resolution."""
        if event in ("model", "version", "version_deleted", "alias"):
            self._resolved.clear()
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
        return model, ver

    def loaded(self) -> list[tuple[str, int]]:
        return list(self._cache)

    def _build(self, model: dict, version: dict) -> LoadedModel:
        name, number = model["name"], version["version"]
        try:
            state = weights.load_file(self.registry.weights_path(name, number))
            module = core_models.build_inference_model(model["task"], model["architecture"], len(model["input_spec"].get("class_names", [])) or None)
            weights.load_into(module, state)
        except FedSSLError as exc:
            raise ModelNotReady(f"model {name!r} version {number} cannot be loaded: {exc}") from exc
        module.eval()
        loaded = LoadedModel(name, number, model["task"], model["input_spec"], module, None)  # type: ignore[arg-type]
        on_batch = (lambda n, s: self.metrics.observe_batch(name, n, s)) if self.metrics else None
        loaded.batcher = DynamicBatcher(loaded.forward, max_batch_size=self.max_batch_size, max_wait_ms=self.max_wait_ms,
                                        executor=self.executor, on_batch=on_batch)
        return loaded

    async def get(self, name: str, version: int | None = None, alias: str | None = None) -> LoadedModel:
        model, ver = self.resolve(name, version, alias)
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
            loaded = await asyncio.get_running_loop().run_in_executor(self.executor, self._build, model, ver)
            with self._lock:
                self._cache[key] = loaded
                while len(self._cache) > self.cache_size:
                    _, evicted = self._cache.popitem(last=False)
                    evicted.batcher.close()
            if self.metrics:
                self.metrics.loaded_models.set(len(self._cache))
            return loaded

    def forget(self, name: str, version: int | None = None) -> None:
        with self._lock:
            for key in [k for k in self._cache if k[0] == name and (version is None or k[1] == version)]:
                self._cache.pop(key).batcher.close()

    def close(self) -> None:
        for m in self._cache.values():
            m.batcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
