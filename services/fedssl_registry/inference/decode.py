"""Decoding requests off the event loop, a bounded number at a time.

An uploaded image (`:predict`) or a large v2 request body is turned into an array by
Pillow, `json` and numpy: tens of milliseconds to seconds of CPU, and up to ~130 MB for
one 16 MP PNG. On the event loop that stalls every other request, health checks included;
on an unbounded thread pool eight such uploads at once took the registry from 1.0 to
2.5 GB. `DecodePool` runs at most `workers` decodes at once on its own threads; the
rest wait their turn (in arrival order) holding only their request bytes. No torch runs
here: torch belongs to the one torch thread (`repository.torch_thread`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class DecodePool:
    def __init__(self, workers: int, metrics=None) -> None:
        if workers < 1:
            raise ValueError(f"decode workers must be >= 1, got {workers}")
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedssl-decode")
        self._slots = asyncio.Semaphore(workers)
        self.running = 0  # decodes on a thread now
        self.waiting = 0  # decodes waiting for a thread
        self.metrics = metrics

    async def run(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` on a decode thread once one is free. A request cancelled while it waits
        (its client left) never decodes; one cancelled while decoding keeps its thread, and
        its slot, until `fn` returns, so no more than `workers` ever run at once."""
        loop = asyncio.get_running_loop()
        self.waiting += 1
        self._publish()
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        self._publish()
        try:
            job = self._executor.submit(fn, *args)
        except BaseException:
            self._release()
            raise
        job.add_done_callback(lambda _: self._release_from(loop))
        return await asyncio.wrap_future(job)

    def _release_from(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.call_soon_threadsafe(self._release)
        except RuntimeError:  # the loop is closed: the service is shutting down
            pass

    def _release(self) -> None:
        self.running -= 1
        self._slots.release()
        self._publish()

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.decodes_running.set(self.running)
            self.metrics.decodes_waiting.set(self.waiting)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
