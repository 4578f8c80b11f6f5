"""One gRPC call as a client, on h2's HTTP/2 state machine, for the few calls a task server makes to
containerd's own API (which image a container was made from, that image's blobs).

grpcio would serve, but it starts threads of its own, and the wasm task server forks container
processes from its only thread (a fork beside running threads inherits their locks held). Those
calls are rare (a container whose module is an image layer) and short, so each gets a connection of
its own.

`CallState` is the protocol, sans I/O: it takes the bytes read from the socket and says what to
write back, and collects the reply's messages and status. `call` is the asyncio transport around it.
Only what gRPC adds to HTTP/2 is ours (the 5-byte message prefix, `grpc-status` trailers); HTTP/2
itself stays h2's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from google.protobuf.message import DecodeError, Message
from h2.errors import ErrorCodes

from .errors import Code
from .grpc_h2 import GRPC_PREFIX, encode_message

# A reply larger than this is refused: the largest thing read is a module's layer, and gRPC's own
# default receive limit per message (4 MiB) is why containerd sends a blob in chunks of 1 MiB.
DEFAULT_MAX_REPLY_BYTES = 256 << 20
# What a socket read asks for; h2 takes any amount.
READ_BYTES = 1 << 16
# containerd's own API on its own socket answers a Get in about a millisecond.
DEFAULT_TIMEOUT = 30.0
# gRPC's mapping of what a server says in HTTP/2 terms rather than with a grpc-status.
HTTP_STATUS_CODES = {b"400": Code.INTERNAL, b"401": Code.UNAUTHENTICATED, b"403": Code.PERMISSION_DENIED,
                     b"404": Code.UNIMPLEMENTED, b"429": Code.UNAVAILABLE, b"502": Code.UNAVAILABLE,
                     b"503": Code.UNAVAILABLE, b"504": Code.UNAVAILABLE}
RESET_CODES = {ErrorCodes.REFUSED_STREAM: Code.UNAVAILABLE, ErrorCodes.CANCEL: Code.CANCELLED,
               ErrorCodes.ENHANCE_YOUR_CALM: Code.RESOURCE_EXHAUSTED, ErrorCodes.INADEQUATE_SECURITY:
               Code.PERMISSION_DENIED}
_H2_CONFIG = h2.config.H2Configuration(client_side=True, header_encoding=None)


class GrpcCallError(Exception):
    """The call ended with a gRPC status other than OK (or never got one: `Code.UNAVAILABLE`)."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _status_code(value: bytes) -> Code:
    try:
        return Code(int(value))
    except ValueError:
        return Code.UNKNOWN


