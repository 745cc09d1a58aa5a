"""Decoding off the event loop, a bounded number at a time (issue 17, item 3): eight large
PNGs decoded at once on the event loop took the registry from 1.0 to 2.5 GB and stalled its
health checks for 2.7 s."""

import asyncio
import io
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from fedssl_registry.inference.decode import DecodePool
from tests.support import processes as P

from .conftest import model_body, upload


class Gate:
    """A decode that blocks until the test opens the gate, counting how many run at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.open = loop, threading.Event()
        self.lock = threading.Lock()
        self.started = self.running = self.most = 0
        self.changed = asyncio.Event()

    def __call__(self, value):
        with self.lock:
            self.started += 1
            self.running += 1
            self.most = max(self.most, self.running)
        self.loop.call_soon_threadsafe(self.changed.set)
        self.open.wait(30)
        with self.lock:
            self.running -= 1
        return value * 2

    async def until(self, condition) -> None:
        async with asyncio.timeout(30):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


def test_at_most_workers_decodes_run_at_once_and_the_loop_stays_free():
    async def main():
        pool = DecodePool(2)
        gate = Gate(asyncio.get_running_loop())
        tasks = [asyncio.create_task(pool.run(gate, i)) for i in range(5)]
        await gate.until(lambda: gate.started == 2)
        # This coroutine runs on the event loop while both decode threads are blocked.
        assert (pool.running, pool.waiting) == (2, 3)
        gate.open.set()
        assert await asyncio.gather(*tasks) == [0, 2, 4, 6, 8]
        assert (gate.started, gate.most, pool.running, pool.waiting) == (5, 2, 0, 0)
        pool.close()

    asyncio.run(main())


def test_a_request_cancelled_while_waiting_is_never_decoded():
    async def main():
        pool = DecodePool(1)
        gate = Gate(asyncio.get_running_loop())
        first = asyncio.create_task(pool.run(gate, 1))
        await gate.until(lambda: gate.started == 1)
        second = asyncio.create_task(pool.run(gate, 2))
        await asyncio.sleep(0)  # let it queue
        assert pool.waiting == 1
        second.cancel()
        gate.open.set()
        assert await first == 2
        with pytest.raises(asyncio.CancelledError):
            await second
        assert (gate.started, pool.running, pool.waiting) == (1, 0, 0)
        pool.close()

    asyncio.run(main())


def test_a_request_cancelled_while_decoding_holds_its_slot_until_the_decode_ends():
    """Its thread cannot be stopped, so its memory is still in use: the next decode waits."""
    async def main():
        pool = DecodePool(1)
        gate = Gate(asyncio.get_running_loop())
        first = asyncio.create_task(pool.run(gate, 1))
        await gate.until(lambda: gate.started == 1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.create_task(pool.run(gate, 2))
        await asyncio.sleep(0)
        assert (pool.running, pool.waiting, gate.started) == (1, 1, 1)
        gate.open.set()
        assert await second == 4
        assert (gate.started, gate.most) == (2, 1)
        pool.close()

    asyncio.run(main())


def test_decode_workers_must_be_positive():
    with pytest.raises(ValueError, match=r"^decode workers must be >= 1, got 0$"):
        DecodePool(0)


# --- the real registry ---------------------------------------------------------------------


def big_png(side: int = 3000) -> bytes:
    """A smooth `side` x `side` RGB PNG: a few MB on the wire, ~0.5 s and 27 MB to decode."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def decode_gauges(http: httpx.Client) -> tuple[int, int]:
    text = http.get("/metrics").text
    value = {name: int(float(re.search(rf"^fedssl_decodes_{name} (\S+)$", text, re.M).group(1))) for name in ("running", "waiting")}
    return value["running"], value["waiting"]


@pytest.mark.integration
def test_health_answers_while_large_images_wait_for_the_one_decode_thread(cluster, tmp_path, weights_blob):
    reg = P.start_registry(cluster, tmp_path / "data", decode_workers="1")
    png = big_png()
    with reg.client() as http:
        assert http.post("/v1/models", json=model_body()).status_code == 201
        assert upload(http, "clf", weights_blob).status_code == 201
        small = io.BytesIO()
        Image.new("RGB", (40, 40)).save(small, "PNG")
        assert http.post("/v1/models/clf:predict", files={"file": ("s.png", small.getvalue(), "image/png")}).status_code == 200

        def predict(_):
            with reg.client() as h:
                return h.post("/v1/models/clf:predict", files={"file": ("big.png", png, "image/png")})

        samples = []
        with ThreadPoolExecutor(5) as senders:
            sent = [senders.submit(predict, i) for i in range(5)]
            # Wait until two are queued behind the one decoding (the /metrics answers prove the
            # loop is free); a registry that decodes on the loop or without a bound never gets here.
            while not samples or samples[-1][1] < 2:
                assert not all(f.done() for f in sent), f"never saw two decodes waiting: {samples}"
                samples.append(decode_gauges(http))
            live, ready = http.get("/v2/health/live"), http.get("/v2/health/ready")
            still_decoding = sum(not f.done() for f in sent)
            while not all(f.done() for f in sent):
                samples.append(decode_gauges(http))
            answers = [f.result() for f in sent]
        assert (live.status_code, live.json()) == (200, {"live": True})
        assert (ready.status_code, ready.json()) == (200, {"ready": True})
        assert still_decoding >= 1, "the health checks were answered only after every decode had ended"
        assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
        assert max(running for running, _ in samples) == 1, samples
        assert decode_gauges(http) == (0, 0)
