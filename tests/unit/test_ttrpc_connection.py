"""ttrpc stream state machines, driven with byte strings only (no sockets)."""

from __future__ import annotations

import pytest

from kuasar.common.api.ttrpc import request_pb2
from kuasar.common.errors import Code, ResourceExhausted
from kuasar.common.ttrpc import (
    MAX_MESSAGE_SIZE,
    ClientConnection,
    Flag,
    Frame,
    FrameDecoder,
    FrameType,
    MessageRefused,
    NewRequest,
    ProtocolError,
    ResponseReceived,
    ServerConnection,
    StreamClosed,
    StreamData,
    encode_frame,
    status_response,
)

SVC = "containerd.task.v2.Task"


def request_frame(stream_id: int, flags: int = 0, payload: bytes = b"x", method: str = "Create") -> bytes:
    req = request_pb2.Request(service=SVC, method=method, payload=payload)
    return encode_frame(Frame(stream_id, FrameType.REQUEST, Flag(flags), req.SerializeToString()))


def data_frame(stream_id: int, flags: int = 0, payload: bytes = b"") -> bytes:
    return encode_frame(Frame(stream_id, FrameType.DATA, Flag(flags), payload))


def decode_one(raw: bytes) -> Frame:
    (frame,) = FrameDecoder().feed(raw)
    return frame


# --- server side -----------------------------------------------------------------------------

def test_server_turns_unary_request_into_event() -> None:
    conn = ServerConnection()
    (event,) = conn.receive_data(request_frame(1, payload=b"abc"))
    assert isinstance(event, NewRequest)
    assert (event.stream_id, event.request.service, event.request.method, event.request.payload) == (
        1, SVC, "Create", b"abc")
    assert event.flags == Flag(0)
    assert conn.is_active(1)


def test_server_response_finishes_the_stream() -> None:
    conn = ServerConnection()
    conn.receive_data(request_frame(1))
    raw = conn.send_response(1, request_pb2.Response(payload=b"ok"))
    frame = decode_one(raw)
    assert (frame.stream_id, frame.type, frame.flags) == (1, FrameType.RESPONSE, Flag(0))
    assert request_pb2.Response.FromString(frame.payload).payload == b"ok"
    assert not conn.is_active(1)
    with pytest.raises(StreamClosed):
        conn.send_response(1, request_pb2.Response())


def refused(stream_id: int, message: str) -> MessageRefused:
    return MessageRefused(stream_id, message, Code.INVALID_ARGUMENT)


# A frame against its stream's rules is refused on that stream, and the connection goes on, as with Go's
# ttrpc server: it used to end the connection, and with it every other call on it.
def test_server_refuses_an_even_stream_id_and_goes_on() -> None:
    conn = ServerConnection()
    events = conn.receive_data(request_frame(2) + request_frame(3))
    assert events[0] == refused(2, "StreamID must be odd for client initiated streams")
    assert isinstance(events[1], NewRequest) and events[1].stream_id == 3


def test_server_refuses_non_increasing_and_reused_stream_ids() -> None:
    conn = ServerConnection()
    conn.receive_data(request_frame(5))
    assert conn.receive_data(request_frame(3)) == [refused(3, "StreamID cannot be re-used and must increment")]
    # A reused id of a call still running: the client broke that call, which is finished now.
    assert conn.receive_data(request_frame(5)) == [refused(5, "StreamID cannot be re-used and must increment")]
    assert not conn.is_active(5)
    assert [e.stream_id for e in conn.receive_data(request_frame(7))] == [7]


def test_server_accepts_gaps_in_stream_ids() -> None:
    conn = ServerConnection()
    events = conn.receive_data(request_frame(1) + request_frame(7) + request_frame(9))
    assert [e.stream_id for e in events] == [1, 7, 9]


def test_server_refuses_data_for_a_stream_never_opened() -> None:
    assert ServerConnection().receive_data(data_frame(1, payload=b"x")) == [refused(1, "StreamID 1 is not active")]


