"""The unary gRPC server on h2, against grpcio's client (what containerd's Go client also speaks) and
raw bytes on the socket."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from h2.settings import SettingCodes

from kuasar.common import grpc_h2
from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2 as pb
from kuasar.common.errors import Code
from kuasar.common.grpc_h2 import (
    CONTROL_DELAY,
    GRPC_PREFIX,
    MAX_REQUEST_BYTES,
    GrpcError,
    GrpcServer,
    Method,
    decode_message,
    encode_message,
)

ECHO = "/test.Echo/Status"
SLOW = "/test.Echo/Slow"
FAIL = "/test.Echo/Fail"
BUG = "/test.Echo/Bug"
SELF_CANCEL = "/test.Echo/SelfCancel"
EARLY = "/test.Echo/Early"  # replies, then goes on (Method.replies_early)
# The same answers from plain functions (Method.answer): made while the request is read, without a task.
ECHO_NOW = "/test.Echo/StatusNow"
FAIL_NOW = "/test.Echo/FailNow"
BUG_NOW = "/test.Echo/BugNow"


class Service:
    def __init__(self) -> None:
        self.slow_cancelled = asyncio.Event()
        self.slow_started = asyncio.Event()
        self.early_entered = asyncio.Event()
        self.early_may_reply = asyncio.Event()
        self.early_may_end = asyncio.Event()
        self.early_sent: list[bool] = []
        self.early_ended = asyncio.Event()

    def methods(self) -> dict[str, Method]:
        handlers = {ECHO: self.echo, SLOW: self.slow, FAIL: self.fail, BUG: self.bug,
                    SELF_CANCEL: self.self_cancel}
        answers = {ECHO_NOW: self.echo_now, FAIL_NOW: self.fail_now, BUG_NOW: self.bug_now}
        return ({path: Method(pb.ControllerStatusRequest, handler) for path, handler in handlers.items()}
                | {path: Method(pb.ControllerStatusRequest, answer=answer) for path, answer in answers.items()}
                | {EARLY: Method(pb.ControllerStatusRequest, self.early, replies_early=True)})

    async def early(self, request: pb.ControllerStatusRequest, reply_now) -> pb.ControllerStatusResponse:
        """Replies once allowed, whatever cancels it meanwhile (as a sandbox's Start that must finish
        its work), then waits and fails: the client must see the early reply only."""
        self.early_entered.set()
        while not self.early_may_reply.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await self.early_may_reply.wait()
        info = {f"k{i}": "v" * 1000 for i in range(300)} if request.verbose else {}
        self.early_sent.append(await reply_now(pb.ControllerStatusResponse(sandbox_id=f"early {request.sandbox_id}",
                                                                           info=info)))
        try:
            await self.early_may_end.wait()
            raise GrpcError(Code.INTERNAL, "after the reply")
        finally:
            self.early_ended.set()

    async def echo(self, request: pb.ControllerStatusRequest) -> pb.ControllerStatusResponse:
        return self.echo_now(request)

    def echo_now(self, request: pb.ControllerStatusRequest) -> pb.ControllerStatusResponse:
        # `verbose` asks for a reply far larger than the client's initial flow-control window (64 KB).
        info = {f"k{i}": "v" * 1000 for i in range(300)} if request.verbose else {}
        return pb.ControllerStatusResponse(sandbox_id=request.sandbox_id, info=info)

    def fail_now(self, request: pb.ControllerStatusRequest) -> pb.ControllerStatusResponse:
        raise GrpcError(Code.NOT_FOUND, "sandbox ünknown: 100%")

    def bug_now(self, request: pb.ControllerStatusRequest) -> pb.ControllerStatusResponse:
        raise RuntimeError("oops")

    async def slow(self, request: pb.ControllerStatusRequest) -> pb.ControllerStatusResponse:
        self.slow_started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.slow_cancelled.set()
            raise
        return pb.ControllerStatusResponse()

    async def fail(self, request: pb.ControllerStatusRequest) -> pb.ControllerStatusResponse:
        raise GrpcError(Code.NOT_FOUND, "sandbox ünknown: 100%")

    async def bug(self, request: pb.ControllerStatusRequest) -> pb.ControllerStatusResponse:
        raise RuntimeError("oops")

    async def self_cancel(self, request: pb.ControllerStatusRequest) -> pb.ControllerStatusResponse:
        raise asyncio.CancelledError  # e.g. something the handler awaited was cancelled


def call(channel: grpc.aio.Channel, path: str, request_serializer=pb.ControllerStatusRequest.SerializeToString):
    return channel.unary_unary(path, request_serializer=request_serializer,
                               response_deserializer=pb.ControllerStatusResponse.FromString)


def serve(tmp_path: Path, body) -> Service:
    service = Service()

    async def main() -> None:
        server = GrpcServer(service.methods())
        sock = tmp_path / "api.sock"
        await server.start(sock)
        try:
            async with grpc.aio.insecure_channel(f"unix://{sock}") as channel, asyncio.timeout(30):
                await body(channel, service, server, sock)
        finally:
            await server.stop(0)

    asyncio.run(main())
    return service


async def code_of(awaitable) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value.code(), info.value.details()


class RawClient:
    """An h2 client driven by hand, for what grpcio's client does not let a test choose."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 settings: dict[int, int] | None = None) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings(settings)
        self.send()

    @classmethod
    async def connect(cls, sock: Path, settings: dict[int, int] | None = None) -> RawClient:
        return cls(*await asyncio.open_unix_connection(str(sock)), settings)

    def send(self) -> None:
        self.writer.write(self.h2.data_to_send())

    def request(self, path: str, message: pb.ControllerStatusRequest) -> int:
        stream = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
                                      (b":authority", b"x"), (b"content-type", b"application/grpc"),
                                      (b"te", b"trailers")])
        self.h2.send_data(stream, encode_message(message), end_stream=True)
        return stream

    async def events_until(self, done, acknowledge: bool = False) -> list[h2.events.Event]:
        seen: list[h2.events.Event] = []
        while not done(seen):
            data = await self.reader.read(65536)
            assert data, "the server closed the connection"
            events = self.h2.receive_data(data)
            if acknowledge:  # hand back window for what arrived, as a reading client does
                for event in events:
                    if isinstance(event, h2.events.DataReceived):
                        self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            seen += events
            self.send()
        return seen


