"""Forwarded connections into the guest (`kubectl port-forward` to a VM pod).

The host sends one vsock connection per forwarded TCP connection, naming a port (see
kuasar.common.guest_forward). The guest's root network namespace is the pod's, where every container
of the pod listens, so the port is dialled on the guest's loopback, as containerd dials it in a host
pod's namespace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from kuasar.common import guest_forward as proto

log = logging.getLogger("vm-agent.portforward")

# How long a connection to a port in the guest may take, per loopback: loopback answers at once or
# not at all. Both tries together stay under the host's wait for our answer (HANDSHAKE_TIMEOUT), so a
# hung one comes back as our error line, not as the host's timeout.
CONNECT_TIMEOUT = proto.HANDSHAKE_TIMEOUT / 4


# Where a forwarded port is dialled, in turn: IPv4's loopback, then IPv6's, as containerd dials a
# host pod's port (tcp4, then tcp6), so a server listening on ::1 alone is reached too.
LOOPBACKS = ("127.0.0.1", "::1")


class PortForwardService:
    def __init__(self, hosts: tuple[str, ...] = LOOPBACKS) -> None:
        self.hosts = hosts

    async def serve(self, listener: socket.socket) -> None:
        server = await asyncio.start_server(self._session, sock=listener)
        async with server:
            await server.serve_forever()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            port = proto.parse_request(await proto.read_line(reader))
        except proto.ProtocolError as err:
            log.warning("refused a forward request: %s", err)
            writer.close()
            return
        target, failures = None, []
        for host in self.hosts:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    target = await asyncio.open_connection(host, port)
                break
            except (OSError, TimeoutError) as err:
                cause = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else "timed out"
                failures.append(f"{host}:{port}: {cause}")
        if target is None:
            reason = f"connect in the guest to {', '.join(failures)}"
            log.info("port forward: %s", reason)
            writer.write(proto.error_line(reason))
            writer.close()  # after what was written has gone out
            return
        writer.write(proto.OK_LINE)
        log.debug("port forward to port %d", port)
        await proto.relay((reader, writer), target)
