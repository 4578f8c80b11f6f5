"""grpc_h2_client: one gRPC call, its protocol driven byte by byte against h2's server side, and its
transport against our own gRPC server on a unix socket."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from kuasar.common.api.containerd.services.content.v1 import content_pb2
from kuasar.common.api.containerd.services.images.v1 import images_pb2
from kuasar.common.errors import Code
from kuasar.common.grpc_h2 import GrpcError, GrpcServer, Method
from kuasar.common.grpc_h2_client import CallState, GrpcCallError, call

READ = "/containerd.services.content.v1.Content/Read"


def framed(message) -> bytes:
    payload = message.SerializeToString()
    return struct.pack(">BI", 0, len(payload)) + payload


class Server:
    """h2's server side of one connection, fed the client's bytes."""

    def __init__(self) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.conn.initiate_connection()
        self.headers: dict[bytes, bytes] = {}
        self.body = b""

    def receive(self, data: bytes) -> bytes:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.headers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                self.body += event.data
        return self.conn.data_to_send()

    def reply(self, *bodies: bytes, status: str = "0", message: str = "") -> bytes:
        self.conn.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        size = self.conn.max_outbound_frame_size
        for body in bodies:  # each its own frame(s)
            for i in range(0, len(body), size):
                self.conn.send_data(1, body[i:i + size])
        trailers = [(b"grpc-status", status.encode())] + ([(b"grpc-message", message.encode())] if message else [])
        self.conn.send_headers(1, trailers, end_stream=True)
        return self.conn.data_to_send()


def exchange(state: CallState, server: Server) -> None:
    state.receive(server.receive(state.start()))


def test_a_server_stream_of_messages_split_across_frames_is_read_whole() -> None:
    state = CallState(READ, content_pb2.ReadContentRequest(digest="sha256:ab"), content_pb2.ReadContentResponse,
                      metadata=(("containerd-namespace", "k8s.io"),))
    server = Server()
    exchange(state, server)
    assert server.headers[b":path"] == READ.encode()
    assert server.headers[b"containerd-namespace"] == b"k8s.io"
    assert server.headers[b"content-type"] == b"application/grpc" and server.headers[b"te"] == b"trailers"
    assert server.body == framed(content_pb2.ReadContentRequest(digest="sha256:ab"))
    first, second = framed(content_pb2.ReadContentResponse(offset=0, data=b"x" * 30000)), \
        framed(content_pb2.ReadContentResponse(offset=30000, data=b"yz"))
    wire = server.reply(first[:3], first[3:] + second[:10], second[10:])  # a prefix cut, two in one frame
    assert not state.done
    for i in range(0, len(wire), 1000):  # the socket hands it over in any pieces
        ack = state.receive(wire[i:i + 1000])
        server.receive(ack)
    assert state.done
    replies = state.messages()
    assert [(r.offset, len(r.data)) for r in replies] == [(0, 30000), (30000, 2)]


def test_an_error_status_in_the_trailers_is_raised_with_its_code_and_decoded_message() -> None:
    state = CallState("/p.S/M", images_pb2.GetImageRequest(name="x"), images_pb2.GetImageResponse)
    server = Server()
    exchange(state, server)
    state.receive(server.reply(status="5", message="image%20%22x%22: not found"))
    with pytest.raises(GrpcCallError) as error:
        state.messages()
    assert error.value.code == Code.NOT_FOUND and error.value.message == 'image "x": not found'


def test_a_trailers_only_reply_ends_the_call() -> None:
    state = CallState("/p.S/M", images_pb2.GetImageRequest(), images_pb2.GetImageResponse)
    server = Server()
    exchange(state, server)
    server.conn.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                 (b"grpc-status", b"12"), (b"grpc-message", b"unknown method")], end_stream=True)
    state.receive(server.conn.data_to_send())
    assert state.done
    with pytest.raises(GrpcCallError) as error:
        state.messages()
    assert error.value.code == Code.UNIMPLEMENTED


@pytest.mark.parametrize(("body", "code", "words"), [
    (b"\0\0\0", Code.INTERNAL, "prefix"),
    (b"\0\0\0\0\x09abc", Code.INTERNAL, "inside a message"),
    (b"\1\0\0\0\0", Code.UNIMPLEMENTED, "compressed"),
    (b"\0\0\0\0\x02\xff\xff", Code.INTERNAL, "undecodable"),
])
def test_a_malformed_reply_body_is_an_error_not_a_message(body: bytes, code: Code, words: str) -> None:
    state = CallState("/p.S/M", images_pb2.GetImageRequest(), images_pb2.GetImageResponse)
    server = Server()
    exchange(state, server)
    state.receive(server.reply(body))
    with pytest.raises(GrpcCallError) as error:
        state.messages()
    assert error.value.code == code and words in error.value.message


def test_a_reply_over_the_limit_ends_the_call() -> None:
    state = CallState(READ, content_pb2.ReadContentRequest(), content_pb2.ReadContentResponse, max_reply_bytes=100)
    server = Server()
    exchange(state, server)
    state.receive(server.reply(framed(content_pb2.ReadContentResponse(data=b"z" * 200))))
    with pytest.raises(GrpcCallError) as error:
        state.messages()
    assert error.value.code == Code.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(("wire", "code"), [
    (b"", Code.UNAVAILABLE),  # the connection closed
    (b"\0\0\1\0\0\0\0\0\0x", Code.INTERNAL),  # a DATA frame on stream 0: no HTTP/2 server sends it
])
def test_a_dropped_or_garbled_connection_ends_the_call(wire: bytes, code: Code) -> None:
    state = CallState("/p.S/M", images_pb2.GetImageRequest(), images_pb2.GetImageResponse)
    state.start()
    state.receive(wire)
    assert state.done
    with pytest.raises(GrpcCallError) as error:
        state.messages()
    assert error.value.code == code


def test_a_stream_ended_without_a_status_is_an_error() -> None:
    state = CallState("/p.S/M", images_pb2.GetImageRequest(), images_pb2.GetImageResponse)
    server = Server()
    exchange(state, server)
    server.conn.send_headers(1, [(b":status", b"200")])
    server.conn.send_data(1, framed(images_pb2.GetImageResponse()), end_stream=True)
    state.receive(server.conn.data_to_send())
    with pytest.raises(GrpcCallError) as error:
        state.messages()
    assert error.value.code == Code.INTERNAL and "grpc-status" in error.value.message


def test_call_against_a_real_server_on_a_unix_socket(tmp_path: Path) -> None:
    async def get(request: images_pb2.GetImageRequest) -> images_pb2.GetImageResponse:
        if request.name != "known":
            raise GrpcError(Code.NOT_FOUND, f"image {request.name!r} not found")
        return images_pb2.GetImageResponse(image=images_pb2.Image(name="known"))

    async def scenario() -> None:
        socket = tmp_path / "s.sock"
        server = GrpcServer({"/containerd.services.images.v1.Images/Get":
                             Method(images_pb2.GetImageRequest, handler=get)})
        await server.start(socket)
        try:
            path = "/containerd.services.images.v1.Images/Get"
            [reply] = await call(str(socket), path, images_pb2.GetImageRequest(name="known"),
                                 images_pb2.GetImageResponse)
            assert reply.image.name == "known"
            with pytest.raises(GrpcCallError) as missing:
                await call(str(socket), path, images_pb2.GetImageRequest(name="other"), images_pb2.GetImageResponse)
            assert missing.value.code == Code.NOT_FOUND
            with pytest.raises(GrpcCallError) as absent:
                await call(str(tmp_path / "none.sock"), path, images_pb2.GetImageRequest(), images_pb2.GetImageResponse)
            assert absent.value.code == Code.UNAVAILABLE
        finally:
            await server.stop(0.1)

    asyncio.run(scenario())


def test_a_reply_many_times_the_flow_control_window_arrives_whole(tmp_path: Path) -> None:
    """HTTP/2 lets a server send 64 KiB before the client's window updates: without them our server's
    reply of 8 MiB would wait for the window until the deadline."""
    blob = os.urandom(1 << 20) * 8

    async def read(request: content_pb2.ReadContentRequest) -> content_pb2.ReadContentResponse:
        return content_pb2.ReadContentResponse(offset=request.offset, data=blob)

    async def scenario() -> None:
        socket = tmp_path / "big.sock"
        server = GrpcServer({READ: Method(content_pb2.ReadContentRequest, handler=read)})
        await server.start(socket)
        try:
            seen: list[int] = []
            replies = await call(str(socket), READ, content_pb2.ReadContentRequest(offset=7),
                                 content_pb2.ReadContentResponse, timeout=10,
                                 on_message=lambda m: seen.append(len(m.data)))
            assert replies == [] and seen == [len(blob)]
            [reply] = await call(str(socket), READ, content_pb2.ReadContentRequest(offset=7),
                                 content_pb2.ReadContentResponse, timeout=10)
            assert reply.offset == 7 and reply.data == blob
        finally:
            await server.stop(0.1)

    asyncio.run(scenario())


def test_a_graceful_goaway_lets_the_call_finish_and_any_other_ends_it() -> None:
    for error_code, last_stream, ends in ((0, 1, False), (0, 0, True), (2, 1, True)):
        state = CallState("/p.S/M", images_pb2.GetImageRequest(), images_pb2.GetImageResponse)
        server = Server()
        exchange(state, server)
        server.conn.close_connection(error_code=error_code, last_stream_id=last_stream)
        state.receive(server.conn.data_to_send())
        assert state.done is ends
        if ends:
            with pytest.raises(GrpcCallError) as error:
                state.messages()
            assert error.value.code == Code.UNAVAILABLE


@pytest.mark.parametrize(("status", "code"), [(b"503", Code.UNAVAILABLE), (b"404", Code.UNIMPLEMENTED),
                                              (b"418", Code.UNKNOWN)])
def test_an_http_error_status_maps_as_grpc_maps_it(status: bytes, code: Code) -> None:
    state = CallState("/p.S/M", images_pb2.GetImageRequest(), images_pb2.GetImageResponse)
    server = Server()
    exchange(state, server)
    server.conn.send_headers(1, [(b":status", status)], end_stream=True)
    state.receive(server.conn.data_to_send())
    with pytest.raises(GrpcCallError) as error:
        state.messages()
    assert error.value.code == code


def test_a_server_that_never_answers_is_a_deadline(tmp_path: Path) -> None:
    async def scenario() -> None:
        socket = str(tmp_path / "mute.sock")
        server = await asyncio.start_unix_server(lambda r, w: None, socket)
        try:
            with pytest.raises(GrpcCallError) as error:
                await call(socket, "/p.S/M", images_pb2.GetImageRequest(), images_pb2.GetImageResponse, timeout=0.2)
            assert error.value.code == Code.DEADLINE_EXCEEDED
        finally:
            server.close()
            os.unlink(socket)

    asyncio.run(scenario())