def ended(seen: list[h2.events.Event]) -> bool:
    return any(isinstance(e, h2.events.StreamEnded) for e in seen)


def received_bytes(seen: list[h2.events.Event]) -> int:
    return sum(len(e.data) for e in seen if isinstance(e, h2.events.DataReceived))


@pytest.mark.parametrize("path", [ECHO, ECHO_NOW])
def test_echo_and_a_reply_larger_than_the_flow_control_window(tmp_path: Path, path: str) -> None:
    async def body(channel, service, server, sock):
        reply = await call(channel, path)(pb.ControllerStatusRequest(sandbox_id="abc"))
        assert reply.sandbox_id == "abc"
        big = await call(channel, path)(pb.ControllerStatusRequest(sandbox_id="big", verbose=True))
        assert len(big.info) == 300 and big.info["k299"] == "v" * 1000
        # the connection is still good for the next call
        assert (await call(channel, path)(pb.ControllerStatusRequest(sandbox_id="x"))).sandbox_id == "x"

    serve(tmp_path, body)


def test_errors_carry_their_status_and_message(tmp_path: Path) -> None:
    async def body(channel, service, server, sock):
        assert await code_of(call(channel, FAIL)(pb.ControllerStatusRequest())) == (
            grpc.StatusCode.NOT_FOUND, "sandbox ünknown: 100%")
        assert await code_of(call(channel, FAIL_NOW)(pb.ControllerStatusRequest())) == (
            grpc.StatusCode.NOT_FOUND, "sandbox ünknown: 100%")
        for path in (BUG, BUG_NOW):
            code, details = await code_of(call(channel, path)(pb.ControllerStatusRequest()))
            assert code == grpc.StatusCode.UNKNOWN and "oops" in details and path in details
        code, _ = await code_of(call(channel, SELF_CANCEL)(pb.ControllerStatusRequest(), timeout=10))
        assert code == grpc.StatusCode.CANCELLED
        code, details = await code_of(call(channel, "/test.Echo/Nope")(pb.ControllerStatusRequest()))
        assert code == grpc.StatusCode.UNIMPLEMENTED and "/test.Echo/Nope" in details
        for path in (ECHO, ECHO_NOW):
            code, _ = await code_of(call(channel, path, lambda _: b"\xff\xff\xff")(pb.ControllerStatusRequest()))
            assert code == grpc.StatusCode.INTERNAL  # as grpc-go answers an undecodable request
        too_big = pb.ControllerStatusRequest(sandbox_id="x" * (MAX_REQUEST_BYTES + 1))
        code, _ = await code_of(call(channel, ECHO)(too_big))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await call(channel, ECHO)(pb.ControllerStatusRequest(sandbox_id="ok"))).sandbox_id == "ok"

    serve(tmp_path, body)