def test_server_drops_late_data_for_a_stream_it_already_ended_and_tells_its_half_close() -> None:
    conn = ServerConnection()
    conn.receive_data(request_frame(1, flags=Flag.REMOTE_OPEN, payload=b""))
    conn.send_data(1, None, end=True)
    # A window update, and the client's half-close, after our end-of-stream: not errors; the half-close
    # is told without data (the client is done reading: see TtrpcServer.add_stream's ends_connection).
    assert conn.receive_data(data_frame(1, flags=0x00, payload=b"window")) == []
    assert conn.receive_data(data_frame(1, flags=0x05)) == [StreamData(1, None, True)]


def test_server_refuses_an_undecodable_request_and_a_both_open_and_closed_one() -> None:
    conn = ServerConnection()
    (event,) = conn.receive_data(encode_frame(Frame(1, FrameType.REQUEST, Flag(0), b"\xff\xff\xff")))
    assert isinstance(event, MessageRefused) and event.code == Code.INVALID_ARGUMENT
    assert event.stream_id == 1 and event.message.startswith("unmarshal request error")
    assert conn.receive_data(request_frame(3, flags=Flag.REMOTE_OPEN | Flag.REMOTE_CLOSED)) == [
        refused(3, "request cannot be both remote-open and remote-closed")]
    assert not conn.is_active(1) and not conn.is_active(3)


def test_server_ignores_response_frames_from_a_client() -> None:
    conn = ServerConnection()
    conn.receive_data(request_frame(1))
    assert conn.receive_data(encode_frame(Frame(1, FrameType.RESPONSE, Flag(0), b""))) == []
    assert conn.is_active(1)  # the call goes on


def test_server_refuses_data_on_a_unary_stream_and_finishes_it() -> None:
    conn = ServerConnection()
    conn.receive_data(request_frame(1))
    assert conn.receive_data(data_frame(1, payload=b"x")) == [refused(1, "data on stream 1 after its sender closed it")]
    assert not conn.is_active(1)


def test_server_refuses_data_after_client_half_closed() -> None:
    conn = ServerConnection()
    conn.receive_data(request_frame(1, flags=Flag.REMOTE_OPEN) + data_frame(1, flags=0x05))
    assert conn.receive_data(data_frame(1, payload=b"x")) == [refused(1, "data on stream 1 after its sender closed it")]


def test_server_refusal_answers_on_the_offending_stream_id() -> None:
    frame = decode_one(ServerConnection.refuse(refused(4, "StreamID must be odd")))
    assert (frame.stream_id, frame.type) == (4, FrameType.RESPONSE)
    status = request_pb2.Response.FromString(frame.payload).status
    assert (status.code, status.message) == (Code.INVALID_ARGUMENT, "StreamID must be odd")


def test_server_reject_answers_on_the_offending_stream_id() -> None:
    error = ProtocolError("connection closed with 3 bytes of a partial frame", Code.DATA_LOSS, stream_id=4)
    frame = decode_one(ServerConnection.reject(error))
    assert (frame.stream_id, frame.type) == (4, FrameType.RESPONSE)
    assert request_pb2.Response.FromString(frame.payload).status.code == Code.DATA_LOSS
    assert ServerConnection.reject(ProtocolError("no stream")) is None


def test_server_truncated_frame_at_eof() -> None:
    conn = ServerConnection()
    conn.receive_data(request_frame(1)[:-1])
    with pytest.raises(ProtocolError) as info:
        conn.receive_eof()
    assert info.value.code == Code.DATA_LOSS


def test_server_oversized_reply_is_a_local_error_and_keeps_the_stream() -> None:
    conn = ServerConnection()
    conn.receive_data(request_frame(1))
    with pytest.raises(ResourceExhausted):
        conn.send_response(1, request_pb2.Response(payload=b"\0" * MAX_MESSAGE_SIZE))
    assert conn.is_active(1)  # so an error status can still be sent


# --- client side -----------------------------------------------------------------------------

