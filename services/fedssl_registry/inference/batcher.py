"""Dynamic batching: concurrent requests to one model share a forward pass.

Requests queue up; a worker takes what is queued (up to `max_batch_size` images), runs one
forward in a thread (torch releases the GIL) and hands each request its rows. Requests that
arrive during a forward form the next batch. Before a forward the worker may wait (at most
`max_wait_ms`) for more: while other requests are still being read and parsed
(`incoming()`), or until the batch is as large as the largest of the last second (the
current concurrency). A lone client therefore never pays the batching delay, and a steady
crowd of clients gets full batches.

A request of more rows than fit in a forward is split: the worker takes the rows that fit
and queues the rest of it behind the requests that arrived meanwhile, so a large request
shares the model in turns with the others instead of holding it for all its rows.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class _Job:
    """One `submit`: its rows, how many have been taken into forwards, and their outputs."""

    __slots__ = ("rows", "taken", "outputs", "future")

    def __init__(self, rows: np.ndarray, future: asyncio.Future) -> None:
        self.rows, self.taken, self.outputs, self.future = rows, 0, [], future

    @property
    def left(self) -> int:
        return self.rows.shape[0] - self.taken


class DynamicBatcher:
    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], *, max_batch_size: int, max_wait_ms: float,
                 executor: ThreadPoolExecutor, on_batch: Callable[[int, float], None] | None = None) -> None:
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.executor = executor
        self.on_batch = on_batch
        # A deque and one wake-up future rather than asyncio.Queue + wait_for: this runs on
        # the event loop once per request, and wait_for costs a task per call.
        self._pending: deque[_Job] = deque()
        self._wakeup: asyncio.Future | None = None
        self._worker: asyncio.Task | None = None
        self._arriving = 0
        self._recent: deque[tuple[float, int]] = deque(maxlen=64)  # (time, images) of recent batches

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Wrap reading and parsing a request that will `submit`: the worker waits for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            if self._arriving == 0:
                self._wake()  # one that failed to parse must not hold a batch until the deadline

    async def submit(self, batch: np.ndarray) -> np.ndarray:
        """Queue `batch` (N, C, H, W); returns its N output rows."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run())
        fut = loop.create_future()
        self._pending.append(_Job(batch, fut))
        self._wake()
        return await fut

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _sleep(self, loop: asyncio.AbstractEventLoop, deadline: float | None) -> None:
        """Until `submit` or the end of an incoming request wakes the worker, or `deadline`."""
        self._wakeup = loop.create_future()
        timer = loop.call_at(deadline, self._wake) if deadline is not None else None
        try:
            await self._wakeup
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pending = self._pending
        while True:
            while pending and pending[0].future.done():  # cancelled (client gone) or failed in an earlier chunk
                pending.popleft()
            if not pending:
                await self._sleep(loop, None)
                continue
            start = loop.time()
            deadline = start + self.max_wait
            target = max((n for t, n in self._recent if start - t < 1.0), default=1)
            while True:
                size = sum(job.left for job in pending)
                if size >= self.max_batch_size or (self._arriving <= 0 and size >= target) or loop.time() >= deadline:
                    break
                await self._sleep(loop, deadline)
            taken: list[tuple[_Job, int]] = []  # (job, rows of it in this forward)
            size = 0
            while pending and size < self.max_batch_size:
                job = pending.popleft()
                if job.future.done():
                    continue
                n = min(job.left, self.max_batch_size - size)
                taken.append((job, n))
                size += n
                if n < job.left:
                    pending.append(job)  # the rest of it waits its turn behind the others
                    break
            if not taken:
                continue
            parts = [job.rows[job.taken : job.taken + n] for job, n in taken]
            for job, n in taken:
                job.taken += n
            inputs = np.concatenate(parts) if len(parts) > 1 else parts[0]
            self._recent.append((loop.time(), size))
            t0 = time.perf_counter()
            try:
                out = await loop.run_in_executor(self.executor, self.forward, inputs)
            except Exception as exc:  # every waiter gets the error (once), the worker goes on
                for job, _ in taken:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            seconds = time.perf_counter() - t0
            row = 0
            for job, n in taken:
                job.outputs.append(out[row : row + n])
                row += n
                if job.left == 0 and not job.future.done():
                    job.future.set_result(job.outputs[0] if len(job.outputs) == 1 else np.concatenate(job.outputs))
            if self.on_batch:  # queued behind the waiters: their responses go out first
                loop.call_soon(self.on_batch, inputs.shape[0], seconds)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