def test_a_cancelled_or_expired_call_cancels_its_handler_and_blocks_nothing(tmp_path: Path) -> None:
    async def body(channel, service, server, sock):
        code, _ = await code_of(call(channel, SLOW)(pb.ControllerStatusRequest(), timeout=0.3))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(service.slow_cancelled.wait(), 5)
        service.slow_cancelled.clear()
        pending = call(channel, SLOW)(pb.ControllerStatusRequest())
        await asyncio.wait_for(service.slow_started.wait(), 5)
        assert (await call(channel, ECHO)(pb.ControllerStatusRequest(sandbox_id="y"))).sandbox_id == "y"
        assert (await call(channel, ECHO_NOW)(pb.ControllerStatusRequest(sandbox_id="n"))).sandbox_id == "n"
        pending.cancel()
        await asyncio.wait_for(service.slow_cancelled.wait(), 5)
        assert not any(conn.calls for conn in server.connections)

    serve(tmp_path, body)


def test_stop_cancels_calls_still_running(tmp_path: Path) -> None:
    async def body(channel, service, server, sock):
        pending = asyncio.ensure_future(call(channel, SLOW)(pb.ControllerStatusRequest()))
        await asyncio.wait_for(service.slow_started.wait(), 5)
        await server.stop(0.05)
        assert service.slow_cancelled.is_set()
        code, _ = await code_of(pending)
        assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)

    serve(tmp_path, body)


def test_garbage_on_the_socket_closes_that_connection_only(tmp_path: Path) -> None:
    async def body(channel, service, server, sock):
        loop = asyncio.get_running_loop()
        raw = socket.socket(socket.AF_UNIX)
        raw.setblocking(False)
        await loop.sock_connect(raw, str(sock))
        await loop.sock_sendall(raw, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 64)
        received = b""
        async with asyncio.timeout(5):
            while chunk := await loop.sock_recv(raw, 65536):
                received += chunk
        raw.close()
        assert b"\x07" in received[:200]  # h2 sent GOAWAY (frame type 7) before closing
        assert (await call(channel, ECHO)(pb.ControllerStatusRequest(sandbox_id="z"))).sandbox_id == "z"

    serve(tmp_path, body)


@pytest.mark.parametrize("body, code", [
    (b"", Code.INVALID_ARGUMENT),
    (b"\x00\x00\x00", Code.INVALID_ARGUMENT),
    (GRPC_PREFIX.pack(0, 5) + b"\x0a\x01a", Code.INVALID_ARGUMENT),  # length says 5, 3 follow
    (GRPC_PREFIX.pack(1, 3) + b"\x0a\x01a", Code.UNIMPLEMENTED),  # compressed
    (GRPC_PREFIX.pack(0, 2) + b"\x0a\x05", Code.INTERNAL),  # string field cut short: as grpc-go
])
def test_request_framing_is_checked(body: bytes, code: Code) -> None:
    with pytest.raises(GrpcError) as info:
        decode_message(body, pb.ControllerStatusRequest)
    assert info.value.code == code


