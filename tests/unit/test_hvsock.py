"""Hybrid vsock on the host, against a fake VMM socket speaking the `CONNECT <port>` / `OK <n>` handshake."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator

import pytest
from google.protobuf import wrappers_pb2

from kuasar.common import hvsock
from kuasar.common.errors import DeadlineExceeded, InvalidArgument, Unavailable
from kuasar.common.ttrpc import TtrpcServer
from tests.support.aio import run_bounded as run

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]




@pytest.fixture
def workdir() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="hvs", dir="/tmp")  # short: sun_path is 108 bytes
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


class FakeVmm:
    """A unix socket like Firecracker's / vhost-device-vsock's: reads `CONNECT <port>\\n`, then calls
    `guest(port, reader, writer)` to play the guest side (which decides what to answer)."""

    def __init__(self, path: str, guest: Callable[[int, asyncio.StreamReader, asyncio.StreamWriter],
                                                  Awaitable[None]]) -> None:
        self.path = path
        self.guest = guest
        self.requests: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> FakeVmm:
        self.server = await asyncio.start_unix_server(self._handle, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        self.requests.append(line)
        try:
            port = int(line.removeprefix(b"CONNECT ").strip())
            await self.guest(port, reader, writer)
        finally:
            writer.close()


async def echo_guest(port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # vhost-device-vsock answers "OK <guest port>"; bytes right behind the OK line must not be lost.
    writer.write(f"OK {port}\n".encode() + b"early")
    await writer.drain()
    while data := await reader.read(1024):
        writer.write(data.upper())
        await writer.drain()


def test_parse_and_format_addresses() -> None:
    assert hvsock.parse_address("hvsock:///run/vm/task.vsock:1024") == ("/run/vm/task.vsock", 1024)
    assert hvsock.parse_address("ttrpc+hvsock:///a:b/s.sock:7?streaming_id=c-stdout") == ("/a:b/s.sock", 7)
    assert hvsock.format_address("/x/y.sock", 1024) == "ttrpc+hvsock:///x/y.sock:1024"
    assert hvsock.parse_address(hvsock.format_address("/x/y.sock", 5, ttrpc=False)) == ("/x/y.sock", 5)
    for bad in ("unix:///x.sock", "hvsock:///x.sock", "hvsock:///x.sock:port", "hvsock://:12", "hvsock:///x:0"):
        with pytest.raises(InvalidArgument):
            hvsock.parse_address(bad)


def test_connect_handshake_then_raw_bytes(workdir: str) -> None:
    path = os.path.join(workdir, "vm.sock")

    async def scenario() -> None:
        async with FakeVmm(path, echo_guest) as vmm:
            reader, writer = await hvsock.connect(path, 1024)
            assert await reader.readexactly(5) == b"early"
            writer.write(b"hello")
            await writer.drain()
            assert await reader.readexactly(5) == b"HELLO"
            writer.close()
            assert vmm.requests == [b"CONNECT 1024\n"]

    run(scenario())


def test_connect_failures_are_clear(workdir: str) -> None:
    path = os.path.join(workdir, "vm.sock")

    async def refuse(port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ERR no listener\n")

    async def hang_up(port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pass  # what vhost-device-vsock does for a guest port nobody listens on

    async def silent(port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)  # a wedged backend

    async def scenario() -> None:
        with pytest.raises(Unavailable, match="No such file|Connection refused"):
            await hvsock.connect(os.path.join(workdir, "absent.sock"), 1024)
        async with FakeVmm(path, refuse):
            with pytest.raises(Unavailable, match="refused: b'ERR no listener"):
                await hvsock.connect(path, 1024)
        async with FakeVmm(path, hang_up):
            with pytest.raises(Unavailable, match="closed without a reply"):
                await hvsock.connect(path, 1025)
        async with FakeVmm(path, silent):
            with pytest.raises(DeadlineExceeded, match="no handshake reply"):
                await hvsock.connect(path, 1024, timeout=0.2)

    run(scenario())


def test_ttrpc_over_hybrid_vsock(workdir: str) -> None:
    """The ttrpc client on top of the handshake, against a real TtrpcServer behind the fake VMM."""
    path = os.path.join(workdir, "vm.sock")

    async def scenario() -> None:
        server = TtrpcServer()

        async def upper(req: wrappers_pb2.StringValue, ctx) -> wrappers_pb2.StringValue:
            return wrappers_pb2.StringValue(value=req.value.upper())

        server.add_unary("test.v1.Echo", "Upper", wrappers_pb2.StringValue, upper)

        async def guest(port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert port == 1024
            writer.write(b"OK 1073741824\n")  # Firecracker/CLH style: a host-side port number
            await writer.drain()
            await server.serve_connection(reader, writer)

        async with FakeVmm(path, guest):
            client = await hvsock.connect_address(f"ttrpc+hvsock://{path}:1024")
            reply = await client.call("test.v1.Echo", "Upper", wrappers_pb2.StringValue(value="vsock"),
                                      wrappers_pb2.StringValue, timeout=5)
            assert reply.value == "VSOCK"
            await client.close()
        await server.close()

    run(scenario())


def test_guest_port_listener_readiness(workdir: str) -> None:
    uds = os.path.join(workdir, "vm.sock")

    async def scenario() -> None:
        stale = hvsock.guest_port_path(uds, 1025)
        with open(stale, "w"):
            pass
        with pytest.raises(InvalidArgument, match="not a socket"):
            hvsock.GuestPortListener(uds, 1025)
        os.unlink(stale)
        with hvsock.GuestPortListener(uds, 1025) as listener:
            assert listener.path == f"{uds}_1025"
            assert oct(os.stat(listener.path).st_mode & 0o777) == "0o600"

            async def guest_announces() -> None:
                await asyncio.sleep(0.05)
                _, writer = await asyncio.open_unix_connection(listener.path)
                writer.write(b"READY\n")
                await writer.drain()
                writer.close()

            announce = asyncio.create_task(guest_announces())
            assert await listener.accept_line(timeout=5) == b"READY\n"
            await announce
            with pytest.raises(DeadlineExceeded, match="no guest announcement"):
                await listener.accept_line(timeout=0.1)
        assert not os.path.exists(f"{uds}_1025")
        # A stale socket file from a previous run is replaced.
        first = hvsock.GuestPortListener(uds, 1025)
        first._sock.close()
        second = hvsock.GuestPortListener(uds, 1025)
        second.close()

    run(scenario())
