"""Stream bookkeeping for either end of one ttrpc connection, without I/O (h11 style).

Bytes go in through `receive_data`/`receive_eof` and come out as events; what you send goes in as
calls (`send_response`, `send_data`, `start_request`) and comes out as bytes to write. The asyncio
layers own sockets and tasks; everything the protocol forbids is decided here.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from kuasar.common.api.ttrpc import request_pb2
from kuasar.common.errors import Code, FailedPrecondition, ResourceExhausted

from .frames import NO_FLAGS, Flag, Frame, FrameDecoder, FrameType, OversizedFrame, ProtocolError, encode_frame

# Stream ids are uint32 on the wire; a client that used them all up must reconnect.
MAX_STREAM_ID = 0xFFFF_FFFF


@dataclass(frozen=True)
class NewRequest:
    """Server side: a client opened stream `stream_id` with `request`."""

    stream_id: int
    request: request_pb2.Request
    flags: Flag


@dataclass(frozen=True)
class StreamData:
    """A Data frame. `payload` is None for a no-data frame (b"" is a valid empty message);
    `end` means the sender will send nothing more on this stream."""

    stream_id: int
    payload: bytes | None
    end: bool


@dataclass(frozen=True)
class ResponseReceived:
    """Client side: the server finished stream `stream_id` with `response`."""

    stream_id: int
    response: request_pb2.Response


@dataclass(frozen=True)
class MessageRefused:
    """The peer sent a frame on `stream_id` that cannot be taken: over MAX_MESSAGE_SIZE (its payload
    was skipped; RESOURCE_EXHAUSTED) or, to a server, one that breaks the rules for its stream (an even
    or reused id, an undecodable request, data on a stream not open for it; INVALID_ARGUMENT). A server
    answers that stream with `code` (`refuse`); a client fails the call with it. The stream, if it was
    open, is finished; the connection goes on, as with Go's ttrpc server: one bad frame must not end
    every other call on the connection."""

    stream_id: int
    message: str
    code: int = Code.RESOURCE_EXHAUSTED


Event = NewRequest | StreamData | ResponseReceived | MessageRefused


class StreamClosed(FailedPrecondition):
    """Local misuse: sending on a stream that is finished or that we already half-closed."""


@dataclass
class _Stream:
    remote_closed: bool
    local_closed: bool = False


def status_response(code: int, message: str) -> request_pb2.Response:
    return request_pb2.Response(status=request_pb2.Status(code=code, message=message))


class _Connection:
    def __init__(self) -> None:
        self._decoder = FrameDecoder()
        self._streams: dict[int, _Stream] = {}
        self._error: ProtocolError | None = None

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def is_active(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def receive_data(self, data: bytes) -> list[Event]:
        """Events for `data`. Raises ProtocolError (then and on every later call) if the peer
        broke the protocol; events decoded from the same chunk before the error are dropped,
        since the connection is about to be closed anyway."""
        if self._error is not None:
            raise self._error
        events: list[Event] = []
        try:
            for frame in self._decoder.feed(data):
                event = self._on_oversized(frame) if isinstance(frame, OversizedFrame) else self._on_frame(frame)
                if event is not None:
                    events.append(event)
        except ProtocolError as err:
            self._error = err
            raise
        return events

    def receive_eof(self) -> None:
        if self._error is not None:
            raise self._error
        self._decoder.eof()

    def send_data(self, stream_id: int, payload: bytes | None, end: bool = False) -> bytes:
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            raise StreamClosed(f"stream {stream_id} is closed for sending")
        flags = (Flag.REMOTE_CLOSED if end else NO_FLAGS) | (Flag.NO_DATA if payload is None else NO_FLAGS)
        data = _encode(Frame(stream_id, FrameType.DATA, flags, payload or b""))
        if end:
            stream.local_closed = True
            self._after_local_close(stream_id, stream)
        return data

    def _after_local_close(self, stream_id: int, stream: _Stream) -> None:
        if stream.remote_closed:
            del self._streams[stream_id]

    def _on_frame(self, frame: Frame) -> Event | None:
        raise NotImplementedError

    def _on_oversized(self, frame: OversizedFrame) -> MessageRefused | None:
        self._streams.pop(frame.stream_id, None)
        return MessageRefused(frame.stream_id, frame.message)

    def _refused(self, stream_id: int, message: str) -> MessageRefused:
        """A frame that breaks its stream's rules: the stream (if open) is finished, the connection
        goes on."""
        self._streams.pop(stream_id, None)
        return MessageRefused(stream_id, message, Code.INVALID_ARGUMENT)

    def _on_data(self, frame: Frame, stream: _Stream) -> StreamData | MessageRefused | None:
        if stream.remote_closed:
            return self._refused(frame.stream_id, f"data on stream {frame.stream_id} after its sender closed it")
        end = bool(frame.flags & Flag.REMOTE_CLOSED)
        # Like Go, a no-data frame's payload (if any) is ignored rather than treated as an error.
        payload = None if frame.flags & Flag.NO_DATA else frame.payload
        if end:
            stream.remote_closed = True
            self._after_remote_close(frame.stream_id, stream)
        if payload is None and not end:
            return None
        return StreamData(frame.stream_id, payload, end)

    def _after_remote_close(self, stream_id: int, stream: _Stream) -> None:
        if stream.local_closed:
            del self._streams[stream_id]


class ServerConnection(_Connection):
    """The accepting end: validates client stream ids and tracks which streams are open."""

    def __init__(self) -> None:
        super().__init__()
        self._last_stream_id = 0

    def _on_frame(self, frame: Frame) -> Event | None:
        sid = frame.stream_id
        if sid % 2 != 1:
            return self._refused(sid, "StreamID must be odd for client initiated streams")
        if frame.type is FrameType.REQUEST:
            return self._on_request(frame)
        if frame.type is FrameType.DATA:
            stream = self._streams.get(sid)
            if stream is None:
                if sid <= self._last_stream_id:
                    # The stream existed and we already ended it; a half-close or window update
                    # crossing our final frame on the wire is normal, not an error. The half-close is
                    # still told (no data): it says the client is done reading too.
                    if frame.flags & Flag.REMOTE_CLOSED:
                        return StreamData(sid, None, True)
                    return None
                return self._refused(sid, f"StreamID {sid} is not active")
            return self._on_data(frame, stream)
        return None  # a response from a client: as Go's server, not ours to act on

    def _on_request(self, frame: Frame) -> NewRequest | MessageRefused:
        sid = frame.stream_id
        if sid <= self._last_stream_id:
            return self._refused(sid, "StreamID cannot be re-used and must increment")
        self._last_stream_id = sid
        if frame.flags & Flag.REMOTE_OPEN and frame.flags & Flag.REMOTE_CLOSED:
            return self._refused(sid, "request cannot be both remote-open and remote-closed")
        try:
            request = request_pb2.Request.FromString(frame.payload)
        except DecodeError as err:
            return self._refused(sid, f"unmarshal request error: {err}")
        self._streams[sid] = _Stream(remote_closed=not frame.flags & Flag.REMOTE_OPEN)
        return NewRequest(sid, request, frame.flags)

    def send_response(self, stream_id: int, response: request_pb2.Response) -> bytes:
        """A Response frame; it finishes the stream whatever the client's side still has open."""
        if stream_id not in self._streams:
            raise StreamClosed(f"stream {stream_id} is closed for sending")
        data = _encode(Frame(stream_id, FrameType.RESPONSE, NO_FLAGS, response.SerializeToString()))
        del self._streams[stream_id]
        return data

    def _after_local_close(self, stream_id: int, stream: _Stream) -> None:
        # ttrpc has no server-closed-but-client-still-sending state: once the server ends a
        # stream, it is finished (late client frames are dropped above).
        del self._streams[stream_id]

    @staticmethod
    def refuse(event: MessageRefused) -> bytes:
        """The status Response for a refused frame, on the stream it named."""
        payload = status_response(event.code, event.message).SerializeToString()
        return encode_frame(Frame(event.stream_id, FrameType.RESPONSE, NO_FLAGS, payload))

    @staticmethod
    def reject(error: ProtocolError) -> bytes | None:
        """The status Response for a protocol error, on the offending stream id if it had one.
        Independent of stream state: the id may be one the client was not allowed to use."""
        if error.stream_id is None:
            return None
        payload = status_response(error.code, error.message).SerializeToString()
        return encode_frame(Frame(error.stream_id, FrameType.RESPONSE, NO_FLAGS, payload))


