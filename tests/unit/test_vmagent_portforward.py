"""The agent's forward service: a `FORWARD <port>` connection becomes a connection to that port on the
guest's loopback (here the test's), or an `ERR` line when nothing listens there; garbage gets nothing."""

from __future__ import annotations

import asyncio
import socket

from kuasar.common import guest_forward as proto
from kuasar.vmagent.portforward import PortForwardService


async def _echo_server(ended: asyncio.Event | None = None) -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello from " + str(writer.get_extra_info("sockname")[1]).encode() + b"\n")
        while data := await reader.read(1024):
            writer.write(data.upper())
        writer.close()
        if ended is not None:
            ended.set()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def _agent() -> tuple[asyncio.Task[None], int]:
    """The service on a TCP listener (vsock in the guest: it serves whatever listener it is given)."""
    listener = socket.create_server(("127.0.0.1", 0))
    serving = asyncio.create_task(PortForwardService().serve(listener))
    return serving, listener.getsockname()[1]


def test_forward_to_a_listening_port() -> None:
    async def scenario() -> None:
        ended = asyncio.Event()
        echo = await _echo_server(ended)
        port = echo.sockets[0].getsockname()[1]
        serving, agent_port = await _agent()
        reader, writer = await asyncio.open_connection("127.0.0.1", agent_port)
        writer.write(proto.request_line(port))
        assert proto.parse_reply(await proto.read_line(reader)) is None
        assert await reader.readline() == f"hello from {port}\n".encode()
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"PING"
        writer.close()  # the end of the forwarded connection reaches the server
        await asyncio.wait_for(ended.wait(), 5)
        serving.cancel()
        echo.close()

    asyncio.run(scenario())


def test_a_closed_port_is_an_error_line() -> None:
    async def scenario() -> None:
        with socket.create_server(("127.0.0.1", 0)) as taken:
            closed = taken.getsockname()[1]  # nothing listens once this is closed
        serving, agent_port = await _agent()
        reader, writer = await asyncio.open_connection("127.0.0.1", agent_port)
        writer.write(proto.request_line(closed))
        reason = proto.parse_reply(await proto.read_line(reader))
        assert reason is not None and f"127.0.0.1:{closed}" in reason and "refused" in reason.lower(), reason
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        serving.cancel()

    asyncio.run(scenario())


def test_garbage_gets_no_answer() -> None:
    async def scenario() -> None:
        serving, agent_port = await _agent()
        for junk in (b"GET / HTTP/1.0\r\n\r\n", b"FORWARD 0\n", b"X" * 1000 + b"\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", agent_port)
            writer.write(junk)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        serving.cancel()

    asyncio.run(scenario())


def test_a_server_on_ipv6_loopback_alone_is_reached() -> None:
    # containerd dials a host pod's port over tcp4, then tcp6: a guest that tried 127.0.0.1 alone
    # answered an error for a server listening on ::1 only.
    async def scenario() -> None:
        async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"hello over ipv6\n")
            writer.close()

        only_v6 = await asyncio.start_server(hello, "::1", 0, family=socket.AF_INET6)
        port = only_v6.sockets[0].getsockname()[1]
        serving, agent_port = await _agent()
        reader, writer = await asyncio.open_connection("127.0.0.1", agent_port)
        writer.write(proto.request_line(port))
        assert proto.parse_reply(await proto.read_line(reader)) is None
        assert await asyncio.wait_for(reader.readline(), 5) == b"hello over ipv6\n"
        writer.close()
        serving.cancel()
        only_v6.close()

    asyncio.run(scenario())
