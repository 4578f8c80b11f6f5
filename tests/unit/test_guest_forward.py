"""The guest port-forward protocol: its lines as byte vectors, bounded line reads, and the relay."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from kuasar.common import guest_forward as proto


def test_request_line_round_trip() -> None:
    assert proto.request_line(8080) == b"FORWARD 8080\n"
    assert proto.parse_request(b"FORWARD 8080\n") == 8080
    assert proto.parse_request(b"FORWARD 1\n") == 1
    assert proto.parse_request(b"FORWARD 65535\n") == 65535


@pytest.mark.parametrize("line", [
    b"FORWARD 0\n", b"FORWARD 65536\n", b"FORWARD 123456\n", b"FORWARD -1\n", b"FORWARD 80a\n",
    b"FORWARD \n", b"FORWARD 80", b"FORWARD 80\r\n", b"forward 80\n", b"GET / HTTP/1.0\n", b"",
])
def test_bad_requests_are_refused(line: bytes) -> None:
    with pytest.raises(proto.ProtocolError):
        proto.parse_request(line)


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_no_request_for_a_port_out_of_range(port: int) -> None:
    with pytest.raises(proto.ProtocolError):
        proto.request_line(port)


def test_replies() -> None:
    assert proto.parse_reply(proto.OK_LINE) is None
    assert proto.parse_reply(b"ERR connection refused\n") == "connection refused"
    for line in (b"OK 1026\n", b"OK", b"ERR no newline", b"HTTP/1.1 200 OK\n"):
        with pytest.raises(proto.ProtocolError):
            proto.parse_reply(line)


def test_error_line_is_one_short_printable_line() -> None:
    assert proto.error_line("connect: refused") == b"ERR connect: refused\n"
    assert proto.error_line("two\nlines\x00and\u00e9") == b"ERR two lines and\n"
    long = proto.error_line("x" * 1000)
    assert len(long) == proto.MAX_LINE and long.endswith(b"x\n") and long.count(b"\n") == 1
    assert proto.parse_reply(proto.error_line("")) == "error"


def _reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_read_line_bounds() -> None:
    async def scenario() -> None:
        assert await proto.read_line(_reader(b"OK\nrest")) == b"OK\n"
        with pytest.raises(proto.ProtocolError, match="too long"):
            await proto.read_line(_reader(b"E" * (proto.MAX_LINE + 1) + b"\n"))
        with pytest.raises(proto.ProtocolError, match="closed after 3 bytes"):
            await proto.read_line(_reader(b"ERR"))
        with pytest.raises(proto.ProtocolError, match="no line within"):
            await proto.read_line(_reader(b"FORW", eof=False), timeout=0.05)

    asyncio.run(scenario())


async def _pair() -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], socket.socket]:
    """A stream over TCP on the loopback (a unix socket cannot be reset) and the socket at its far end."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    theirs.setblocking(False)
    return await asyncio.open_connection(sock=ours), theirs


async def _relayed_request() -> tuple[socket.socket, socket.socket, asyncio.Task[None]]:
    """A client and a server with a relay between them, the client's request already across."""
    loop = asyncio.get_running_loop()
    a, client = await _pair()
    b, server = await _pair()
    relaying = asyncio.create_task(proto.relay(a, b))
    await loop.sock_sendall(client, b"request")
    assert await loop.sock_recv(server, 100) == b"request"
    return client, server, relaying


async def _read_to_end(sock: socket.socket) -> bytes:
    received = b""
    while chunk := await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 1 << 16), 5):
        received += chunk
    return received


def test_relay_moves_both_ways_and_the_first_end_ends_both() -> None:
    async def scenario() -> None:
        client, server, relaying = await _relayed_request()
        await asyncio.get_running_loop().sock_sendall(server, b"answer" * 50_000)  # more than one read
        server.close()  # the server answered and ended: the client gets all of the answer, then the end
        assert await _read_to_end(client) == b"answer" * 50_000
        await asyncio.wait_for(relaying, 5)  # without the client closing its end
        client.close()

    asyncio.run(scenario())


def test_relay_ends_when_one_side_resets() -> None:
    async def scenario() -> None:
        client, server, relaying = await _relayed_request()
        # The server resets while the client still waits for an answer and sends nothing more.
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await asyncio.get_running_loop().sock_sendall(server, b"y")
        server.close()
        assert await _read_to_end(client) in (b"", b"y")
        await asyncio.wait_for(relaying, 5)  # ended without the client closing its end
        client.close()

    asyncio.run(scenario())
