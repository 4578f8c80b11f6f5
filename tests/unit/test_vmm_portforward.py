"""The host side of port forwarding to a VM pod, in a real network namespace with real iptables: a
connection to 127.0.0.1:<port> made inside the namespace (as containerd makes it) reaches the server
behind the guest agent's forward service, through a fake of vhost-device-vsock's hybrid-vsock socket;
a port the guest refuses resets the connection; serving the pod again replaces the rule; removal leaves
no rule behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kuasar.common import guest_forward
from kuasar.common.errors import RuntimeFailure
from kuasar.vmagent.portforward import PortForwardService
from kuasar.vmm.network import call_in_netns
from kuasar.vmm.portforward import CHAIN, PortForwarder, redirect_rules, remove_redirect


def test_redirect_rules_send_loopback_tcp_to_the_listener() -> None:
    assert redirect_rules(40123) == [
        ["-t", "nat", "-F", CHAIN],
        ["-t", "nat", "-A", CHAIN, "-p", "tcp", "-d", "127.0.0.1", "!", "--dport", "40123",
         "-j", "REDIRECT", "--to-ports", "40123"]]


needs_netns = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("iptables") is None
                                 or shutil.which("nsenter") is None,
                                 reason="needs root, iptables and nsenter (make setup)")


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kuasar-pf-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def nat_rules(netns: str) -> str:
    return subprocess.run(["nsenter", f"--net={netns}", "iptables", "-w", "-t", "nat", "-S"], check=True,
                          capture_output=True, text=True).stdout


class FakeVsock:
    """vhost-device-vsock's unix socket: `CONNECT 1026` reaches the agent's forward service."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.service = PortForwardService()

    async def start(self) -> asyncio.Server:
        return await asyncio.start_unix_server(self.handle, path=str(self.path))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await reader.readline() != f"CONNECT {guest_forward.DEFAULT_PORT}\n".encode():
            writer.close()  # as vhost-device-vsock does for a port nobody listens on
            return
        writer.write(f"OK {guest_forward.DEFAULT_PORT}\n".encode())
        await self.service._session(reader, writer)


async def connect_in(netns: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to 127.0.0.1:`port` from inside `netns`, as containerd's PortForward does."""

    def dial() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=5)

    sock = await asyncio.to_thread(call_in_netns, netns, "dial", dial)
    sock.setblocking(False)
    return await asyncio.open_connection(sock=sock)


async def assert_reset(netns: str, port: int) -> None:
    """A connection to `port` in `netns` is reset (so quickly, at times, that connect() sees it)."""
    try:
        reader, writer = await connect_in(netns, port)
    except RuntimeFailure as err:
        assert "Connection reset" in err.message, err.message
        return
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 10)
    writer.close()


@needs_netns
def test_loopback_connections_in_the_pod_netns_reach_the_guest(netns: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async def web(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            request = await reader.readline()
            writer.write(b"served " + request)
            writer.close()

        guest_server = await asyncio.start_server(web, "127.0.0.1", 0)  # the "guest" is this host here
        guest_port = guest_server.sockets[0].getsockname()[1]
        vsock = await FakeVsock(tmp_path / "vsock.sock").start()
        forwarder = PortForwarder(str(tmp_path / "vsock.sock"))
        first = await forwarder.serve(netns)
        server = await forwarder.serve(netns)  # served again for the same pod
        first.close()
        assert nat_rules(netns).count("REDIRECT") == 1 and nat_rules(netns).count(f"-j {CHAIN}") == 1

        reader, writer = await connect_in(netns, guest_port)
        writer.write(b"GET /\n")
        assert await asyncio.wait_for(reader.read(), 10) == b"served GET /\n"
        writer.close()

        with socket.create_server(("127.0.0.1", 0)) as taken:
            closed = taken.getsockname()[1]
        await assert_reset(netns, closed)

        server.close()
        vsock.close()
        guest_server.close()
        await remove_redirect(netns)
        assert CHAIN not in nat_rules(netns)

    asyncio.run(scenario())


@needs_netns
def test_an_unreachable_guest_resets_the_connection(netns: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        server = await PortForwarder(str(tmp_path / "no-vsock.sock")).serve(netns)
        await assert_reset(netns, 8080)
        server.close()
        await remove_redirect(netns)

    asyncio.run(scenario())


def test_removing_from_a_deleted_netns_is_quiet(tmp_path: Path) -> None:
    asyncio.run(remove_redirect(str(tmp_path / "gone")))