class CallState:
    """A unary or server-streaming call: `start()` gives the bytes to send first, then each
    `receive(data)` the bytes to send back; `done` once the server ended the call. `messages()` then
    gives the reply's messages, or raises its error status. With `on_message`, each message is handed
    to it as soon as it has arrived whole, in order, instead (a blob's chunks go to a file as they
    come); what it raises ends the call, out of `receive`."""

    def __init__(self, path: str, request: Message, reply_type: type[Message], *,
                 metadata: Sequence[tuple[str, str]] = (), max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
                 on_message: Callable[[Message], None] | None = None) -> None:
        self._conn = h2.connection.H2Connection(config=_H2_CONFIG)
        self._path = path
        self._request = request
        self._reply_type = reply_type
        self._metadata = metadata
        self._max = max_reply_bytes
        self._stream = 0
        self._buffer = bytearray()  # what arrived of messages not yet decoded
        self._received = 0
        self._messages: list[Message] = []
        self._on_message = on_message or self._messages.append
        self._status: tuple[Code, str] | None = None
        self._malformed: GrpcCallError | None = None
        self.done = False

    def start(self) -> bytes:
        self._conn.initiate_connection()
        self._stream = self._conn.get_next_available_stream_id()
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", self._path.encode()),
                   (b":authority", b"localhost"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                   *((key.encode(), value.encode()) for key, value in self._metadata)]
        self._conn.send_headers(self._stream, headers)
        self._conn.send_data(self._stream, encode_message(self._request), end_stream=True)
        return self._conn.data_to_send()

    def receive(self, data: bytes) -> bytes:
        """Feed bytes read from the server; returns what to write back (acks, window updates)."""
        if not data:
            self._end(Code.UNAVAILABLE, "the server closed the connection before the call ended")
            return b""
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._end(Code.INTERNAL, f"HTTP/2 protocol error from the server: {exc}")
            return b""
        for event in events:
            self._on(event)
        return self._conn.data_to_send()

    def _on(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            self._headers(dict(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            self._received += len(event.data)
            if self._received > self._max:
                self._end(Code.RESOURCE_EXHAUSTED, f"reply larger than {self._max} bytes")
            elif self._malformed is None:
                self._buffer += event.data
                self._decode_whole_messages()
        elif isinstance(event, h2.events.StreamEnded):
            self._end(Code.INTERNAL, "the server ended the call without a grpc-status")
        elif isinstance(event, h2.events.StreamReset):
            self._end(RESET_CODES.get(event.error_code, Code.INTERNAL),
                      f"the server reset the call (HTTP/2 error {event.error_code})")
        elif isinstance(event, h2.events.ConnectionTerminated):
            # A graceful GOAWAY (a server shutting down) still finishes the streams it let in.
            if event.error_code != ErrorCodes.NO_ERROR or (event.last_stream_id or 0) < self._stream:
                self._end(Code.UNAVAILABLE, f"the server ended the connection (HTTP/2 error {event.error_code})")

    def _headers(self, headers: dict[bytes, bytes]) -> None:
        status = headers.get(b":status")
        if status is not None and status != b"200":
            self._end(HTTP_STATUS_CODES.get(status, Code.UNKNOWN), f"HTTP status {status.decode(errors='replace')}")
        elif b"grpc-status" in headers:  # trailers, or a trailers-only reply
            message = unquote(headers.get(b"grpc-message", b"").decode(errors="replace"))
            self._end(_status_code(headers[b"grpc-status"]), message)

    def _end(self, code: Code, message: str) -> None:
        if self._status is None:  # the first word is the call's
            self._status = (code, message)
        self.done = True

    def messages(self) -> list[Message]:
        if self._status is None:
            raise GrpcCallError(Code.UNAVAILABLE, "the call has not ended")
        code, message = self._status
        if code != Code.OK:
            raise GrpcCallError(code, message)
        if self._malformed is not None:
            raise self._malformed
        if self._buffer:
            what = "a message's prefix" if len(self._buffer) < GRPC_PREFIX.size else "a message"
            raise GrpcCallError(Code.INTERNAL, f"reply ends inside {what}")
        return self._messages

    def _decode_whole_messages(self) -> None:
        """Decode the messages that arrived whole, as they arrive: a long reply (a blob in chunks) is
        then held once, as messages, rather than also as the bytes they came in."""
        buffer = self._buffer
        while len(buffer) >= GRPC_PREFIX.size:
            compressed, length = GRPC_PREFIX.unpack_from(buffer)
            if compressed:
                self._malformed = GrpcCallError(Code.UNIMPLEMENTED, "compressed replies are not supported")
            elif len(buffer) < GRPC_PREFIX.size + length:
                return
            else:
                try:
                    message = self._reply_type.FromString(bytes(buffer[GRPC_PREFIX.size:GRPC_PREFIX.size + length]))
                except DecodeError as exc:
                    self._malformed = GrpcCallError(Code.INTERNAL, f"undecodable reply: {exc}")
                else:
                    self._on_message(message)
                del buffer[:GRPC_PREFIX.size + length]
            if self._malformed is not None:
                buffer.clear()
                return


async def call(address: str, path: str, request: Message, reply_type: type[Message], *,
               metadata: Sequence[tuple[str, str]] = (), timeout: float = DEFAULT_TIMEOUT,
               max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
               on_message: Callable[[Message], None] | None = None) -> list[Message]:
    """Make one call on a connection of its own to the unix socket `address`; the reply's messages
    (one for a unary method; none when they went to `on_message`). Raises GrpcCallError, UNAVAILABLE
    when the socket cannot be reached and DEADLINE_EXCEEDED after `timeout` seconds."""
    state = CallState(path, request, reply_type, metadata=metadata, max_reply_bytes=max_reply_bytes,
                      on_message=on_message)
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_unix_connection(address)
            except OSError as exc:
                raise GrpcCallError(Code.UNAVAILABLE, f"cannot connect to {address}: {exc.strerror or exc}") from None
            try:
                writer.write(state.start())
                while not state.done:
                    reply = state.receive(await reader.read(READ_BYTES))
                    if reply:
                        writer.write(reply)
                        await writer.drain()
            except OSError as exc:
                raise GrpcCallError(Code.UNAVAILABLE, f"{address}: {exc.strerror or exc}") from None
            finally:
                # Not awaited: nothing is left to say, and a close waited for could outlast the deadline.
                writer.transport.abort()
    except TimeoutError:
        raise GrpcCallError(Code.DEADLINE_EXCEEDED, f"{path} on {address}: no reply within {timeout:g} s") from None
    return state.messages()
