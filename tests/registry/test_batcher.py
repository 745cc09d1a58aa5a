"""Dynamic batching: concurrent requests share forwards, each gets its own rows back, errors reach every waiter."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fedssl_registry.inference.batcher import DynamicBatcher


class SlowForward:
    """Row-wise doubling that takes a while, like a real forward; records the batch sizes."""

    def __init__(self, seconds: float = 0.05, fail: bool = False) -> None:
        self.seconds, self.fail = seconds, fail
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(x.shape[0])
        self.threads.add(threading.current_thread().name)
        threading.Event().wait(self.seconds)
        if self.fail:
            raise RuntimeError("forward exploded")
        return x * 2


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def executor():
    with ThreadPoolExecutor(1, thread_name_prefix="torch") as ex:
        yield ex


def test_concurrent_requests_share_forwards_and_get_their_own_rows(executor):
    fwd = SlowForward()
    batcher = DynamicBatcher(fwd, max_batch_size=8, max_wait_ms=20, executor=executor)

    async def main():
        inputs = [np.full((1, 2), i, dtype=np.float32) for i in range(16)]
        outs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        batcher.close()
        return inputs, outs

    inputs, outs = run(main())
    for x, y in zip(inputs, outs):
        np.testing.assert_array_equal(y, x * 2)
    assert sum(fwd.batches) == 16
    assert max(fwd.batches) <= 8
    assert len(fwd.batches) <= 4, f"16 concurrent requests should share forwards, got batches {fwd.batches}"
    assert fwd.threads == {"torch_0"}


def test_multi_image_requests_keep_their_row_ranges(executor):
    fwd = SlowForward(0.01)
    batcher = DynamicBatcher(fwd, max_batch_size=32, max_wait_ms=10, executor=executor)

    async def main():
        a = np.arange(6, dtype=np.float32).reshape(3, 2)
        b = np.arange(100, 104, dtype=np.float32).reshape(2, 2)
        ra, rb = await asyncio.gather(batcher.submit(a), batcher.submit(b))
        batcher.close()
        return a, b, ra, rb

    a, b, ra, rb = run(main())
    np.testing.assert_array_equal(ra, a * 2)
    np.testing.assert_array_equal(rb, b * 2)


def test_a_lone_request_does_not_wait_for_company(executor):
    # With a 10 s batching window, a lone request would visibly hang if the worker waited for more.
    fwd = SlowForward(0.0)
    batcher = DynamicBatcher(fwd, max_batch_size=8, max_wait_ms=10_000, executor=executor)

    async def main():
        out = await asyncio.wait_for(batcher.submit(np.ones((1, 2), np.float32)), timeout=5)
        batcher.close()
        return out

    np.testing.assert_array_equal(run(main()), np.full((1, 2), 2.0))
    assert fwd.batches == [1]


def test_requests_still_arriving_are_waited_for(executor):
    fwd = SlowForward(0.0)
    batcher = DynamicBatcher(fwd, max_batch_size=8, max_wait_ms=5_000, executor=executor)

    async def late():
        with batcher.incoming():  # being read and parsed: the worker should wait for it
            await asyncio.sleep(0.2)
        return await batcher.submit(np.full((1, 2), 7, np.float32))

    async def main():
        second = asyncio.ensure_future(late())
        await asyncio.sleep(0)  # `late` has registered as incoming
        first = await batcher.submit(np.ones((1, 2), np.float32))
        out = first, await second
        batcher.close()
        return out

    first, second = run(main())
    np.testing.assert_array_equal(second, np.full((1, 2), 14.0))
    assert fwd.batches == [2]


def test_a_request_that_fails_to_parse_does_not_hold_the_batch(executor):
    # The worker waits for requests still being parsed; one that fails must release it at once,
    # not at the end of the (here 10 s) batching window.
    fwd = SlowForward(0.0)
    batcher = DynamicBatcher(fwd, max_batch_size=8, max_wait_ms=10_000, executor=executor)

    async def bad():
        with batcher.incoming():
            await asyncio.sleep(0.05)
            raise ValueError("not a tensor")

    async def main():
        failing = asyncio.ensure_future(bad())
        await asyncio.sleep(0)  # `bad` is incoming
        out = await asyncio.wait_for(batcher.submit(np.ones((1, 2), np.float32)), timeout=5)
        with pytest.raises(ValueError):
            await failing
        batcher.close()
        return out

    np.testing.assert_array_equal(run(main()), np.full((1, 2), 2.0))
    assert fwd.batches == [1]


def test_a_failing_forward_fails_every_waiter_and_the_worker_goes_on(executor):
    fwd = SlowForward(0.01, fail=True)
    batcher = DynamicBatcher(fwd, max_batch_size=8, max_wait_ms=10, executor=executor)

    async def main():
        results = await asyncio.gather(*(batcher.submit(np.ones((1, 2), np.float32)) for _ in range(3)), return_exceptions=True)
        fwd.fail = False
        after = await batcher.submit(np.ones((1, 2), np.float32))
        batcher.close()
        return results, after

    results, after = run(main())
    assert all(isinstance(r, RuntimeError) and "forward exploded" in str(r) for r in results)
    np.testing.assert_array_equal(after, np.full((1, 2), 2.0))


def test_a_large_request_is_split_and_interleaves_with_a_small_one(executor):
    """Issue 17, item 4: a request of many rows ran as one forward however large, and every
    request queued behind it waited for all of it. Now its rows go in chunks of at most
    `max_batch_size`, and what is left of it queues behind the requests that came after."""
    fwd = SlowForward(0.0)
    batcher = DynamicBatcher(fwd, max_batch_size=4, max_wait_ms=10_000, executor=executor)
    finished: list[str] = []

    async def main():
        async def one(label, x):
            out = await batcher.submit(x)
            finished.append(label)
            return out

        big = np.arange(12 * 2, dtype=np.float32).reshape(12, 2)
        small = np.full((1, 2), -1, np.float32)
        rb, rs = await asyncio.gather(one("big", big), one("small", small))
        batcher.close()
        return big, small, rb, rs

    big, small, rb, rs = run(main())
    np.testing.assert_array_equal(rb, big * 2)  # the chunks come back in order, whole
    np.testing.assert_array_equal(rs, small * 2)
    assert fwd.batches == [4, 4, 4, 1], fwd.batches  # big[0:4]; small + big[4:7]; big[7:11]; big[11:12]
    assert finished == ["small", "big"]


def test_a_failing_chunk_fails_its_request_once_and_drops_its_other_chunks(executor):
    fwd = SlowForward(0.0, fail=True)
    batcher = DynamicBatcher(fwd, max_batch_size=4, max_wait_ms=10, executor=executor)

    async def main():
        with pytest.raises(RuntimeError, match="forward exploded"):
            await batcher.submit(np.ones((10, 2), np.float32))
        fwd.fail = False
        out = await batcher.submit(np.ones((1, 2), np.float32))
        batcher.close()
        return out

    np.testing.assert_array_equal(run(main()), np.full((1, 2), 2.0))
    assert fwd.batches == [4, 1], fwd.batches  # the failed request's other chunks never ran
