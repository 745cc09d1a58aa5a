"""The aggregator's SuperLink calls: transient failures are waited out, real errors are not.

A real HTTP server on a free port answers with the statuses a SuperLink sends; the calls go
through httpx, as Flower's Grid does."""

from __future__ import annotations

from typing import ClassVar

import httpx
import pytest

from fedssl_flower import server_app
from tests.support.http import QuietHandler, serve


class Statuses(QuietHandler):
    script: ClassVar[list[int]] = []

    def do_POST(self):
        status = self.script.pop(0) if self.script else 200
        self.reply(status, b'{"ok": true}' if status == 200 else b'{"detail": "database is locked"}')


@pytest.fixture
def superlink():
    with serve(Statuses) as url:
        yield url


def _call(url):
    calls = []

    def call():
        calls.append(1)
        res = httpx.post(f"{url}/v1/runtime/pull-messages")
        res.raise_for_status()
        return res.json()

    return call, calls


def test_a_500_is_retried_until_the_superlink_answers(superlink, capsys):
    Statuses.script = [500, 500]
    call, calls = _call(superlink)
    assert server_app.superlink_call("pull-messages", call, retry_seconds=30) == {"ok": True}
    assert len(calls) == 3
    out = capsys.readouterr().out
    assert "[fedssl] SuperLink pull-messages failed (HTTP 500); trying again in 1s" in out
    assert "trying again in 2s" in out


def test_a_4xx_is_raised_at_once(superlink):
    Statuses.script = [403]
    call, calls = _call(superlink)
    with pytest.raises(httpx.HTTPStatusError, match="403"):
        server_app.superlink_call("pull-messages", call, retry_seconds=30)
    assert len(calls) == 1


def test_retries_stop_at_the_deadline(superlink):
    Statuses.script = [503] * 10
    call, calls = _call(superlink)
    with pytest.raises(httpx.HTTPStatusError, match="503"):
        server_app.superlink_call("pull-messages", call, retry_seconds=2.5)
    assert len(calls) == 2  # tried, waited 1 s, tried; waiting 2 s more would pass the deadline


def test_a_superlink_that_is_gone_is_retried_then_raised():
    with httpx.Client() as client:
        dead = f"http://127.0.0.1:{_closed_port()}/v1/runtime/pull-messages"
        calls = []

        def call():
            calls.append(1)
            return client.post(dead)

        with pytest.raises(httpx.ConnectError):
            server_app.superlink_call("pull-messages", call, retry_seconds=1.5)
    assert len(calls) == 2


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