class ClientConnection(_Connection):
    """The dialling end: allocates odd, increasing stream ids and matches replies to them."""

    def __init__(self) -> None:
        super().__init__()
        self._next_stream_id = 1

    def start_request(self, request: request_pb2.Request, flags: Flag = NO_FLAGS) -> tuple[int, bytes]:
        """Open a stream: flags 0 for unary, REMOTE_OPEN to keep sending, REMOTE_CLOSED for a
        server-streaming call whose only client message is the request payload."""
        sid = self._next_stream_id
        if sid > MAX_STREAM_ID:
            raise ResourceExhausted("ttrpc stream ids exhausted on this connection; reconnect")
        data = _encode(Frame(sid, FrameType.REQUEST, flags, request.SerializeToString()))
        self._next_stream_id += 2
        self._streams[sid] = _Stream(remote_closed=False, local_closed=not flags & Flag.REMOTE_OPEN)
        return sid, data

    def close_send(self, stream_id: int) -> bytes:
        """Half-close: Data with REMOTE_CLOSED|NO_DATA, the shape Go and Rust clients send."""
        return self.send_data(stream_id, None, end=True)

    def forget(self, stream_id: int) -> None:
        """Stop tracking a stream the caller gave up on (timeout, cancellation)."""
        self._streams.pop(stream_id, None)

    def _on_oversized(self, frame: OversizedFrame) -> MessageRefused | None:
        # Like Go's client: only a stream we still wait on hears of it.
        return super()._on_oversized(frame) if frame.stream_id in self._streams else None

    def _on_frame(self, frame: Frame) -> Event | None:
        sid = frame.stream_id
        if frame.type is FrameType.REQUEST:
            raise ProtocolError("server initiated streams are not supported", stream_id=sid)
        stream = self._streams.get(sid)
        if stream is None:
            # Like Go's client: a reply to a call we abandoned (timed out, cancelled) is dropped.
            return None
        if frame.type is FrameType.RESPONSE:
            try:
                response = request_pb2.Response.FromString(frame.payload)
            except DecodeError as err:
                raise ProtocolError(f"unmarshal response error: {err}", stream_id=sid) from None
            del self._streams[sid]
            return ResponseReceived(sid, response)
        return self._on_data(frame, stream)

    def _after_remote_close(self, stream_id: int, stream: _Stream) -> None:
        # The server ending its side ends the stream (it sends nothing after that), even if we
        # never half-closed, as with containerd's stdout streams.
        del self._streams[stream_id]


def _encode(frame: Frame) -> bytes:
    """encode_frame, with an oversized payload reported as the caller's error, not the peer's."""
    try:
        return encode_frame(frame)
    except ProtocolError as err:
        raise ResourceExhausted(err.message) from None


__all__ = [
    "ClientConnection", "Event", "MAX_STREAM_ID", "MessageRefused", "NewRequest", "ResponseReceived",
    "ServerConnection", "StreamClosed", "StreamData", "status_response",
]
