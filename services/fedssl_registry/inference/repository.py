"""Loaded models: built from registry weights on first use, kept in a bounded LRU cache.

Requests name a model and optionally a version or alias; resolution happens on every
request, so moving an alias switches the served version at once (the new one loads on its
first request).
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from fedssl_core import models as core_models
from fedssl_core import names, weights
from fedssl_core.errors import FedSSLError

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.module(x)
            return torch.softmax(out, dim=1) if self.task == names.TASK_CLASSIFICATION else out


class ModelRepository:
    def __init__(self, registry: Registry, *, cache_size: int, max_batch_size: int, max_wait_ms: float, threads: int,
                 metrics=None) -> None:
        self.registry = registry
        self.cache_size = max(1, cache_size)
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms
        self.metrics = metrics
        self._cache: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._load_locks: dict[tuple[str, int], asyncio.Lock] = {}
        self.executor = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="fedssl-infer")

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
        model, ver = self.registry.resolve(name, version, alias)
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