def test_a_method_has_a_handler_or_an_answer() -> None:
    service = Service()
    with pytest.raises(ValueError):
        Method(pb.ControllerStatusRequest)
    with pytest.raises(ValueError):
        Method(pb.ControllerStatusRequest, service.echo, answer=service.echo_now)


def test_one_exact_message_decodes() -> None:
    assert decode_message(GRPC_PREFIX.pack(0, 3) + b"\x0a\x01a", pb.ControllerStatusRequest).sandbox_id == "a"


@pytest.mark.parametrize("path", [ECHO, ECHO_NOW])
def test_control_answers_wait_for_the_next_reply_and_follow_it(tmp_path: Path, path: str) -> None:
    """A PING that comes with a request is acked after that request's reply, in the same write; a PING
    alone is still acked (by the timer)."""
    async def body(channel, service, server, sock):
        client = await RawClient.connect(sock)
        client.h2.ping(b"alone...")
        client.send()
        started = time.monotonic()
        await client.events_until(lambda seen: any(isinstance(e, h2.events.PingAckReceived) for e in seen))
        assert time.monotonic() - started >= CONTROL_DELAY * 0.5

        client.h2.ping(b"withcall")
        client.request(path, pb.ControllerStatusRequest(sandbox_id="q"))
        client.send()
        seen = await client.events_until(lambda seen: any(isinstance(e, h2.events.PingAckReceived) for e in seen))
        kinds = [type(e) for e in seen]
        assert kinds.index(h2.events.StreamEnded) < kinds.index(h2.events.PingAckReceived)
        data = b"".join(e.data for e in seen if isinstance(e, h2.events.DataReceived))
        assert pb.ControllerStatusResponse.FromString(data[5:]).sandbox_id == "q"
        client.writer.close()

    serve(tmp_path, body)


@pytest.mark.parametrize("path", [ECHO, ECHO_NOW])
def test_a_reply_waiting_for_window_goes_on_when_settings_open_it(tmp_path: Path, path: str) -> None:
    """Go's gRPC client may grow its stream windows with SETTINGS_INITIAL_WINDOW_SIZE alone (no
    WINDOW_UPDATE); a reply waiting for window must go on then, after our ack of those settings."""
    async def body(channel, service, server, sock):
        client = await RawClient.connect(sock, {SettingCodes.INITIAL_WINDOW_SIZE: 1000})
        client.h2.increment_flow_control_window(1 << 20)  # only the stream's window holds the reply back
        client.request(path, pb.ControllerStatusRequest(sandbox_id="big", verbose=True))
        client.send()
        seen = await client.events_until(lambda seen: received_bytes(seen) >= 1000)
        assert not ended(seen)
        client.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        client.send()
        seen += await client.events_until(ended)  # h2 refuses data beyond a window not yet acked
        assert received_bytes(seen) > 300_000
        client.writer.close()

    serve(tmp_path, body)


def test_a_reply_goes_on_at_once_when_window_comes(tmp_path: Path, monkeypatch) -> None:
    """The rest of a reply is not held back like an answer to a control frame (CONTROL_DELAY)."""
    monkeypatch.setattr(grpc_h2, "CONTROL_DELAY", 3600.0)

    async def body(channel, service, server, sock):
        client = await RawClient.connect(sock)
        client.request(ECHO, pb.ControllerStatusRequest(sandbox_id="big", verbose=True))
        client.send()
        seen = await client.events_until(ended, acknowledge=True)  # serve()'s 30 s bound, not an hour
        assert received_bytes(seen) > 300_000
        client.writer.close()

    serve(tmp_path, body)


