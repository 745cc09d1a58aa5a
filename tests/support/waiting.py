"""Waiting on a condition, not on time: a test that sleeps and then acts can pass without the
thing it meant to interrupt ever having started."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """`predicate()`'s first true value, polled every `interval` s; AssertionError naming
    `what` after `timeout` s (a guard against hanging, not part of what is asserted)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
