"""The guest port-forward protocol: one vsock connection per forwarded TCP connection.

`kubectl port-forward` (CRI PortForward) makes containerd connect to 127.0.0.1:<port> inside the pod's
network namespace on the host. A VM pod's servers listen in the guest, so on the host that connection
is caught (kuasar.vmm.portforward) and carried, one vsock connection each, to the guest agent's forward
port (kuasar.vmagent.portforward), which connects to the port on the guest's loopback:

    host -> guest   FORWARD <port>\\n
    guest -> host   OK\\n              then the connection's bytes, both ways
                    ERR <reason>\\n    and close (nothing listens there, ...)

The lines are sans-I/O (bytes in, a port or an error out); `read_line` and `relay` are the thin asyncio
part both ends share.
"""

from __future__ import annotations

import asyncio

# The agent's vsock port for forwarded connections: 1024 serves the Task API and 1025 the debug console.
DEFAULT_PORT = 1026
# Longest line either side sends ("ERR " and a short reason): anything longer is not this protocol.
MAX_LINE = 128
# How long one side waits for the other's line: a peer that says nothing is not going to.
HANDSHAKE_TIMEOUT = 10.0
# Bytes moved per read while relaying.
RELAY_CHUNK = 64 << 10
OK_LINE = b"OK\n"
_REQUEST = b"FORWARD "
_ERROR = b"ERR "


class ProtocolError(ValueError):
    """A line that is not the protocol's."""


def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or not 0 < int(text) < 1 << 16:
        raise ProtocolError(f"bad port {text[:16]!r}")
    return int(text)


def request_line(port: int) -> bytes:
    return _REQUEST + str(_port(str(port).encode())).encode() + b"\n"


def parse_request(line: bytes) -> int:
    """The port a `FORWARD` line names."""
    if not line.startswith(_REQUEST) or not line.endswith(b"\n"):
        raise ProtocolError(f"not a forward request: {line[:32]!r}")
    return _port(line[len(_REQUEST):-1])


def error_line(reason: str) -> bytes:
    """An `ERR` line: the reason on one line of printable ASCII, cut to fit MAX_LINE."""
    text = "".join(c if " " <= c <= "~" else " " for c in reason).strip() or "error"
    return (_ERROR + text.encode()[: MAX_LINE - len(_ERROR) - 1] + b"\n")


def parse_reply(line: bytes) -> str | None:
    """None for `OK`, the reason for `ERR`; ProtocolError for anything else."""
    if line == OK_LINE:
        return None
    if line.startswith(_ERROR) and line.endswith(b"\n"):
        return line[len(_ERROR):-1].decode("ascii", errors="replace")
    raise ProtocolError(f"not a forward reply: {line[:32]!r}")


async def read_line(reader: asyncio.StreamReader, timeout: float = HANDSHAKE_TIMEOUT) -> bytes:  # noqa: ASYNC109
    """One protocol line, newline included; ProtocolError for a line that is too long, never ends
    or does not come within `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise ProtocolError("line too long") from None
    except asyncio.IncompleteReadError as err:
        raise ProtocolError(f"connection closed after {len(err.partial)} bytes of a line") from None
    except TimeoutError:
        raise ProtocolError(f"no line within {timeout:g}s") from None
    if len(line) > MAX_LINE:
        raise ProtocolError("line too long")
    return line


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(RELAY_CHUNK):
        writer.write(data)
        await writer.drain()


async def relay(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Move bytes both ways until one side ends or fails, then close both (what was read is still
    written out first). The end of one direction is the end of the connection: containerd's port
    forwarding ends a forwarded connection so too, and a hybrid vsock socket has no half-close that
    could carry an end on in one direction only."""
    (a_reader, a_writer), (b_reader, b_writer) = a, b
    pipes = [asyncio.ensure_future(_pipe(a_reader, b_writer)), asyncio.ensure_future(_pipe(b_reader, a_writer))]
    try:
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        for writer in (a_writer, b_writer):
            writer.close()
