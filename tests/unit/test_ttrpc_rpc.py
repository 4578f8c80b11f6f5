"""ttrpc server and client end to end over real unix sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from kuasar.common.api.ttrpc import request_pb2
from kuasar.common.errors import (
    Code,
    DeadlineExceeded,
    Internal,
    KuasarError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from kuasar.common.ttrpc import (
    MAX_MESSAGE_SIZE,
    NAMESPACE_KEY,
    STREAM_RECV_BUFFER,
    ClientStream,
    Context,
    Flag,
    Frame,
    FrameDecoder,
    FrameType,
    ServerStream,
    TtrpcClient,
    TtrpcServer,
    encode_frame,
)
from kuasar.common.ttrpc import inbox as inbox_module
from tests.support.aio import run_bounded as run

SVC = "test.v1.Echo"
KV = request_pb2.KeyValue
END_OF_STREAM = b"\x00\x00\x00\x00" b"\x00\x00\x00\x01" b"\x03\x05"




@pytest.fixture
def sock_path() -> Iterator[str]:
    # pytest's tmp_path can exceed the 108-byte sun_path limit; keep it short.
    directory = tempfile.mkdtemp(prefix="ttrpc", dir="/tmp")
    yield os.path.join(directory, "s.sock")
    shutil.rmtree(directory, ignore_errors=True)


class Probe:
    """Handlers the tests register, recording what happened to them."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.contexts: list[Context] = []
        self.closed_connections: list[int] = []

    async def echo(self, req: KV, ctx: Context) -> KV:
        self.contexts.append(ctx)
        return KV(key=req.key, value=req.value.upper())

    async def fail(self, req: KV, ctx: Context) -> KV:
        if req.key == "notfound":
            raise NotFound(f"sandbox {req.value} not found")
        raise RuntimeError("boom")

    async def hang(self, req: KV, ctx: Context) -> KV:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        raise AssertionError("unreachable")

    async def sleep(self, req: KV, ctx: Context) -> KV:
        await asyncio.sleep(float(req.value))
        return req

    async def huge(self, req: KV, ctx: Context) -> KV:
        return KV(value="x" * MAX_MESSAGE_SIZE)

    async def echo_stream(self, stream: ServerStream, ctx: Context) -> None:
        while (msg := await stream.recv()) is not None:
            await stream.send(b"echo:" + msg)

    async def push_first(self, stream: ServerStream, ctx: Context) -> None:
        for i in range(3):  # send before reading anything
            await stream.send(b"push%d" % i)
        received = []
        while (msg := await stream.recv()) is not None:
            received.append(msg)
        await stream.send(b"got:" + b",".join(received))

    async def stream_fails(self, stream: ServerStream, ctx: Context) -> None:
        await stream.send(b"partial")
        raise NotFound("stream target gone")


def make_server(probe: Probe) -> TtrpcServer:
    server = TtrpcServer(on_connection_closed=probe.closed_connections.append)
    server.add_unary(SVC, "Echo", KV, probe.echo)
    server.add_unary(SVC, "Fail", KV, probe.fail)
    server.add_unary(SVC, "Hang", KV, probe.hang)
    server.add_unary(SVC, "Sleep", KV, probe.sleep)
    server.add_unary(SVC, "Huge", KV, probe.huge)
    server.add_stream(SVC, "EchoStream", probe.echo_stream)
    server.add_stream(SVC, "PushFirst", probe.push_first)
    server.add_stream(SVC, "StreamFails", probe.stream_fails)
    return server


@contextlib.asynccontextmanager
async def serving(path: str) -> AsyncIterator[tuple[TtrpcServer, Probe]]:
    probe = Probe()
    server = make_server(probe)
    await server.start_unix(path)
    try:
        yield server, probe
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def client_of(path: str) -> AsyncIterator[TtrpcClient]:
    client = await TtrpcClient.connect_unix(path)
    try:
        yield client
    finally:
        await client.close()


