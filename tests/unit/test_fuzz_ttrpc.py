"""Hostile bytes at a real TtrpcServer (Task service registered) on a unix socket.

Whatever a peer sends (random bytes, valid headers with random payloads, types, flags and stream ids,
truncated frames, oversized lengths), the server must not crash, must close or answer every connection
within a bounded time, must only ever write well-formed frames, and must still answer a valid request
afterwards. Inputs are generated with hypothesis; the number run is printed and recorded as a property.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.ttrpc import request_pb2
from kuasar.common.errors import Code, NotFound
from kuasar.common.ids import validate_id
from kuasar.common.task_api import TASK_METHODS, TASK_SERVICES, TaskBackend, register_task_service
from kuasar.common.ttrpc import (
    MAX_MESSAGE_SIZE,
    NAMESPACE_KEY,
    Context,
    Flag,
    Frame,
    FrameDecoder,
    FrameType,
    ProtocolError,
    TtrpcServer,
    encode_frame,
)
from tests.support.ttrpc_thread import ThreadedTtrpcServer

# Every connection must be answered or closed within this (the server's own close path is bounded by
# CLOSE_TIMEOUT = 5 s, and the trivial backend never blocks).
REPLY_DEADLINE = 8.0
MAX_EXAMPLES = int(os.environ.get("KUASAR_FUZZ_EXAMPLES", "1500"))
HEADER = struct.Struct(">IIBB")


class TrivialTasks(TaskBackend):
    """Answers at once: Connect says who it is, State knows no container, the rest is UNIMPLEMENTED."""

    async def connect(self, req: task.ConnectRequest, ctx: Context) -> task.ConnectResponse:
        return task.ConnectResponse(shim_pid=os.getpid(), version="fuzz")

    async def state(self, req: task.StateRequest, ctx: Context) -> task.StateResponse:
        validate_id(req.id, "container id")
        raise NotFound(f"container {req.id} not found")


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedTtrpcServer]:
    def setup(server: TtrpcServer) -> None:
        register_task_service(server, TrivialTasks())

    with ThreadedTtrpcServer(setup) as threaded:
        yield threaded


# -- strategies --------------------------------------------------------------------------------------
METHODS = sorted(TASK_METHODS)
names = st.one_of(st.sampled_from(TASK_SERVICES), st.text(max_size=40))
method_names = st.one_of(st.sampled_from(METHODS), st.text(max_size=20))
request_payloads = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda i, e: task.StateRequest(id=i, exec_id=e).SerializeToString(), st.text(max_size=80),
              st.text(max_size=10)),
    st.just(task.ConnectRequest(id="c1").SerializeToString()),
)
metadata = st.lists(st.builds(request_pb2.KeyValue, key=st.one_of(st.just(NAMESPACE_KEY), st.text(max_size=30)),
                              value=st.text(max_size=30)), max_size=4)
requests = st.builds(
    request_pb2.Request, service=names, method=method_names, payload=request_payloads,
    timeout_nano=st.one_of(st.just(0), st.integers(-(2**63), 2**63 - 1), st.integers(1, 10**9)),
    metadata=metadata)
stream_ids = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 3, 5, 2**31 + 1, 2**32 - 1]))
frame_types = st.one_of(st.sampled_from([1, 2, 3]), st.integers(0, 255))
flags = st.one_of(st.sampled_from([0, 1, 2, 4, 5, 6, 7]), st.integers(0, 255))


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One frame with a valid header shape; payload, type, flags, stream id (and sometimes the length
    field) are random."""
    payload = draw(st.one_of(requests.map(lambda r: r.SerializeToString()), st.binary(max_size=300)))
    length = draw(st.one_of(st.just(len(payload)), st.integers(0, len(payload) + 16)))
    return HEADER.pack(length, draw(stream_ids), draw(frame_types), draw(flags)) + payload


@st.composite
def oversized(draw: st.DrawFn) -> bytes:
    length = draw(st.integers(MAX_MESSAGE_SIZE + 1, 2**32 - 1))
    return HEADER.pack(length, draw(stream_ids), draw(frame_types), draw(flags)) + draw(st.binary(max_size=64))


@st.composite
def truncated(draw: st.DrawFn) -> bytes:
    data = b"".join(draw(st.lists(valid_request_frames(), min_size=1, max_size=3)))
    return data[: draw(st.integers(0, len(data) - 1))]


def valid_request_frames() -> st.SearchStrategy[bytes]:
    return st.builds(lambda sid, req: encode_frame(Frame(sid, FrameType.REQUEST, Flag(0), req.SerializeToString())),
                     st.integers(0, 1000).map(lambda n: 2 * n + 1), requests)


hostile_streams = st.one_of(
    st.tuples(st.just("random bytes"), st.binary(min_size=1, max_size=4096)),
    st.tuples(st.just("random frames"), st.lists(frames(), min_size=1, max_size=6).map(b"".join)),
    st.tuples(st.just("truncated"), truncated()),
    st.tuples(st.just("oversized"), st.builds(lambda a, b: a + b, st.lists(frames(), max_size=2).map(b"".join),
                                              oversized())),
)