def test_a_request_read_with_the_clients_goaway_breaks_nothing(tmp_path: Path) -> None:
    """After GOAWAY h2 refuses to send at all (not only on the stream): the reply is dropped quietly."""
    async def body(channel, service, server, sock):
        failures: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: failures.append(context))
        client = await RawClient.connect(sock)
        client.request(ECHO_NOW, pb.ControllerStatusRequest(sandbox_id="q"))
        client.h2.close_connection()
        client.send()  # one write: the server reads both at once
        await asyncio.sleep(0.2)
        client.writer.close()
        assert failures == []
        assert (await call(channel, ECHO)(pb.ControllerStatusRequest(sandbox_id="next"))).sandbox_id == "next"

    serve(tmp_path, body)


@pytest.mark.parametrize("path", [ECHO, ECHO_NOW, FAIL])
def test_request_timing_records_each_answered_call(tmp_path: Path, monkeypatch, path: str) -> None:
    from kuasar.common import grpc_h2
    from kuasar.common.request_timing import RequestTiming

    (tmp_path / "timing").mkdir()
    monkeypatch.setattr(grpc_h2, "TIMING", RequestTiming(str(tmp_path / "timing")))

    async def body(channel, service, server, sock):
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call(channel, path)(pb.ControllerStatusRequest(sandbox_id="abc"))

    serve(tmp_path, body)
    rows = [line.split("\t") for f in (tmp_path / "timing").iterdir() for line in f.read_text().splitlines()]
    assert [row[:2] for row in rows] == [["sandbox", path.rpartition("/")[2]]]
    assert int(rows[0][2]) <= int(rows[0][3])


def test_an_early_reply_reaches_the_client_while_its_handler_goes_on(tmp_path: Path) -> None:
    async def body(channel, service, server, sock):
        service.early_may_reply.set()
        reply = await call(channel, EARLY)(pb.ControllerStatusRequest(sandbox_id="a"))
        assert reply.sandbox_id == "early a" and service.early_sent == [True]
        assert not service.early_ended.is_set()  # the reply did not wait for the handler
        service.early_may_end.set()
        await asyncio.wait_for(service.early_ended.wait(), 5)
        await asyncio.sleep(0.05)  # its error, had it been sent, would be on the wire by now
        assert (await call(channel, ECHO)(pb.ControllerStatusRequest(sandbox_id="b"))).sandbox_id == "b"
        assert not any(conn.calls for conn in server.connections)

    serve(tmp_path, body)


def test_an_early_reply_after_the_client_is_gone_says_so(tmp_path: Path) -> None:
    # What a Start's reply meets when containerd's connection drops while the pod starts: the sandbox
    # must then go, since containerd takes its Start for failed.
    async def body(channel, service, server, sock):
        client = await RawClient.connect(sock)
        client.request(EARLY, pb.ControllerStatusRequest(sandbox_id="gone"))
        client.send()
        await asyncio.wait_for(service.early_entered.wait(), 5)
        client.writer.close()
        await client.writer.wait_closed()
        for _ in range(100):  # the server has seen the connection end
            if not server.connections:
                break
            await asyncio.sleep(0.01)
        service.early_may_reply.set()
        service.early_may_end.set()
        await asyncio.wait_for(service.early_ended.wait(), 5)
        assert service.early_sent == [False]

    serve(tmp_path, body)


