"""A unary-only gRPC server on h2's HTTP/2 state machine, for the Sandbox API on a unix socket.

containerd makes eight synchronous Controller calls per pod start (Create, Start, Platform and five
Status, four of them only to attach the pod's state to a CRI event), so the cost of one call is paid
eight times on the pod's critical path. grpclib's general machinery (deadlines, metadata, streaming
cardinalities, an event bus, three socket writes per reply) cost ~660 µs per call round trip here; the
same calls straight on h2 cost ~490 µs (see the README). Only what gRPC adds to HTTP/2 is ours: the
5-byte message prefix, the method table, and `grpc-status` trailers. HTTP/2 itself (framing, HPACK,
flow control, stream states) stays h2's.

Every unary call runs as its own task, so a long `Wait` blocks nothing, and a stream the client resets
(a cancelled call or an expired deadline) cancels its task. A method answered from memory (Status,
Platform) is instead answered in the loop step its request arrived in: no task, no extra loop turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from google.protobuf.message import DecodeError, Message
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from h2.utilities import SizeLimitDict

from .errors import Code
from .request_timing import TIMING

log = logging.getLogger(__name__)

# containerd keeps one Controller.Wait open per pod on its single connection to us. h2 advertises 100
# concurrent streams, and a client at the limit queues every further call: pod 101 would stall the
# whole API. The real bound is how many pods a node holds.
MAX_CONCURRENT_STREAMS = 1 << 20
# h2 remembers how each closed stream ended, to classify frames that arrive late, for the last 65,536
# streams of a connection: ~10 MB once containerd's one long-lived connection has made that many
# calls. A late frame on a forgotten stream is still refused as closed.
REMEMBERED_CLOSED_STREAMS = 256
# gRPC's own default receive limit; no Controller request comes near it (a pod config is a few KB).
MAX_REQUEST_BYTES = 4 << 20
# How long the frames h2 answers control frames with (PING and SETTINGS acks, window updates) may wait
# to leave with the next reply. containerd's gRPC client sends a WINDOW_UPDATE and a PING after every
# reply it reads; acked at once, each call costs both sides one more write and wake-up. Sent after the
# next reply's frames, the ack also stops the client pinging again for that reply.
CONTROL_DELAY = 0.01
# How long an early reply may wait for the client's flow-control window before it is given up (and
# its stream reset, so that the client never reads the success the handler then undoes): a client
# that reads nothing for this long is stuck. Only a client whose window other replies used up waits.
BLOCKED_REPLY_WAIT = 30.0
# How long stop() lets cancelled calls unwind (a handler's cleanup) before closing connections.
CANCEL_WAIT = 1.0
GRPC_PREFIX = struct.Struct(">BI")  # compressed flag, message length
FRAME_HEADER_BYTES = 9  # HTTP/2: length (3), type, flags, stream id (4)
SETTINGS_FRAME_TYPE = 0x4
_H2_CONFIG = h2.config.H2Configuration(
    client_side=False, header_encoding=None,
    # Our one client is containerd's gRPC library on a private socket; checking every header it sends
    # is h2's slowest path and guards nothing here.
    validate_inbound_headers=False, normalize_inbound_headers=False,
    validate_outbound_headers=False, normalize_outbound_headers=False)
_REPLY_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"))
_OK_TRAILERS = ((b"grpc-status", b"0"),)

Handler = Callable[..., Awaitable[Message]]
Answer = Callable[[Message], Message]
# Given to a handler that replies before it is done (`Method.replies_early`): sends the reply now, and
# says, once it knows, whether it got out to the client's socket (False: the stream or the connection
# is gone, or the client took no more of it for BLOCKED_REPLY_WAIT, and the stream was reset).
ReplyNow = Callable[[Message], Awaitable[bool]]


class GrpcError(Exception):
    """Ends a call with this gRPC status (an error `Code`) and message."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Method:
    """A method is served either by `handler`, as its own task, or by `answer`, which must never block:
    it runs inside `data_received`, saving each call a task and a loop turn (~60 µs here).

    A handler that `replies_early` is called with the request and a `ReplyNow`, to send its reply
    before it has finished (what it does next may depend on whether the reply got out); what it
    returns is then sent only if it has not replied, and an error it raises after replying is logged
    by it, not sent."""

    request_type: type[Message]
    handler: Handler | None = None
    answer: Answer | None = None
    replies_early: bool = False

    def __post_init__(self) -> None:
        if (self.handler is None) == (self.answer is None):
            raise ValueError("a Method has either a handler or an answer")


@dataclass
class _Call:
    path: bytes
    body: bytearray = field(default_factory=bytearray)
    task: asyncio.Task[None] | None = None
    pending: bytes = b""  # reply bytes waiting for the client's flow-control window
    trailers: tuple[tuple[bytes, bytes], ...] = ()
    delivered: asyncio.Future[bool] | None = None  # an early reply's waiting for the window: all sent


