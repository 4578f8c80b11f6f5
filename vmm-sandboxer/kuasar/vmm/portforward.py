"""The host side of `kubectl port-forward` to a VM pod, run by the VM's task proxy.

containerd serves CRI PortForward by connecting to 127.0.0.1:<port> from inside the pod's network
namespace, where, for a VM pod, nothing listens: the pod's servers are in the guest. So the proxy keeps
one listening socket on the loopback of that namespace, and an iptables rule there (nat OUTPUT, in a
chain of ours) redirects every TCP connection to 127.0.0.1 onto it. For each connection it reads the
port that was asked for (SO_ORIGINAL_DST), opens a vsock connection to the guest agent's forward port
and relays (kuasar.common.guest_forward). When the guest cannot connect, the connection is reset, which
containerd reports as the forward's error, naming the address.

The rule lives in the pod's namespace, which CRI deletes with the pod; Shutdown removes it before that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct

from kuasar.common import guest_forward, hvsock
from kuasar.common.errors import KuasarError, RuntimeFailure

from .network import call_in_netns, in_netns, run

log = logging.getLogger("kuasar.vmm.portforward")

CHAIN = "KUASAR-PORT-FORWARD"
LOOPBACK = "127.0.0.1"
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h: where a REDIRECTed connection was going
# Connections containerd may open at once for one pod (each `kubectl port-forward` connection is one).
BACKLOG = 64
# Reaching the agent through vhost-device-vsock: it answers at once while the VM runs.
GUEST_CONNECT_TIMEOUT = 5.0
_LINGER_RESET = struct.pack("ii", 1, 0)
JUMP = ["OUTPUT", "-p", "tcp", "-d", LOOPBACK, "-j", CHAIN]


def listen_in(netns: str) -> socket.socket:
    """A TCP socket listening on an ephemeral port of the loopback of `netns`."""

    def listen() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind((LOOPBACK, 0))
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        return sock

    return call_in_netns(netns, "port-forward listener", listen)


def redirect_rules(port: int) -> list[list[str]]:
    """iptables commands (nat table) sending TCP to 127.0.0.1 on any port but `port` to `port`; run
    after creating CHAIN, they replace what an earlier proxy of the same pod installed."""
    return [["-t", "nat", "-F", CHAIN],
            ["-t", "nat", "-A", CHAIN, "-p", "tcp", "-d", LOOPBACK, "!", "--dport", str(port),
             "-j", "REDIRECT", "--to-ports", str(port)]]


async def _iptables(netns: str, args: list[str]) -> tuple[int, str]:
    status, _, err = await run(in_netns(netns, ["iptables", "-w", *args]))
    return status, err.strip()


async def install_redirect(netns: str, port: int) -> None:
    await _iptables(netns, ["-t", "nat", "-N", CHAIN])  # fails when it exists (made before): fine
    for args in redirect_rules(port):
        status, err = await _iptables(netns, args)
        if status != 0:
            raise RuntimeFailure(f"iptables {' '.join(args)}: {err or status}")
    if (await _iptables(netns, ["-t", "nat", "-C", *JUMP]))[0] != 0:
        status, err = await _iptables(netns, ["-t", "nat", "-A", *JUMP])
        if status != 0:
            raise RuntimeFailure(f"iptables -A {' '.join(JUMP)}: {err or status}")


async def remove_redirect(netns: str) -> None:
    """Best effort: the namespace, or iptables, may be gone already."""
    if not netns or not os.path.exists(netns):
        return
    for args in (["-t", "nat", "-D", *JUMP], ["-t", "nat", "-F", CHAIN], ["-t", "nat", "-X", CHAIN]):
        with contextlib.suppress(OSError, KuasarError):
            await _iptables(netns, args)


def original_port(sock: socket.socket) -> int:
    """The port a REDIRECTed connection was made to."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
    return struct.unpack_from(">H", raw, 2)[0]


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.close()


class PortForwarder:
    """Relays the connections redirected onto its listener to the guest, one vsock connection each."""

    def __init__(self, uds: str, guest_port: int = guest_forward.DEFAULT_PORT) -> None:
        self.uds = uds
        self.guest_port = guest_port

    async def serve(self, netns: str) -> asyncio.Server:
        """Listen in `netns` and redirect its loopback TCP there; raises KuasarError if either fails."""
        listener = await asyncio.to_thread(listen_in, netns)
        port = listener.getsockname()[1]
        try:
            server = await asyncio.start_server(self.handle, sock=listener)
        except BaseException:
            listener.close()
            raise
        try:
            await install_redirect(netns, port)
        except BaseException:
            server.close()
            raise
        log.info("port forwarding: TCP to %s in %s goes to the guest (via port %d)", LOOPBACK, netns, port)
        return server

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            port = original_port(writer.get_extra_info("socket"))
            guest = await self._open(port)
        except (OSError, KuasarError, guest_forward.ProtocolError) as err:
            log.info("port forward refused: %s", getattr(err, "message", err))
            _reset(writer)
            return
        await guest_forward.relay((reader, writer), guest)

    async def _open(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await hvsock.connect(self.uds, self.guest_port, timeout=GUEST_CONNECT_TIMEOUT)
        try:
            writer.write(guest_forward.request_line(port))
            refused = guest_forward.parse_reply(await guest_forward.read_line(reader))
        except BaseException:
            writer.close()
            raise
        if refused is not None:
            writer.close()
            raise RuntimeFailure(f"port {port}: {refused}")
        return reader, writer