# -- a raw client ------------------------------------------------------------------------------------
def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(REPLY_DEADLINE)
    sock.connect(path)
    return sock


def read_until_closed(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """Everything the server writes until it closes (True) or the deadline passes (False)."""
    out = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(out), False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return bytes(out), False
        except ConnectionResetError:  # closed with our unread bytes still queued: also a close
            return bytes(out), True
        if not chunk:
            return bytes(out), True
        out += chunk


def server_frames(data: bytes) -> list[Frame]:
    """The server's output must be well-formed ttrpc: whole frames, responses that decode."""
    decoder = FrameDecoder()
    found = decoder.feed(data)
    decoder.eof()  # raises on a partial frame
    for frame in found:
        assert isinstance(frame, Frame), frame  # never more than MAX_MESSAGE_SIZE
        assert frame.type in (FrameType.RESPONSE, FrameType.DATA), frame
        if frame.type is FrameType.RESPONSE:
            request_pb2.Response.FromString(frame.payload)
    return found


def answers_a_valid_request(path: str) -> None:
    with connect(path) as sock:
        request = request_pb2.Request(service=TASK_SERVICES[0], method="Connect",
                                      payload=task.ConnectRequest(id="x").SerializeToString(),
                                      timeout_nano=5 * 10**9)
        sock.sendall(encode_frame(Frame(1, FrameType.REQUEST, Flag(0), request.SerializeToString())))
        decoder, got = FrameDecoder(), []
        deadline = time.monotonic() + REPLY_DEADLINE
        while not got:
            assert time.monotonic() < deadline, "no reply to a valid request"
            chunk = sock.recv(65536)
            assert chunk, "server closed a valid connection"
            got = decoder.feed(chunk)
    assert got[0].stream_id == 1 and got[0].type is FrameType.RESPONSE
    response = request_pb2.Response.FromString(got[0].payload)
    assert response.status.code == Code.OK, response.status
    assert task.ConnectResponse.FromString(response.payload).version == "fuzz"


def wait_idle(server: ThreadedTtrpcServer, timeout: float = REPLY_DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while server.server.active_connections or server.server.active_handlers:
        assert time.monotonic() < deadline, (
            f"{server.server.active_connections} connections / {server.server.active_handlers} handlers linger")
        time.sleep(0.01)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


FUZZ_SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_hostile_byte_streams_are_closed_in_bounded_time_and_the_server_lives_on(
        server: ThreadedTtrpcServer, record_property) -> None:
    ran: Counter[str] = Counter()
    fds_before = fd_count()
    started = time.monotonic()

    @FUZZ_SETTINGS
    @given(case=hostile_streams)
    def hostile(case: tuple[str, bytes]) -> None:
        kind, data = case
        ran[kind] += 1
        with connect(server.path) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)  # EOF: the server must finish with us now
            except (BrokenPipeError, ConnectionResetError):
                pass  # it already hung up on a protocol error: fine
            out, closed = read_until_closed(sock, time.monotonic() + REPLY_DEADLINE)
        assert closed, f"server kept a {kind} connection open for {REPLY_DEADLINE}s"
        server_frames(out)
        assert server.alive and server.loop_errors == []

    hostile()
    wait_idle(server)
    answers_a_valid_request(server.path)
    report(ran, started, record_property, "ttrpc_hostile_inputs")
    assert fd_count() <= fds_before + 2, "file descriptors leaked"


BAD_STREAM = 2**31 + 1  # where the frame that breaks a rule goes
NEXT_STREAM = 2**31 + 3  # a valid request after it, which must be answered


@st.composite
def poisoned(draw: st.DrawFn) -> tuple[str, bytes]:
    """Valid requests, one frame the server must refuse on its stream or skip, then a valid request."""
    good = b"".join(draw(st.lists(valid_request_frames(), max_size=2)))
    bad = draw(st.sampled_from(["type", "flags", "even id", "reused id", "undecodable", "data on no stream"]))
    request = encode_frame(Frame(1, FrameType.REQUEST, Flag(0), b""))[HEADER.size:]
    frame = {
        "type": HEADER.pack(4, BAD_STREAM, draw(st.sampled_from([0, 4, 5, 0x7F, 0xFF])), 0) + b"\x01\x02\x03\x04",
        "flags": HEADER.pack(len(request), BAD_STREAM, 1, draw(st.integers(8, 255))) + request,
        "even id": HEADER.pack(len(request), BAD_STREAM + 1, 1, 0) + request,
        "reused id": HEADER.pack(0, BAD_STREAM, 1, 0) + HEADER.pack(0, BAD_STREAM, 1, 0),
        "undecodable": HEADER.pack(3, BAD_STREAM, 1, 0) + b"\xff\xff\xff",
        "data on no stream": HEADER.pack(1, BAD_STREAM, 3, 0) + b"x",
    }[bad]
    last = request_pb2.Request(service=TASK_SERVICES[0], method="Connect",
                               payload=task.ConnectRequest(id="x").SerializeToString(), timeout_nano=5 * 10**9)
    return bad, good + frame + encode_frame(Frame(NEXT_STREAM, FrameType.REQUEST, Flag(0), last.SerializeToString()))


def test_a_frame_against_its_streams_rules_is_answered_there_and_the_connection_serves_on(
        server: ThreadedTtrpcServer, record_property) -> None:
    # As Go's ttrpc server: it closed the connection, and every other call on it went unanswered. A
    # type or flag no version we know defines (a later version's) is skipped or ignored.
    ran: Counter[str] = Counter()
    started = time.monotonic()

    @settings(FUZZ_SETTINGS, max_examples=max(MAX_EXAMPLES // 4, 20))
    @given(case=poisoned())
    def violation(case: tuple[str, bytes]) -> None:
        bad, data = case
        ran[bad] += 1
        with connect(server.path) as sock:
            sock.sendall(data)  # and keep our side open
            decoder, replies = FrameDecoder(), []
            deadline = time.monotonic() + REPLY_DEADLINE
            while not any(f.stream_id == NEXT_STREAM for f in replies):
                assert time.monotonic() < deadline, f"no answer after a frame with a bad {bad}"
                chunk = sock.recv(65536)
                assert chunk, f"the server closed the connection for a frame with a bad {bad}"
                replies += decoder.feed(chunk)
        statuses = {f.stream_id: request_pb2.Response.FromString(f.payload).status for f in replies}
        assert statuses[NEXT_STREAM].code == Code.OK
        if bad in ("even id", "undecodable", "data on no stream"):
            refused = statuses[BAD_STREAM + 1 if bad == "even id" else BAD_STREAM]
            assert refused.code == Code.INVALID_ARGUMENT, refused
        elif bad == "reused id":  # the first is a request like any other, the second refused
            assert BAD_STREAM in statuses
        elif bad == "type":
            assert BAD_STREAM not in statuses  # skipped

    violation()
    wait_idle(server)
    answers_a_valid_request(server.path)
    report(ran, started, record_property, "ttrpc_poisoned_inputs")


@st.composite
def valid_calls(draw: st.DrawFn) -> list[request_pb2.Request]:
    return draw(st.lists(requests, min_size=1, max_size=8))


def test_every_well_framed_request_gets_exactly_one_response(server: ThreadedTtrpcServer, record_property) -> None:
    ran: Counter[str] = Counter()
    started = time.monotonic()

    @settings(FUZZ_SETTINGS, max_examples=max(MAX_EXAMPLES // 4, 20))
    @given(calls=valid_calls())
    def well_framed(calls: list[request_pb2.Request]) -> None:
        ran["well-framed"] += 1
        data = b"".join(encode_frame(Frame(2 * i + 1, FrameType.REQUEST, Flag(0), r.SerializeToString()))
                        for i, r in enumerate(calls))
        decoder, replies = FrameDecoder(), []
        with connect(server.path) as sock:
            sock.sendall(data)
            deadline = time.monotonic() + REPLY_DEADLINE
            while len(replies) < len(calls):
                assert time.monotonic() < deadline, f"{len(calls) - len(replies)} requests never answered"
                chunk = sock.recv(65536)
                assert chunk, "server closed a connection that followed the protocol"
                replies += decoder.feed(chunk)
        assert sorted(f.stream_id for f in replies) == [2 * i + 1 for i in range(len(calls))]
        for frame in replies:
            assert frame.type is FrameType.RESPONSE
            status = request_pb2.Response.FromString(frame.payload).status
            # Never UNKNOWN: missing methods are UNIMPLEMENTED, an undecodable message INTERNAL (as Go's
            # ttrpc answers it), a bad id INVALID_ARGUMENT.
            assert status.code in (Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.UNIMPLEMENTED,
                                   Code.DEADLINE_EXCEEDED, Code.INTERNAL), status
            assert status.code != Code.INTERNAL or "error unmarshalling payload" in status.message, status

    well_framed()
    wait_idle(server)
    report(ran, started, record_property, "ttrpc_well_framed_inputs")


def report(ran: Counter[str], started: float, record_property, name: str) -> None:
    total = sum(ran.values())
    print(f"\n{name}: {total} inputs in {time.monotonic() - started:.1f}s ({dict(ran)})")
    record_property(name, total)


def test_decoder_refuses_what_the_server_refuses() -> None:
    """The oracle above trusts FrameDecoder for the server's output; make sure it is strict."""
    assert FrameDecoder().feed(HEADER.pack(0, 1, 9, 0)) == []  # an unknown type is skipped, and the
    # oracle (server_frames) accepts responses and data only
    with pytest.raises(AssertionError):  # an oversized frame is reported, and the oracle refuses it
        server_frames(HEADER.pack(MAX_MESSAGE_SIZE + 1, 1, 2, 0) + b"\0" * (MAX_MESSAGE_SIZE + 1))
    decoder = FrameDecoder()
    decoder.feed(HEADER.pack(5, 1, 2, 0) + b"ab")
    with pytest.raises(ProtocolError):
        decoder.eof()