def test_an_early_reply_waiting_for_window_is_awaited_not_reported_lost(tmp_path: Path) -> None:
    # A reply larger than what is left of the client's window was reported undelivered at once (the
    # Start's sandbox was removed) and then reached the client all the same, as a success.
    async def body(channel, service, server, sock):
        client = await RawClient.connect(sock, {SettingCodes.INITIAL_WINDOW_SIZE: 1000})
        service.early_may_reply.set()
        client.request(EARLY, pb.ControllerStatusRequest(sandbox_id="w", verbose=True))
        client.send()
        seen = await client.events_until(lambda seen: received_bytes(seen) >= 1000)
        await asyncio.sleep(0.05)
        assert service.early_sent == [] and not ended(seen)  # waiting for the client, not given up
        client.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        client.h2.increment_flow_control_window(1 << 20)
        client.send()
        seen += await client.events_until(ended, acknowledge=True)
        assert received_bytes(seen) > 300_000
        for _ in range(100):
            if service.early_sent:
                break
            await asyncio.sleep(0.01)
        assert service.early_sent == [True]
        service.early_may_end.set()
        client.writer.close()

    serve(tmp_path, body)


def test_an_early_reply_the_client_takes_none_of_is_reset_and_reported_lost(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(grpc_h2, "BLOCKED_REPLY_WAIT", 0.2)

    async def body(channel, service, server, sock):
        client = await RawClient.connect(sock, {SettingCodes.INITIAL_WINDOW_SIZE: 1000})
        service.early_may_reply.set()
        client.request(EARLY, pb.ControllerStatusRequest(sandbox_id="stuck", verbose=True))
        client.send()
        seen = await client.events_until(lambda seen: any(isinstance(e, h2.events.StreamReset) for e in seen))
        assert not ended(seen) and service.early_sent == [False]  # the client never reads a success
        service.early_may_end.set()
        client.writer.close()

    serve(tmp_path, body)


@pytest.mark.parametrize("path", [ECHO, ECHO_NOW])
def test_a_first_reply_larger_than_16_kib_reaches_a_new_grpcio_channel(tmp_path: Path, path: str) -> None:
    # grpcio keeps to a 16 KiB frame limit until its larger MAX_FRAME_SIZE is acked; our SETTINGS ack
    # left after the first reply's frames, so that reply broke the connection, on every new channel.
    async def body(channel, service, server, sock):
        for _ in range(2):
            async with grpc.aio.insecure_channel(f"unix://{sock}") as fresh:
                big = await call(fresh, path)(pb.ControllerStatusRequest(sandbox_id="big", verbose=True))
                assert len(big.info) == 300

    serve(tmp_path, body)


def test_calls_wait_until_the_server_is_ready_but_an_unknown_method_is_refused_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        ready = asyncio.Event()
        server = GrpcServer(Service().methods(), ready)
        sock = tmp_path / "api.sock"
        await server.start(sock)
        try:
            async with grpc.aio.insecure_channel(f"unix://{sock}") as channel, asyncio.timeout(30):
                held = [asyncio.ensure_future(call(channel, path)(pb.ControllerStatusRequest(sandbox_id=path)))
                        for path in (ECHO, ECHO_NOW)]
                code, _ = await code_of(call(channel, "/test.Echo/Nope")(pb.ControllerStatusRequest()))
                assert code == grpc.StatusCode.UNIMPLEMENTED
                done, _ = await asyncio.wait(held, timeout=0.3)
                assert not done
                ready.set()
                assert [(await reply).sandbox_id for reply in held] == [ECHO, ECHO_NOW]
                # once ready, an answer is made as the request is read again
                assert (await call(channel, ECHO_NOW)(pb.ControllerStatusRequest(sandbox_id="n"))).sandbox_id == "n"
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_settings_frames_are_taken_apart_from_other_control_frames() -> None:
    settings_ack = bytes.fromhex("000000" "04" "01" "00000000")
    ping_ack = bytes.fromhex("000008" "06" "01" "00000000") + b"withcall"
    window_update = bytes.fromhex("000004" "08" "00" "00000000" "00010000")
    settings = bytes.fromhex("000006" "04" "00" "00000000" "0004" "00100000")
    apart = grpc_h2._settings_frames_apart(ping_ack + settings_ack + window_update + settings)
    assert apart == (settings_ack + settings, ping_ack + window_update)
    assert grpc_h2._settings_frames_apart(b"") == (b"", b"")