def _settings_frames_apart(frames: bytes) -> tuple[bytes, bytes]:
    """(the SETTINGS frames, the other frames) of whole frames h2 queued, each in its order."""
    settings, others = bytearray(), bytearray()
    offset = 0
    while offset + FRAME_HEADER_BYTES <= len(frames):
        end = offset + FRAME_HEADER_BYTES + int.from_bytes(frames[offset:offset + 3], "big")
        (settings if frames[offset + 3] == SETTINGS_FRAME_TYPE else others).extend(frames[offset:end])
        offset = end
    return bytes(settings), bytes(others + frames[offset:])


def encode_message(message: Message) -> bytes:
    payload = message.SerializeToString()
    return GRPC_PREFIX.pack(0, len(payload)) + payload


def decode_message(body: bytes, request_type: type[Message]) -> Message:
    """One length-prefixed, uncompressed message, as gRPC frames a unary request."""
    if len(body) < GRPC_PREFIX.size:
        raise GrpcError(Code.INVALID_ARGUMENT, "request has no gRPC message")
    compressed, length = GRPC_PREFIX.unpack_from(body)
    if compressed:
        raise GrpcError(Code.UNIMPLEMENTED, "compressed requests are not supported")
    if length != len(body) - GRPC_PREFIX.size:
        raise GrpcError(Code.INVALID_ARGUMENT, "request is not exactly one gRPC message")
    try:
        return request_type.FromString(body[GRPC_PREFIX.size:])
    except DecodeError as exc:
        raise GrpcError(Code.INTERNAL, f"grpc: error unmarshalling request: {exc}") from None  # as grpc-go


def status_trailers(code: Code, message: str) -> tuple[tuple[bytes, bytes], ...]:
    # gRPC percent-encodes grpc-message; keep it printable ASCII and short.
    return ((b"grpc-status", str(int(code)).encode()),
            (b"grpc-message", quote(message[:1024], safe=" !#$&'()*+,/:;=?@[]").encode()))