def test_client_allocates_odd_increasing_stream_ids() -> None:
    conn = ClientConnection()
    ids = [conn.start_request(request_pb2.Request(service=SVC, method="M"))[0] for _ in range(4)]
    assert ids == [1, 3, 5, 7]


def test_client_request_bytes() -> None:
    req = request_pb2.Request(service=SVC, method="State")
    sid, raw = ClientConnection().start_request(req)
    assert raw == encode_frame(Frame(1, FrameType.REQUEST, Flag(0), req.SerializeToString()))
    assert raw[:10] == len(req.SerializeToString()).to_bytes(4, "big") + b"\x00\x00\x00\x01\x01\x00"


def test_client_matches_response_to_its_stream() -> None:
    conn = ClientConnection()
    conn.start_request(request_pb2.Request())
    conn.start_request(request_pb2.Request())
    reply = status_response(Code.NOT_FOUND, "nope").SerializeToString()
    (event,) = conn.receive_data(encode_frame(Frame(3, FrameType.RESPONSE, Flag(0), reply)))
    assert isinstance(event, ResponseReceived)
    assert event.stream_id == 3
    assert event.response.status.code == Code.NOT_FOUND
    assert not conn.is_active(3)
    assert conn.is_active(1)


def test_client_ignores_replies_for_forgotten_or_unknown_streams() -> None:
    conn = ClientConnection()
    sid, _ = conn.start_request(request_pb2.Request())
    conn.forget(sid)
    raw = encode_frame(Frame(sid, FrameType.RESPONSE, Flag(0), b""))
    assert conn.receive_data(raw + encode_frame(Frame(41, FrameType.RESPONSE, Flag(0), b""))) == []


def test_client_rejects_requests_from_the_server() -> None:
    with pytest.raises(ProtocolError, match="server initiated"):
        ClientConnection().receive_data(request_frame(2))


def test_client_stream_half_close_and_server_end() -> None:
    conn = ClientConnection()
    sid, raw = conn.start_request(request_pb2.Request(service=SVC, method="Stream"), Flag.REMOTE_OPEN)
    assert raw[9] == Flag.REMOTE_OPEN
    assert conn.send_data(sid, b"hi") == b"\x00\x00\x00\x02\x00\x00\x00\x01\x03\x00hi"
    assert conn.close_send(sid) == b"\x00\x00\x00\x00\x00\x00\x00\x01\x03\x05"
    with pytest.raises(StreamClosed):
        conn.send_data(sid, b"late")
    events = conn.receive_data(data_frame(sid, payload=b"echo") + data_frame(sid, flags=0x05))
    assert events == [StreamData(sid, b"echo", False), StreamData(sid, None, True)]
    assert not conn.is_active(sid)


def test_client_server_may_end_a_stream_before_the_client_half_closes() -> None:
    conn = ClientConnection()
    sid, _ = conn.start_request(request_pb2.Request(), Flag.REMOTE_OPEN)
    assert conn.receive_data(data_frame(sid, flags=0x05)) == [StreamData(sid, None, True)]
    with pytest.raises(StreamClosed):
        conn.send_data(sid, b"x")


def test_client_cannot_send_data_on_a_unary_call() -> None:
    conn = ClientConnection()
    sid, _ = conn.start_request(request_pb2.Request())
    with pytest.raises(StreamClosed):
        conn.send_data(sid, b"x")


def test_client_refuses_oversized_request_without_using_an_id() -> None:
    conn = ClientConnection()
    with pytest.raises(ResourceExhausted):
        conn.start_request(request_pb2.Request(payload=b"\0" * MAX_MESSAGE_SIZE))
    assert conn.start_request(request_pb2.Request())[0] == 1


def test_client_undecodable_response_is_a_protocol_error() -> None:
    conn = ClientConnection()
    sid, _ = conn.start_request(request_pb2.Request())
    with pytest.raises(ProtocolError, match="unmarshal response"):
        conn.receive_data(encode_frame(Frame(sid, FrameType.RESPONSE, Flag(0), b"\xff\xff")))
