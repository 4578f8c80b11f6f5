"""Hybrid vsock on the host: reach a guest's AF_VSOCK port through the VMM's unix socket.

Firecracker, Cloud Hypervisor and vhost-device-vsock expose a guest's vsock device as a unix
socket `<uds>`:

* host -> guest port P: connect to `<uds>`, send `CONNECT P\\n`, read one line; success is a line
  starting with `OK` (`OK <host port>` from CLH, `OK <P>` from vhost-device-vsock). From then on the
  socket is a plain byte stream to the guest's accepted connection (ttrpc frames go straight over
  it). A port nobody listens on closes the socket without a reply.
* guest -> host port P: the guest connects to CID 2 port P, which arrives as a connection on the
  unix socket `<uds>_P` that the host must already listen on (`GuestPortListener`).

Readiness: polling `CONNECT` while the guest boots can wedge vhost-device-vsock 0.3.0 for the life
of the VM, so a caller should wait for the guest to announce itself on a `GuestPortListener`
first and only then connect, once, with `connect()`'s bounded handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat

from .errors import DeadlineExceeded, InvalidArgument, Unavailable
from .ttrpc import TtrpcClient

# The handshake reply is one short line ("OK 1073741824\n"); more means this is not a vsock socket.
MAX_REPLY = 64
DEFAULT_TIMEOUT = 3.0
SCHEMES = ("ttrpc+hvsock://", "hvsock://")


def parse_address(address: str) -> tuple[str, int]:
    """`hvsock://<uds path>:<port>` (optionally `ttrpc+`, `?query` ignored) -> (path, port)."""
    rest = address
    for scheme in SCHEMES:
        if rest.startswith(scheme):
            rest = rest[len(scheme):]
            break
    else:
        raise InvalidArgument(f"{address!r} is not an hvsock address")
    rest = rest.split("?", 1)[0]
    path, sep, port = rest.rpartition(":")
    if not sep or not path or not port.isdigit() or not 0 < int(port) < 1 << 32:
        raise InvalidArgument(f"{address!r}: expected hvsock://<socket path>:<port>")
    return path, int(port)


def format_address(path: str, port: int, ttrpc: bool = True) -> str:
    return f"{'ttrpc+' if ttrpc else ''}hvsock://{path}:{port}"


async def connect(path: str, port: int, *, timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
                  limit: int = 1 << 16) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """One hybrid-vsock connection to guest `port` (no retries); raises Unavailable or DeadlineExceeded.

    The returned reader keeps any bytes that followed the `OK` line.
    """
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path, limit=limit)
            writer.write(f"CONNECT {port}\n".encode())
            await writer.drain()
            line = await reader.readuntil(b"\n")
    except TimeoutError:
        _abort(writer)
        raise DeadlineExceeded(f"hvsock {path} port {port}: no handshake reply within {timeout:g}s") from None
    except asyncio.IncompleteReadError as err:
        _abort(writer)
        if not err.partial:
            raise Unavailable(f"hvsock {path} port {port}: closed without a reply "
                              "(nothing listens on that guest port?)") from None
        raise Unavailable(f"hvsock {path} port {port}: truncated reply {err.partial[:MAX_REPLY]!r}") from None
    except asyncio.LimitOverrunError:
        _abort(writer)
        raise Unavailable(f"hvsock {path} port {port}: reply line too long") from None
    except OSError as err:
        _abort(writer)
        raise Unavailable(f"hvsock {path} port {port}: {err}") from err
    except BaseException:
        _abort(writer)
        raise
    if not line.startswith(b"OK"):
        _abort(writer)
        raise Unavailable(f"hvsock {path} port {port}: handshake refused: {line[:MAX_REPLY]!r}")
    return reader, writer


def _abort(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.transport.abort()


async def connect_ttrpc(path: str, port: int, *, timeout: float = DEFAULT_TIMEOUT) -> TtrpcClient:  # noqa: ASYNC109
    """A ttrpc client over one hybrid-vsock connection to guest `port`."""
    reader, writer = await connect(path, port, timeout=timeout)
    return TtrpcClient.from_streams(reader, writer)


async def connect_address(address: str, *, timeout: float = DEFAULT_TIMEOUT) -> TtrpcClient:  # noqa: ASYNC109
    path, port = parse_address(address)
    return await connect_ttrpc(path, port, timeout=timeout)


def guest_port_path(uds: str, port: int) -> str:
    """Where connections from the guest to host port `port` arrive (`<uds>_<port>`)."""
    return f"{uds}_{port}"


class GuestPortListener:
    """Accepts guest-initiated vsock connections to one host port (`<uds>_<port>`).

    Bind it before the VM starts, so the guest's first connect finds it; `close()` removes the
    socket file.
    """

    def __init__(self, uds: str, port: int, mode: int = 0o600) -> None:
        self.path = guest_port_path(uds, port)
        _remove_stale_socket(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(self.path)
            os.chmod(self.path, mode)
            self._sock.listen(8)
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise

    async def accept(self, timeout: float | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                conn, _ = await loop.sock_accept(self._sock)
        except TimeoutError:
            raise DeadlineExceeded(f"no guest connection on {self.path} within {timeout:g}s") from None
        conn.setblocking(False)
        return await asyncio.open_unix_connection(sock=conn)

    async def accept_line(self, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        """Accept one connection and return its first line (e.g. `READY\\n`); the connection is closed."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await self.accept()
                try:
                    return await reader.readline()
                finally:
                    writer.close()
        except TimeoutError:
            raise DeadlineExceeded(f"no guest announcement on {self.path} within {timeout:g}s") from None

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> GuestPortListener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _remove_stale_socket(path: str) -> None:
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise InvalidArgument(f"{path} exists and is not a socket")
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = ["GuestPortListener", "connect", "connect_address", "connect_ttrpc", "format_address",
           "guest_port_path", "parse_address"]