class RawPeer:
    """A hand-driven client for checking exact bytes and protocol violations."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()
        self.raw = b""

    @classmethod
    async def connect(cls, path: str) -> RawPeer:
        return cls(*await asyncio.open_unix_connection(path))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, stream_id: int, method: str, payload: bytes = b"", flags: int = 0,
                      timeout_nano: int = 0) -> None:
        req = request_pb2.Request(service=SVC, method=method, payload=payload, timeout_nano=timeout_nano)
        frame = Frame(stream_id, FrameType.REQUEST, Flag(flags), req.SerializeToString())
        await self.send(encode_frame(frame))

    async def frames(self, count: int) -> list[Frame]:
        out: list[Frame] = []
        while len(out) < count:
            data = await self.reader.read(65536)
            assert data, f"EOF after {len(out)} of {count} frames"
            self.raw += data
            out += self.decoder.feed(data)
        return out

    async def at_eof(self) -> bool:
        return await self.reader.read(65536) == b""

    def close(self) -> None:
        self.writer.close()


def status_of(frame: Frame) -> tuple[int, str]:
    assert frame.type is FrameType.RESPONSE
    status = request_pb2.Response.FromString(frame.payload).status
    return status.code, status.message


async def until(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


# --- unary calls -----------------------------------------------------------------------------

def test_unary_call_round_trip_with_metadata_and_deadline(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path) as (_, probe), client_of(sock_path) as client:
            reply = await client.call(SVC, "Echo", KV(key="k", value="hi"), KV, timeout=30,
                                      metadata={NAMESPACE_KEY: "k8s.io", "X-Trace": "abc"})
            assert reply == KV(key="k", value="HI")
            ctx = probe.contexts[0]
            assert (ctx.service, ctx.method, ctx.namespace) == (SVC, "Echo", "k8s.io")
            assert ctx.metadata["x-trace"] == ["abc"]  # keys are lowercased
            assert ctx.timeout is not None and 29 < ctx.timeout <= 30
            assert ctx.deadline is not None
            raw = await client.call(SVC, "Echo", KV(value="b").SerializeToString())
            assert KV.FromString(raw).value == "B"
            assert probe.contexts[1].timeout is None and probe.contexts[1].namespace is None
    run(main())


def test_an_open_stream_cancelled_while_its_request_drains_is_half_closed_and_forgotten() -> None:
    # It stayed registered on both ends: the server's handler waited for messages that never came, and
    # what the server sent on it filled an inbox nobody read.
    async def main() -> None:
        ours, peer = socket.socketpair()
        client = TtrpcClient.from_streams(*await asyncio.open_connection(sock=ours))
        peer.settimeout(5)

        async def slow_reader() -> None:
            await asyncio.sleep(3600)

        client._drain = slow_reader  # type: ignore[method-assign]
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.open_stream(SVC, "Stream"), 0.05)
            assert client._streams == {} and client._proto.active_streams == 0
            request, half_close = FrameDecoder().feed(peer.recv(65536))
            assert request.type is FrameType.REQUEST and request.flags == Flag.REMOTE_OPEN
            assert (half_close.stream_id, half_close.type) == (request.stream_id, FrameType.DATA)
            assert half_close.flags == Flag.REMOTE_CLOSED | Flag.NO_DATA
        finally:
            await client.close()
            peer.close()
    run(main())


def test_begin_call_writes_the_request_before_returning_and_its_coroutine_gets_the_reply() -> None:
    async def main() -> None:
        ours, peer = socket.socketpair()
        client = TtrpcClient.from_streams(*await asyncio.open_connection(sock=ours))
        peer.settimeout(5)
        decoder = FrameDecoder()
        try:
            replies = []
            for value in ("a", "b"):
                pending = client.begin_call(SVC, "Echo", KV(value=value), KV, timeout=30)
                # No await since begin_call: the request must already be on the socket.
                (frame,) = decoder.feed(peer.recv(65536))
                req = request_pb2.Request.FromString(frame.payload)
                assert (frame.type, req.service, req.method) == (FrameType.REQUEST, SVC, "Echo")
                assert KV.FromString(req.payload).value == value and req.timeout_nano > 0
                reply = request_pb2.Response(payload=KV(value=value.upper()).SerializeToString())
                peer.sendall(encode_frame(Frame(frame.stream_id, FrameType.RESPONSE, Flag(0),
                                                reply.SerializeToString())))
                replies.append(await pending)
            assert [r.value for r in replies] == ["A", "B"]
            pending = client.begin_call(SVC, "Fail", KV(), KV)
            (frame,) = decoder.feed(peer.recv(65536))
            failed = request_pb2.Response(status={"code": int(Code.NOT_FOUND), "message": "gone"})
            peer.sendall(encode_frame(Frame(frame.stream_id, FrameType.RESPONSE, Flag(0),
                                            failed.SerializeToString())))
            with pytest.raises(NotFound, match="gone"):
                await pending
        finally:
            await client.close()
            peer.close()
    run(main())


def test_handler_error_status_maps_to_typed_error_and_back(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path), client_of(sock_path) as client:
            with pytest.raises(NotFound, match="sandbox sb1 not found") as info:
                await client.call(SVC, "Fail", KV(key="notfound", value="sb1"), KV)
            assert info.value.code == Code.NOT_FOUND == 5
            with pytest.raises(KuasarError, match="boom") as info2:
                await client.call(SVC, "Fail", KV(key="other"), KV)
            assert info2.value.code == Code.UNKNOWN
            peer = await RawPeer.connect(sock_path)
            await peer.request(1, "Fail", KV(key="notfound", value="sb2").SerializeToString())
            (frame,) = await peer.frames(1)
            assert (frame.stream_id, frame.flags) == (1, Flag(0))
            assert status_of(frame) == (5, "sandbox sb2 not found")
            peer.close()
    run(main())


def test_unknown_service_and_method_are_unimplemented(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path), client_of(sock_path) as client:
            with pytest.raises(Unimplemented, match="^service no.such.Svc$"):
                await client.call("no.such.Svc", "Echo", b"")
            with pytest.raises(Unimplemented, match="^method Nope$"):
                await client.call(SVC, "Nope", b"")
    run(main())


def test_undecodable_request_message_is_internal_and_connection_survives(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path), client_of(sock_path) as client:
            with pytest.raises(Internal, match="error unmarshalling payload"):  # Go's ttrpc's code
                await client.call(SVC, "Echo", b"\xff\xff\xff")
            assert (await client.call(SVC, "Echo", KV(value="ok"), KV)).value == "OK"
    run(main())


def test_server_deadline_answers_deadline_exceeded_and_cancels_handler(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path) as (_, probe):
            peer = await RawPeer.connect(sock_path)
            await peer.request(1, "Hang", timeout_nano=50_000_000)
            (frame,) = await peer.frames(1)
            assert status_of(frame)[0] == Code.DEADLINE_EXCEEDED
            assert probe.cancelled.is_set()
            peer.close()
    run(main())


def test_client_timeout_raises_deadline_exceeded(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path) as (server, _), client_of(sock_path) as client:
            with pytest.raises(DeadlineExceeded):
                await client.call(SVC, "Hang", KV(), KV, timeout=0.05)
            await until(lambda: server.active_handlers == 0)  # the server gave up too
            assert (await client.call(SVC, "Echo", KV(value="x"), KV)).value == "X"
    run(main())


def test_fifty_concurrent_calls_are_answered_out_of_order(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path) as (server, _), client_of(sock_path) as client:
            finished: list[int] = []

            async def one(i: int) -> None:
                # Earlier calls sleep longer, so answers come back in reverse.
                reply = await client.call(SVC, "Sleep", KV(key=str(i), value=str((50 - i) * 0.004)), KV)
                assert reply.key == str(i)
                finished.append(i)

            await asyncio.gather(*(one(i) for i in range(50)))
            assert sorted(finished) == list(range(50))
            assert finished != sorted(finished)
            assert server.active_connections == 1
    run(main())


def test_oversized_reply_becomes_resource_exhausted(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path), client_of(sock_path) as client:
            with pytest.raises(ResourceExhausted):
                await client.call(SVC, "Huge", KV(), KV)
            with pytest.raises(ResourceExhausted):  # and the client refuses to send one
                await client.call(SVC, "Echo", b"\0" * (MAX_MESSAGE_SIZE + 1))
            assert (await client.call(SVC, "Echo", KV(value="x"), KV)).value == "X"
    run(main())


# --- connection lifetime ---------------------------------------------------------------------

def test_client_disconnect_cancels_in_flight_handler(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path) as (server, probe):
            client = await TtrpcClient.connect_unix(sock_path)
            call = asyncio.create_task(client.call(SVC, "Hang", KV(), KV))
            await probe.started.wait()
            assert server.active_handlers == 1
            await client.close()
            with pytest.raises(Unavailable):
                await call
            await probe.cancelled.wait()
            await until(lambda: probe.closed_connections == [1])
            assert server.active_handlers == 0 and server.active_connections == 0
    run(main())


def test_pending_calls_fail_unavailable_when_server_closes(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path) as (server, probe), client_of(sock_path) as client:
            call = asyncio.create_task(client.call(SVC, "Hang", KV(), KV))
            await probe.started.wait()
            await server.close()
            with pytest.raises(Unavailable):
                await call
            assert probe.cancelled.is_set()
            with pytest.raises(Unavailable):
                await client.call(SVC, "Echo", KV(), KV)
            with pytest.raises(Unavailable):
                await TtrpcClient.connect_unix(sock_path)
    run(main())


def test_garbage_bytes_are_refused_and_the_server_keeps_serving(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path) as (server, probe):
            peer = await RawPeer.connect(sock_path)
            # An empty frame of type 0xff (skipped), then noise whose first bytes read as a 4 GiB length.
            await peer.send(b"\x00" * 4 + b"\xff" * 60)
            (frame,) = await peer.frames(1)  # the status goes back on the id the header named
            assert frame.stream_id == 0xFFFFFFFF
            assert status_of(frame)[0] == Code.RESOURCE_EXHAUSTED
            peer.writer.write_eof()  # in the middle of that frame: the connection is over
            assert await peer.at_eof()
            peer.close()
            async with client_of(sock_path) as client:
                assert (await client.call(SVC, "Echo", KV(value="ok"), KV)).value == "OK"
            await until(lambda: len(probe.closed_connections) == 2)
            assert server.active_connections == 0
    run(main())


def test_oversized_request_is_refused_on_its_stream_and_the_connection_serves_on(sock_path: str) -> None:
    """As Go's ttrpc: the payload is skipped, RESOURCE_EXHAUSTED goes back on that stream, and the other
    calls on the connection (containerd's one connection to a task server) are not touched."""
    async def main() -> None:
        async with serving(sock_path) as (server, _):
            peer = await RawPeer.connect(sock_path)
            await peer.request(1, "Sleep", KV(value="0.3").SerializeToString())
            length = MAX_MESSAGE_SIZE + 1
            await peer.send(length.to_bytes(4, "big") + b"\x00\x00\x00\x03\x01\x00")
            (refused,) = await peer.frames(1)  # at the header: no need to wait for the payload
            assert refused.stream_id == 3
            assert status_of(refused) == (Code.RESOURCE_EXHAUSTED,
                                          f"message length {length} exceed maximum message size of 4194304")
            await peer.send(b"\x00" * length)
            await peer.request(5, "Echo", KV(value="after").SerializeToString())
            replies = {frame.stream_id: frame for frame in await peer.frames(2)}
            assert status_of(replies[1])[0] == Code.OK  # the call in flight was answered
            assert KV.FromString(request_pb2.Response.FromString(replies[5].payload).payload).value == "AFTER"
            assert server.active_connections == 1
            peer.close()
    run(main())


def test_oversized_data_on_a_stream_ends_that_stream_and_cancels_its_handler(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path) as (server, _):
            peer = await RawPeer.connect(sock_path)
            await peer.request(1, "EchoStream", flags=int(Flag.REMOTE_OPEN))
            await until(lambda: server.active_handlers == 1)
            length = MAX_MESSAGE_SIZE + 1
            await peer.send(length.to_bytes(4, "big") + b"\x00\x00\x00\x01\x03\x00" + b"\x00" * length)
            (refused,) = await peer.frames(1)
            assert refused.stream_id == 1 and status_of(refused)[0] == Code.RESOURCE_EXHAUSTED
            await until(lambda: server.active_handlers == 0)
            await peer.request(3, "Echo", KV(value="x").SerializeToString())
            (answer,) = await peer.frames(1)
            assert answer.stream_id == 3 and status_of(answer)[0] == Code.OK
            peer.close()
    run(main())


def test_client_fails_only_the_call_whose_reply_is_oversized(sock_path: str) -> None:
    async def fake_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder, seen = FrameDecoder(), []
        while len(seen) < 2:
            seen += decoder.feed(await reader.read(65536))
        length = MAX_MESSAGE_SIZE + 1
        writer.write(length.to_bytes(4, "big") + b"\x00\x00\x00\x01\x02\x00" + b"\x00" * length)
        fine = request_pb2.Response(payload=KV(value="fine").SerializeToString()).SerializeToString()
        writer.write(encode_frame(Frame(3, FrameType.RESPONSE, Flag(0), fine)))
        await writer.drain()
        await reader.read()  # until the client hangs up

    async def main() -> None:
        server = await asyncio.start_unix_server(fake_server, sock_path)
        try:
            async with client_of(sock_path) as client:
                first = asyncio.ensure_future(client.call(SVC, "A", KV(), KV, timeout=5))
                second = asyncio.ensure_future(client.call(SVC, "B", KV(), KV, timeout=5))
                with pytest.raises(ResourceExhausted, match="exceed maximum message size"):
                    await first
                assert (await second).value == "fine"
        finally:
            server.close()
    run(main())


def test_a_deadline_already_past_runs_nothing(sock_path: str) -> None:
    """Go's client sends the time left, negative once its caller gave up; only 0 means no deadline."""
    async def main() -> None:
        async with serving(sock_path) as (_, probe):
            peer = await RawPeer.connect(sock_path)
            await peer.request(1, "Echo", KV(value="late").SerializeToString(), timeout_nano=-1_000_000)
            (frame,) = await peer.frames(1)
            assert status_of(frame)[0] == Code.DEADLINE_EXCEEDED
            assert probe.contexts == []  # the handler never ran
            peer.close()
    run(main())


@pytest.mark.parametrize(("wire", "refused_on"), [
    (b"\x00\x00\x00\x00\x00\x00\x00\x02\x01\x00", 2),   # even stream id
    (b"\x00\x00\x00\x00\x00\x00\x00\x09\x03\x00", 9),   # data, no such stream (never opened)
    (b"\x00\x00\x00\x03\x00\x00\x00\x09\x01\x00\xff\xff\xff", 9),  # bad Request
    (b"\x00\x00\x00\x02\x00\x00\x00\x01\x07\x00ab", None),   # unknown type: skipped
])
def test_a_frame_against_the_rules_is_answered_on_its_stream_while_other_calls_go_on(
        sock_path: str, wire: bytes, refused_on: int | None) -> None:
    # As Go's ttrpc server. It closed the connection: the call running beside it (containerd keeps one
    # connection to a task server for all its calls) went unanswered.
    async def main() -> None:
        async with serving(sock_path):
            peer = await RawPeer.connect(sock_path)
            await peer.request(5, "Sleep", KV(value="0.2").SerializeToString())
            await peer.send(wire)
            await peer.request(11, "Echo", KV(value="after").SerializeToString())
            frames = await peer.frames(3 if refused_on else 2)
            statuses = {frame.stream_id: status_of(frame) for frame in frames}
            if refused_on is not None:
                assert statuses[refused_on][0] == Code.INVALID_ARGUMENT
            assert statuses[5][0] == statuses[11][0] == Code.OK
            peer.close()
    run(main())


def test_a_reused_stream_id_is_refused_and_the_connection_serves_on(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path):
            peer = await RawPeer.connect(sock_path)
            await peer.request(3, "Echo", KV(value="a").SerializeToString())
            (first,) = await peer.frames(1)
            assert first.stream_id == 3
            await peer.request(1, "Echo")
            (second,) = await peer.frames(1)
            assert second.stream_id == 1
            assert status_of(second) == (Code.INVALID_ARGUMENT,
                                         "StreamID cannot be re-used and must increment")
            await peer.request(5, "Echo", KV(value="b").SerializeToString())
            (third,) = await peer.frames(1)
            assert third.stream_id == 5 and status_of(third)[0] == Code.OK
            peer.close()
    run(main())


def test_truncated_frame_then_eof_closes_without_hanging(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path) as (server, probe):
            peer = await RawPeer.connect(sock_path)
            await peer.send(b"\x00\x00\x00\x10\x00\x00\x00\x01\x01\x00abc")
            peer.writer.write_eof()
            await until(lambda: probe.closed_connections == [1])
            assert server.active_connections == 0
            peer.close()
    run(main())


# --- streams ---------------------------------------------------------------------------------

def test_bidi_stream_wire_bytes_end_with_data_flags_0x05(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path) as (server, _):
            peer = await RawPeer.connect(sock_path)
            await peer.request(1, "EchoStream", flags=Flag.REMOTE_OPEN)
            for msg in (b"a", b"bb", b"ccc"):
                await peer.send(encode_frame(Frame(1, FrameType.DATA, Flag(0), msg)))
            await peer.send(b"\x00\x00\x00\x00\x00\x00\x00\x01\x03\x05")  # client half-close
            frames = await peer.frames(4)
            assert [(f.type, f.flags, f.payload) for f in frames[:3]] == [
                (FrameType.DATA, Flag(0), b"echo:a"),
                (FrameType.DATA, Flag(0), b"echo:bb"),
                (FrameType.DATA, Flag(0), b"echo:ccc")]
            assert peer.raw.endswith(END_OF_STREAM)  # not a Response: containerd needs exactly this
            assert peer.raw[:10] == b"\x00\x00\x00\x06\x00\x00\x00\x01\x03\x00"
            await until(lambda: server.active_handlers == 0)
            assert server.active_connections == 1  # a finished stream leaves the connection open
            peer.close()
    run(main())


def test_bidi_stream_with_client(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path), client_of(sock_path) as client:
            stream = await client.open_stream(SVC, "EchoStream")
            for msg in (b"1", b"", b"3"):
                await stream.send(msg)
            await stream.close_send()
            assert [await stream.recv() for _ in range(4)] == [b"echo:1", b"echo:", b"echo:3", None]
            assert await stream.recv() is None
            # Unary calls still work alongside, on the next stream id.
            assert (await client.call(SVC, "Echo", KV(value="z"), KV)).value == "Z"
    run(main())


def test_a_stream_that_ends_its_connection_closes_it_once_nothing_else_runs_there(sock_path: str) -> None:
    # containerd before 2.3 dials a connection per streaming-IO stream and never closes it: each exec
    # probe left two, until the guest agent ran out of file descriptors.
    async def main() -> None:
        async with serving(sock_path) as (server, probe):
            server.add_stream(SVC, "Once", probe.echo_stream, ends_connection=True)

            async def ends_first(stream: ServerStream, ctx: Context) -> None:
                await stream.send(b"last")

            server.add_stream(SVC, "EndsFirst", ends_first, ends_connection=True)
            async with client_of(sock_path) as kept:  # an ordinary stream leaves its connection open
                stream = await kept.open_stream(SVC, "EchoStream")
                await stream.close_send()
                assert await stream.recv() is None
                async with client_of(sock_path) as client:
                    stream = await client.open_stream(SVC, "Once")
                    await stream.send(b"1")
                    assert await stream.recv() == b"echo:1"
                    busy = asyncio.ensure_future(client.call(SVC, "Sleep", KV(value="0.3"), KV))
                    await asyncio.sleep(0.05)
                    await stream.close_send()
                    assert await stream.recv() is None
                    await busy  # another call ran there: the connection stayed for it, and goes with it
                    await until(lambda: client.closed)
                    assert server.active_connections == 1  # only `kept`'s
                # Ended by the server first: the client may still be reading it (containerd sends window
                # updates while it reads, and stops reading if one fails), so only its half-close, which Go's
                # client sends even after the server's end (containerd's cio.Close), lets the connection go.
                peer = await RawPeer.connect(sock_path)
                await peer.request(1, "EndsFirst", flags=Flag.REMOTE_OPEN)
                await peer.frames(2)  # "last", then the end of the stream
                assert peer.raw.endswith(END_OF_STREAM)
                await peer.send(encode_frame(Frame(1, FrameType.DATA, Flag(0), b"window update")))
                await asyncio.sleep(0.1)
                assert server.active_connections == 2  # still open (and `kept`'s)
                await peer.send(b"\x00\x00\x00\x00\x00\x00\x00\x01\x03\x05")  # the half-close
                assert await asyncio.wait_for(peer.at_eof(), 5)
                peer.close()
                assert (await kept.call(SVC, "Echo", KV(value="x"), KV)).value == "X"

    run(main())


def test_request_payload_is_the_first_stream_message(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path), client_of(sock_path) as client:
            stream = await client.open_stream(SVC, "EchoStream", payload=b"init")
            await stream.close_send()
            assert await stream.recv() == b"echo:init"
            assert await stream.recv() is None
    run(main())


def test_server_streaming_sends_before_receiving(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path), client_of(sock_path) as client:
            stream: ClientStream = await client.open_stream(SVC, "PushFirst", payload=b"req",
                                                            client_streaming=False)
            got = []
            while (msg := await stream.recv()) is not None:
                got.append(msg)
            assert got == [b"push0", b"push1", b"push2", b"got:req"]
            with pytest.raises(KuasarError):
                await stream.send(b"not allowed")
    run(main())


def test_bidi_stream_server_sends_first_over_raw_socket(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path):
            peer = await RawPeer.connect(sock_path)
            await peer.request(1, "PushFirst", flags=Flag.REMOTE_OPEN)
            pushed = await peer.frames(3)  # arrive before the client sent anything
            assert [f.payload for f in pushed] == [b"push0", b"push1", b"push2"]
            await peer.send(encode_frame(Frame(1, FrameType.DATA, Flag(0), b"x")))
            await peer.send(END_OF_STREAM)
            last, end = await peer.frames(2)
            assert last.payload == b"got:x"
            assert encode_frame(end) == END_OF_STREAM
            peer.close()
    run(main())


def test_stream_handler_error_ends_stream_with_response_status(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path), client_of(sock_path) as client:
            stream = await client.open_stream(SVC, "StreamFails")
            assert await stream.recv() == b"partial"
            with pytest.raises(NotFound, match="stream target gone"):
                await stream.recv()
    run(main())


def test_open_streams_fail_unavailable_when_connection_drops(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path) as (server, _), client_of(sock_path) as client:
            stream = await client.open_stream(SVC, "EchoStream")
            await stream.send(b"x")
            assert await stream.recv() == b"echo:x"
            await server.close()
            with pytest.raises(Unavailable):
                await stream.recv()
    run(main())


def test_stream_that_never_reads_fails_alone_without_stalling_the_connection(
        sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inbox_module, "STREAM_FULL_TIMEOUT", 0.05)
    release = asyncio.Event()  # binds to a loop only when first awaited

    async def lazy(stream: ServerStream, ctx: Context) -> None:
        await release.wait()
        while await stream.recv() is not None:  # raises once the buffer has overflowed
            pass

    async def main() -> None:
        async with serving(sock_path) as (server, _), client_of(sock_path) as client:
            server.add_stream(SVC, "Lazy", lazy)
            stream = await client.open_stream(SVC, "Lazy")
            for i in range(STREAM_RECV_BUFFER + 2):
                await stream.send(b"%d" % i)
            # The connection reader gave up on that stream after the timeout; others still work.
            assert (await client.call(SVC, "Echo", KV(value="x"), KV)).value == "X"
            release.set()
            with pytest.raises(ResourceExhausted, match="buffer full"):
                await stream.recv()
    run(main())


# --- listeners -------------------------------------------------------------------------------

def test_unix_socket_is_mode_0600_and_stale_socket_is_replaced(sock_path: str) -> None:
    async def main() -> None:
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(sock_path)  # left behind by a crashed process: nobody listens
        stale.close()
        async with serving(sock_path), client_of(sock_path) as client:
            mode = os.stat(sock_path).st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
            assert (await client.call(SVC, "Echo", KV(value="x"), KV)).value == "X"
    run(main())


def test_start_unix_refuses_to_remove_a_regular_file(sock_path: str) -> None:
    with open(sock_path, "w") as f:
        f.write("precious")

    async def main() -> None:
        server = TtrpcServer()
        with pytest.raises(KuasarError, match="not a socket"):
            await server.start_unix(sock_path)
        await server.close()
    run(main())
    with open(sock_path) as f:
        assert f.read() == "precious"


def test_several_listeners_including_an_already_bound_socket(sock_path: str) -> None:
    async def main() -> None:
        other = sock_path + "2"
        inherited = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        inherited.bind(other)
        async with serving(sock_path) as (server, _):
            await server.add_listener(inherited)
            async with client_of(sock_path) as a, client_of(other) as b:
                assert (await a.call(SVC, "Echo", KV(value="a"), KV)).value == "A"
                assert (await b.call(SVC, "Echo", KV(value="b"), KV)).value == "B"
                assert server.active_connections == 2
    run(main())


def test_serve_connection_works_on_any_stream_pair() -> None:
    async def main() -> None:
        probe = Probe()
        server = make_server(probe)
        left, right = socket.socketpair()
        serving_task = asyncio.create_task(server.serve_connection(*await asyncio.open_connection(sock=left)))
        client = TtrpcClient.from_streams(*await asyncio.open_connection(sock=right))
        assert (await client.call(SVC, "Echo", KV(value="p"), KV)).value == "P"
        await client.close()
        await serving_task
        assert probe.closed_connections == [1]
    run(main())


def test_request_timing_records_each_answered_request(sock_path: str, tmp_path, monkeypatch) -> None:
    from kuasar.common.request_timing import RequestTiming
    from kuasar.common.ttrpc import server as server_module

    monkeypatch.setattr(server_module, "TIMING", RequestTiming(str(tmp_path)))

    async def main() -> None:
        async with serving(sock_path) as _, client_of(sock_path) as client:
            await client.call(SVC, "Echo", KV(value="a"), KV)
            with pytest.raises(NotFound):
                await client.call(SVC, "Fail", KV(key="notfound", value="a"), KV)
    run(main())
    rows = [line.split("\t") for line in (tmp_path / f"{os.getpid()}.tsv").read_text().splitlines()]
    assert [row[:2] for row in rows] == [["ttrpc", "Echo/Echo"], ["ttrpc", "Echo/Fail"]]