class GrpcConnection(asyncio.Protocol):
    """One client connection: h2 turns bytes into events; a finished request becomes a task, or is
    answered at once when its method has an `answer`."""

    def __init__(self, methods: dict[bytes, Method], connections: set[GrpcConnection],
                 ready: asyncio.Event | None = None) -> None:
        self.methods = methods
        self.connections = connections
        self.ready = ready  # until it is set, calls wait (GrpcServer)
        self.h2 = h2.connection.H2Connection(_H2_CONFIG)
        self.calls: dict[int, _Call] = {}
        self.blocked: dict[int, _Call] = {}  # answered, waiting for the client's flow-control window
        self.receiving: set[int] = set()  # streams whose request has not fully arrived
        self._control = b""  # h2's answers to control frames, waiting to go out after the next reply
        self._answered = False  # a reply was made while reading: it goes out when the read is done
        self._received_at = 0  # when the bytes being read arrived, with request timing on
        self._answered_paths: list[bytes] = []  # what was answered while reading them, to time
        self._control_timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.connections.add(self)
        self.h2.initiate_connection()
        self.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS})
        # h2 has no setting for this; its private dict is why h2 is pinned in pyproject.toml.
        self.h2._closed_streams = SizeLimitDict(size_limit=REMEMBERED_CLOSED_STREAMS)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        for call in self.calls.values():
            if call.task is not None:
                call.task.cancel()
        self.calls.clear()
        self.blocked.clear()
        self.receiving.clear()
        if self._control_timer is not None:
            self._control_timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self._received_at = TIMING.start()
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.warning("Sandbox API client broke HTTP/2 (%s); closing its connection", exc)
            with contextlib.suppress(h2.exceptions.ProtocolError):  # h2 may have queued one already
                self.h2.close_connection(ErrorCodes.PROTOCOL_ERROR)
            self._flush()
            self.close()
            return
        # Taken now so that they leave behind any reply the events below make at once.
        self._control += self.h2.data_to_send()
        for event in events:
            self._on_event(event)
        if self._answered_paths:  # answered while reading; _hold_control writes the replies
            for path in self._answered_paths:
                TIMING.done("sandbox", _method_name(path), self._received_at)
            self._answered_paths.clear()
        self._hold_control()

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            headers = dict(event.headers)
            self.calls[event.stream_id] = _Call(headers.get(b":path", b""))
            if not event.stream_ended:
                self.receiving.add(event.stream_id)
        elif isinstance(event, h2.events.DataReceived):
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            call = self.calls.get(event.stream_id)
            if call is not None and call.task is None:
                call.body += event.data
                if len(call.body) > MAX_REQUEST_BYTES + GRPC_PREFIX.size:
                    self._fail(event.stream_id, call, Code.RESOURCE_EXHAUSTED,
                               f"request larger than {MAX_REQUEST_BYTES} bytes")
        elif isinstance(event, h2.events.StreamEnded):
            self.receiving.discard(event.stream_id)
            call = self.calls.get(event.stream_id)
            if call is not None and call.task is None and not call.trailers:
                self._dispatch(event.stream_id, call)
        elif isinstance(event, h2.events.StreamReset):
            self.receiving.discard(event.stream_id)
            call = self.calls.pop(event.stream_id, None)
            self.blocked.pop(event.stream_id, None)
            if call is not None and call.task is not None:
                call.task.cancel()
        elif isinstance(event, h2.events.WindowUpdated):
            self._resume_blocked()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            # Our ack (h2 queued it as it read the frame) goes before any reply: until it has it, a client
            # may hold to its old settings (grpcio refuses a DATA frame over 16 KiB, dropping the
            # connection, before its larger MAX_FRAME_SIZE is acked), where other control answers
            # follow the next reply (CONTROL_DELAY).
            acks, self._control = _settings_frames_apart(self._control)
            self._write(acks)
            # Go's gRPC client grows stream windows through SETTINGS as well as WINDOW_UPDATE.
            if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings and self.blocked:
                self._flush()  # our ack first: only once it has that may the client count on the window
                self._resume_blocked()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.close()

    def _resume_blocked(self) -> None:
        if self.blocked:
            for stream_id, call in list(self.blocked.items()):
                self._send_pending(stream_id, call)
            self._answered = True  # a reply's next part goes out now, not held like a control answer

    def _dispatch(self, stream_id: int, call: _Call) -> None:
        method = self.methods.get(call.path)
        if method is not None and self.ready is not None and not self.ready.is_set():
            call.task = asyncio.ensure_future(self._run_when_ready(stream_id, call, method, self._received_at))
            return
        if method is not None and method.handler is not None:
            call.task = asyncio.ensure_future(self._run(stream_id, call, method, self._received_at))
            return
        self._answered = True
        self._answer(stream_id, call, method)
        if self._received_at:
            self._answered_paths.append(call.path)

    def _answer(self, stream_id: int, call: _Call, method: Method | None) -> None:
        """Answer a call from its method's `answer` (UNIMPLEMENTED if it has none)."""
        try:
            if method is None or method.answer is None:
                raise GrpcError(Code.UNIMPLEMENTED, f"unknown method {call.path.decode(errors='replace')}")
            reply = encode_message(method.answer(decode_message(bytes(call.body), method.request_type)))
        except GrpcError as exc:
            self._fail(stream_id, call, exc.code, exc.message)
        except Exception as exc:  # a bug of ours: the client still gets an answer
            self._fail_with_bug(stream_id, call, exc)
        else:
            self._reply(stream_id, call, reply, _OK_TRAILERS)

    async def _run_when_ready(self, stream_id: int, call: _Call, method: Method, started: int) -> None:
        assert self.ready is not None
        await self.ready.wait()
        if method.handler is not None:
            await self._run(stream_id, call, method, started)
            return
        self._answer(stream_id, call, method)
        if started:
            TIMING.done("sandbox", _method_name(call.path), started)
        self._flush()

    async def _run(self, stream_id: int, call: _Call, method: Method, started: int = 0) -> None:
        assert method.handler is not None
        try:
            request = decode_message(bytes(call.body), method.request_type)
            if method.replies_early:
                result = await method.handler(request, lambda message: self._reply_now(stream_id, call, message))
            else:
                result = await method.handler(request)
            reply = encode_message(result)
        except GrpcError as exc:
            self._fail(stream_id, call, exc.code, exc.message)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # reset by the client, or the server stopping
                raise
            # A cancellation escaping from inside the handler: the client is still owed an answer.
            self._fail(stream_id, call, Code.CANCELLED, "handler cancelled")
        except Exception as exc:  # a bug of ours: the client still gets an answer
            self._fail_with_bug(stream_id, call, exc)
        else:
            self._reply(stream_id, call, reply, _OK_TRAILERS)
        if started:  # the name is only made with timing on
            TIMING.done("sandbox", _method_name(call.path), started)
        self._flush()

    def _fail_with_bug(self, stream_id: int, call: _Call, exc: Exception) -> None:
        path = call.path.decode(errors="replace")
        log.error("Sandbox API %s failed", path, exc_info=exc)
        self._fail(stream_id, call, Code.UNKNOWN, f"{path}: {exc}")

    def _fail(self, stream_id: int, call: _Call, code: Code, message: str) -> None:
        self._reply(stream_id, call, b"", status_trailers(code, message))

    async def _reply_now(self, stream_id: int, call: _Call, message: Message) -> bool:
        """A handler's early reply: True once all of it is written to the client's socket (a reply the
        kernel took is read by the client even if we die next). One that waits for the client's window
        is awaited: reported undelivered, it would still reach the client later, as a success."""
        if call.trailers:
            raise RuntimeError("a call is answered once")
        whole = self._reply(stream_id, call, encode_message(message), _OK_TRAILERS)
        self._flush()
        if not whole and self.blocked.get(stream_id) is call:
            call.delivered = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(BLOCKED_REPLY_WAIT):
                    whole = await call.delivered
            except TimeoutError:
                log.warning("Sandbox API client took none of a reply for %.0f s; resetting its stream",
                            BLOCKED_REPLY_WAIT)
                self._give_up(stream_id)
                whole = False
        return whole and self.transport is not None and not self.transport.is_closing()

    def _give_up(self, stream_id: int) -> None:
        self.calls.pop(stream_id, None)
        self.blocked.pop(stream_id, None)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        self._flush()

    def _reply(self, stream_id: int, call: _Call, reply: bytes, trailers: tuple[tuple[bytes, bytes], ...]) -> bool:
        """Queue a reply on h2; True if all of it is queued (not reset, closed, or waiting for the
        client's flow-control window)."""
        if self.calls.get(stream_id) is not call or call.trailers:
            return False  # reset by the client, or already answered
        call.pending, call.trailers = reply, trailers
        try:
            self.h2.send_headers(stream_id, _REPLY_HEADERS)
        except h2.exceptions.ProtocolError:  # the stream, or after the client's GOAWAY the connection, closed
            self.calls.pop(stream_id, None)
            return False
        return self._send_pending(stream_id, call)

    def _send_pending(self, stream_id: int, call: _Call) -> bool:
        """Send the reply as far as the client's window allows; the trailers once all of it is out.
        True if they are."""
        sent = False
        try:
            while call.pending:
                size = min(len(call.pending), self.h2.local_flow_control_window(stream_id),
                           self.h2.max_outbound_frame_size)
                if size <= 0:
                    self.blocked[stream_id] = call
                    return False
                self.h2.send_data(stream_id, call.pending[:size])
                call.pending = call.pending[size:]
            self.h2.send_headers(stream_id, call.trailers, end_stream=True)
            sent = True
        except h2.exceptions.ProtocolError:  # as in _reply
            pass
        self.calls.pop(stream_id, None)
        self.blocked.pop(stream_id, None)
        if call.delivered is not None and not call.delivered.done():
            call.delivered.set_result(sent)
        return sent

    def _hold_control(self) -> None:
        """Keep what h2 queued while reading (answers to control frames) for the next reply, or
        CONTROL_DELAY at the latest. Not while a request is still arriving (its sender may be waiting
        for our window update), and not behind a reply made while reading: they leave together."""
        if self.receiving or self._answered:
            self._answered = False
            self._flush()
            return
        self._control += self.h2.data_to_send()
        if self._control and self._control_timer is None:
            self._control_timer = asyncio.get_running_loop().call_later(CONTROL_DELAY, self._flush)

    def _flush(self) -> None:
        data = self.h2.data_to_send() + self._control
        self._control = b""
        if self._control_timer is not None:
            self._control_timer.cancel()
            self._control_timer = None
        self._write(data)

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class GrpcServer:
    """Unary methods by full path (`/package.Service/Method`) on a unix socket created 0600."""

    def __init__(self, methods: dict[str, Method], ready: asyncio.Event | None = None) -> None:
        """Until `ready` (if given) is set, the socket accepts calls and they wait: a client that comes
        while the server gets ready (containerd restarting while a sandboxer recovers its sandboxes) is
        answered late rather than refused. An unknown method is refused at once all the same."""
        self.methods = {path.encode(): method for path, method in methods.items()}
        self.ready = ready
        self.connections: set[GrpcConnection] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, path: Path) -> None:
        old_umask = os.umask(0o177)  # no window in which the socket is reachable by others
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(
                lambda: GrpcConnection(self.methods, self.connections, self.ready), str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)

    async def stop(self, grace: float) -> None:
        """Stop accepting, give calls in flight `grace` seconds, then cancel what is left."""
        if self._server is None:
            return
        self._server.close()
        tasks = [call.task for conn in self.connections for call in conn.calls.values() if call.task is not None]
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_WAIT)
        for conn in list(self.connections):
            if conn.transport is not None:
                with contextlib.suppress(h2.exceptions.ProtocolError):  # already closed by h2
                    conn.h2.close_connection(ErrorCodes.NO_ERROR)
                conn._flush()
            conn.close()
        await self._server.wait_closed()
        self._server = None


def _method_name(path: bytes) -> str:
    """`/containerd.runtime.sandbox.v1.Controller/Start` -> `Start`."""
    return path.decode(errors="replace").rpartition("/")[2]
