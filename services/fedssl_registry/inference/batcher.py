"""Dynamic batching: concurrent requests to one model share a forward pass.

Requests queue up; a worker takes up to `max_batch_size` images, waiting at most
`max_wait_ms` after the first for more, runs one forward in a thread (torch releases the
GIL) and hands each request its rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch


class DynamicBatcher:
    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], *, max_batch_size: int, max_wait_ms: float,
                 executor: ThreadPoolExecutor, on_batch: Callable[[int, float], None] | None = None) -> None:
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.executor = executor
        self.on_batch = on_batch
        self.queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future]] = asyncio.Queue()
        self._worker: asyncio.Task | None = None

    async def submit(self, batch: torch.Tensor) -> torch.Tensor:
        """Queue `batch` (N, C, H, W); returns its N output rows."""
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run())
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put((batch, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            items = [first]
            size = first[0].shape[0]
            deadline = loop.time() + self.max_wait
            while size < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                items.append(item)
                size += item[0].shape[0]
            inputs = torch.cat([b for b, _ in items]) if len(items) > 1 else items[0][0]
            t0 = time.perf_counter()
            try:
                out = await loop.run_in_executor(self.executor, self.forward, inputs)
            except Exception as exc:  # every waiter gets the error, the worker goes on
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            if self.on_batch:
                self.on_batch(inputs.shape[0], time.perf_counter() - t0)
            start = 0
            for b, fut in items:
                n = b.shape[0]
                if not fut.done():
                    fut.set_result(out[start : start + n])
                start += n

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
