"""One socket write per HTTP response instead of two.

uvicorn writes a response's head as soon as the app starts the response and its body when
the app sends it: two `send` system calls, and two wake-ups of the client, for every
response. On the 2-core VMs this project is measured on a socket write costs ~50 µs of the
event loop's time, and at concurrency 8 the event loop's time is what the model waits for
between batches (docs/benchmarks.md, Serving). `CoalescingTransport` holds a write until the
next one or the end of the current turn of the event loop, whichever comes first: head and
body of a response leave in one write, and nothing waits longer than the current callback.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """Wraps an asyncio transport: a write is held until the next write or the end of the loop turn."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes) -> None:
        if self._pending:  # a held write (a response head): it leaves now, with this one
            self._pending.append(data)
            self._flush()
            return
        self._pending.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._end_of_turn)

    def _end_of_turn(self) -> None:
        self._scheduled = False
        self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)  # one item: the same bytes object, no copy
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def close(self) -> None:
        self._flush()  # what was written before close still goes out, as with a plain transport
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a `CoalescingTransport` (pass as `uvicorn.run(http=...)`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
