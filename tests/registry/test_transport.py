"""CoalescingTransport on real sockets: writes of one loop turn leave as one, close flushes first,
and the registry's real server answers through it (the other registry tests all go through it too)."""

import asyncio
import socket

import httpx
import pytest

from fedssl_registry.core.transport import CoalescingTransport


class Server(asyncio.Protocol):
    """Writes whatever the test asks, through a CoalescingTransport over the real transport."""

    def connection_made(self, transport):
        self.raw = transport
        self.transport = CoalescingTransport(transport, asyncio.get_running_loop())
        self.connected.set_result(self)


async def pair():
    loop = asyncio.get_running_loop()
    connected = loop.create_future()

    def factory():
        s = Server()
        s.connected = connected
        return s

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return server, await connected, reader, writer


def test_a_head_leaves_with_the_body_in_one_write_and_a_lone_write_at_the_end_of_the_turn():
    async def main():
        server, srv, reader, writer = await pair()
        sent = []
        real_write = srv.raw.write
        srv.raw.write = lambda data: (sent.append(data), real_write(data))  # record the real socket writes
        srv.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
        held = (list(sent), srv.transport.get_write_buffer_size())
        srv.transport.write(b"body")
        joined = list(sent)  # the second write sends both at once
        srv.transport.write(b"lone")
        before_turn_ends = list(sent)
        got = await reader.readexactly(46)
        writer.close()
        server.close()
        return held, joined, before_turn_ends, sent, got

    held, joined, before_turn_ends, sent, got = asyncio.run(main())
    assert held == ([], 38)
    assert joined == [b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody"]  # one write, not two
    assert before_turn_ends == joined and sent == [*joined, b"lone"]  # held until the loop turn ended
    assert got == b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbodylone"


def test_close_sends_what_was_written_then_closes():
    async def main():
        server, srv, reader, writer = await pair()
        srv.transport.write(b"last words")
        srv.transport.close()
        got = await reader.read()  # everything, then EOF
        server.close()
        return got, srv.transport.is_closing()

    assert asyncio.run(main()) == (b"last words", True)


@pytest.mark.integration
def test_the_registry_answers_keep_alive_requests_through_it(registry):
    # Raw HTTP/1.1 on one connection: each response arrives whole, head and body.
    host, port = registry.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        for _ in range(2):
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                data += s.recv(65536)
            head, body = data.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200") and body == b'{"live":true}'
    assert httpx.get(registry.url + "/v2/health/live").json() == {"live": True}
