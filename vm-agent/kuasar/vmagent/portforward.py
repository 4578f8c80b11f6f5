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

# How long a connection to a port in the guest may take: loopback answers at once or not at all.
CONNECT_TIMEOUT = 5.0


class PortForwardService:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host

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
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                target = await asyncio.open_connection(self.host, port)
        except (OSError, TimeoutError) as err:
            cause = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else "timed out"
            reason = f"connect to {self.host}:{port} in the guest: {cause}"
            log.info("port forward: %s", reason)
            writer.write(proto.error_line(reason))
            writer.close()  # after what was written has gone out
            return
        writer.write(proto.OK_LINE)
        log.debug("port forward to %s:%d", self.host, port)
        await proto.relay((reader, writer), target)
