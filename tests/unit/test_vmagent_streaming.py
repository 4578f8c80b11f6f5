"""containerd's streaming stdio (kuasar.common.streaming_io) as vm-agent serves it, with a client that
speaks exactly what containerd sends (containerd-sandbox-protocol.md 6.2), and the agent's pipe pumps."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator

import pytest
from google.protobuf import any_pb2

from kuasar.common import streaming_io
from kuasar.common.api.containerd.services.streaming.v1 import streaming_pb2
from kuasar.common.api.containerd.types.transfer import streaming_pb2 as transfer
from kuasar.common.errors import InvalidArgument
from kuasar.common.iopump import Source
from kuasar.common.streaming_io import StreamHub, streaming_id
from kuasar.common.ttrpc import ClientStream, TtrpcClient, TtrpcServer
from kuasar.common.ttrpc.frames import MAX_MESSAGE_SIZE, Flag, Frame, FrameType, encode_frame
from kuasar.vmagent.stdio import ProcessIO, pump_in, pump_out
from tests.support.aio import run_bounded as run


@pytest.fixture
def sock() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="strm", dir="/tmp")
    yield os.path.join(directory, "agent.sock")
    shutil.rmtree(directory, ignore_errors=True)


def pack(type_url: str, message) -> bytes:
    return any_pb2.Any(type_url=type_url, value=message.SerializeToString()).SerializeToString()


async def containerd_open(path: str, sid: str) -> tuple[TtrpcClient, ClientStream]:
    """One connection per stream, Stream with REMOTE_OPEN, StreamInit, wait for the Empty ack."""
    client = await TtrpcClient.connect_unix(path)
    stream = await client.open_stream(streaming_io.STREAMING_SERVICE, "Stream")
    await stream.send(pack("containerd.services.streaming.v1.StreamInit", streaming_pb2.StreamInit(id=sid)))
    ack = any_pb2.Any.FromString(await stream.recv())
    assert ack.type_url == "google.protobuf.Empty" and ack.value == b""
    return client, stream


async def containerd_close(client: TtrpcClient, stream: ClientStream) -> None:
    """The half-close Go's ttrpc client sends at containerd's cio.Close even after the server ended the
    stream (our client, like Rust's, takes the server's end for the end of the stream and sends none)."""
    await client._write(encode_frame(Frame(stream.stream_id, FrameType.DATA, Flag.REMOTE_CLOSED | Flag.NO_DATA, b"")))


async def receive_all(stream: ClientStream) -> bytes:
    await stream.send(pack("containerd.types.transfer.WindowUpdate", transfer.WindowUpdate(update=65536)))
    data = b""
    while (message := await stream.recv()) is not None:
        payload = any_pb2.Any.FromString(message)
        assert payload.type_url == "containerd.types.transfer.Data"
        data += transfer.Data.FromString(payload.value).data
    return data


async def serving(path: str) -> tuple[TtrpcServer, StreamHub]:
    server = TtrpcServer()
    hub = StreamHub()
    hub.register(server)
    await server.start_unix(path)
    return server, hub


def test_streaming_id_from_stdio_urls() -> None:
    assert streaming_id("ttrpc+hvsock:///run/x/task.vsock:1024?streaming_id=abc-stdout") == "abc-stdout"
    assert streaming_id("ttrpc+unix:///run/t.sock?foo=1&streaming_id=e1-stdin") == "e1-stdin"
    assert streaming_id("/run/fifo/stdout") is None
    assert streaming_id("unix:///x?streaming_id=") is None


def test_output_buffered_before_the_stream_then_ended_with_data_close(sock: str) -> None:
    async def scenario() -> None:
        server, hub = await serving(sock)
        channel = hub.output("c1-stdout")  # the process exists and writes before containerd attaches
        await channel.write(b"early ")
        client, stream = await containerd_open(sock, "c1-stdout")
        receiving = asyncio.create_task(receive_all(stream))
        await channel.write(b"x" * 100_000)  # more than one Data message
        channel.close()
        assert await receiving == b"early " + b"x" * 100_000  # ended by Data REMOTE_CLOSED|NO_DATA
        hub.release("c1-stdout")
        assert hub.channels == {}
        await client.close()
        await server.close()

    run(scenario())


def test_stream_opened_before_the_process_exists(sock: str) -> None:
    async def scenario() -> None:
        server, hub = await serving(sock)
        client, stream = await containerd_open(sock, "c2-stderr")  # at CreateContainer
        receiving = asyncio.create_task(receive_all(stream))
        await asyncio.sleep(0.05)
        channel = hub.output("c2-stderr")  # Task.Create, later
        await channel.write(b"oops\n")
        channel.close()
        assert await receiving == b"oops\n"
        await client.close()
        await server.close()

    run(scenario())


def test_second_stream_preempts_the_first_and_gets_what_was_not_sent(sock: str) -> None:
    async def scenario() -> None:
        server, hub = await serving(sock)
        channel = hub.output("c3-stdout")
        first_client, first = await containerd_open(sock, "c3-stdout")
        await first.send(pack("containerd.types.transfer.WindowUpdate", transfer.WindowUpdate(update=65536)))
        await channel.write(b"one")
        assert transfer.Data.FromString(any_pb2.Any.FromString(await first.recv()).value).data == b"one"
        await first_client.close()  # containerd restarts: its connection is gone
        await channel.write(b"two")  # nobody reads: buffered
        second_client, second = await containerd_open(sock, "c3-stdout")
        receiving = asyncio.create_task(receive_all(second))
        await channel.write(b"three")
        channel.close()
        assert await receiving == b"twothree"
        await second_client.close()
        await server.close()

    run(scenario())


def test_stdin_window_and_half_close(sock: str) -> None:
    async def scenario() -> None:
        server, hub = await serving(sock)
        channel = hub.input("c4-stdin")
        client, stream = await containerd_open(sock, "c4-stdin")
        granted = any_pb2.Any.FromString(await stream.recv())
        assert granted.type_url == "containerd.types.transfer.WindowUpdate"
        window = transfer.WindowUpdate.FromString(granted.value).update
        assert window == streaming_io.STDIN_WINDOW
        await stream.send(pack("containerd.types.transfer.Data", transfer.Data(data=b"a" * window)))
        assert await channel.read() == b"a" * window
        # The window is used up; reading it made room, so more is granted.
        more = any_pb2.Any.FromString(await stream.recv())
        assert transfer.WindowUpdate.FromString(more.value).update == streaming_io.STDIN_WINDOW
        await stream.send(pack("containerd.types.transfer.Data", transfer.Data(data=b"tail")))
        await stream.close_send()  # containerd's half-close: end of input
        assert await channel.read() == b"tail"
        assert await channel.read() is None
        await client.close()
        hub.release("c4-stdin")
        await server.close()

    run(scenario())


def test_bad_first_message_is_an_error(sock: str) -> None:
    async def scenario() -> None:
        server, _ = await serving(sock)
        client = await TtrpcClient.connect_unix(sock)
        stream = await client.open_stream(streaming_io.STREAMING_SERVICE, "Stream")
        await stream.send(pack("containerd.types.transfer.Data", transfer.Data(data=b"no init")))
        with pytest.raises(InvalidArgument, match="not StreamInit"):
            await stream.recv()
        await client.close()
        await server.close()

    run(scenario())


def test_release_ends_an_attached_output_stream(sock: str) -> None:
    async def scenario() -> None:
        server, hub = await serving(sock)
        hub.output("c5-stdout")
        client, stream = await containerd_open(sock, "c5-stdout")
        receiving = asyncio.create_task(receive_all(stream))
        await asyncio.sleep(0.05)
        hub.release("c5-stdout")  # Task.Delete while nothing more will come
        assert await receiving == b""
        assert await stream.recv() is None  # ended, not failed
        await client.close()
        await server.close()

    run(scenario())


def test_pipe_pumps_and_process_io(sock: str) -> None:
    async def scenario() -> None:
        hub = StreamHub()
        out = hub.output("p-stdout")
        read_end, write_end = os.pipe()
        pumping = asyncio.create_task(pump_out(Source(read_end), out))
        os.write(write_end, b"from the process")
        os.close(write_end)
        await pumping
        assert out.eof and b"".join(out.chunks) == b"from the process"

        inp = hub.input("p-stdin")
        read_end, write_end = os.pipe()
        feeding = asyncio.create_task(pump_in(inp, write_end))
        inp._push(b"to the process")
        inp._push(None)
        await feeding
        assert os.read(read_end, 100) == b"to the process"
        assert os.read(read_end, 100) == b""  # the pump closed it at end of input
        os.close(read_end)

        io = ProcessIO(hub, stdin="", stdout="ttrpc+hvsock:///x.sock:1024?streaming_id=q-stdout",
                       stderr="/dev/null")
        stdio = io.runc_stdio()
        assert stdio.stdin is None and stdio.stdout is not None and stdio.stderr is not None
        os.write(stdio.stdout, b"via runc's fd")
        io.release_child_fds()  # the process is the only writer now; it "exits"
        await io.drain_output(5)
        assert b"".join(hub.channels["q-stdout"].chunks) == b"via runc's fd"
        io.close()
        assert "q-stdout" not in hub.channels
        with pytest.raises(InvalidArgument):
            ProcessIO(hub, stdout="fifo:///relative")
        io.resize(80, 24)  # no terminal: accepted and ignored, as containerd's shims do
        assert io.size is None

    run(scenario())


def test_stdin_sent_and_closed_before_the_process_exists(sock: str) -> None:
    """containerd may write stdin and half-close before Task.Exec: nothing of it may be lost."""

    async def scenario() -> None:
        server, hub = await serving(sock)
        client, stream = await containerd_open(sock, "e1-stdin")
        await stream.recv()  # the window
        await stream.send(pack("containerd.types.transfer.Data", transfer.Data(data=b"early input")))
        await stream.close_send()
        # Like containerd, wait for the server to end the stream before dropping the connection.
        while await stream.recv() is not None:
            pass
        await client.close()
        channel = hub.input("e1-stdin")  # Task.Exec, later
        assert await channel.read() == b"early input"
        assert await channel.read() is None
        await server.close()

    run(scenario())


def test_unclaimed_channels_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        monkeypatch.setattr(streaming_io, "MAX_CHANNELS", 3)
        hub = StreamHub()
        kept = hub.output("mine-stdout")  # claimed by a process: never pruned
        for i in range(5):
            hub._channel(f"x{i}-stdout")
        assert "mine-stdout" in hub.channels and len(hub.channels) <= 3
        assert hub.channels["mine-stdout"] is kept

    run(scenario())


def test_stdin_survives_containerd_leaving_right_after_half_close(sock: str) -> None:
    """Data and half-close that arrived just before the connection dropped are not lost."""

    async def scenario() -> None:
        server, hub = await serving(sock)
        channel = hub.input("e2-stdin")
        client, stream = await containerd_open(sock, "e2-stdin")
        await stream.recv()  # the window
        await stream.send(pack("containerd.types.transfer.Data", transfer.Data(data=b"last words")))
        await stream.close_send()
        await client.close()  # at once: the server may see end of file before handling the messages
        assert await channel.read() == b"last words"
        assert await channel.read() is None
        await server.close()

    run(scenario())


def test_a_stdin_stream_refused_for_an_oversized_frame_does_not_end_the_input(sock: str) -> None:
    # The refused stream's buffer was closed without an error, which reads as containerd's half-close:
    # the process's stdin ended although nobody closed it (a new stream may still bring more).
    async def scenario() -> None:
        server, hub = await serving(sock)
        channel = hub.input("c5-stdin")
        client, stream = await containerd_open(sock, "c5-stdin")
        await stream.recv()  # the first window
        await stream.send(pack("containerd.types.transfer.Data", transfer.Data(data=b"before ")))
        assert await channel.read() == b"before "
        size = MAX_MESSAGE_SIZE + 1  # one frame over the limit, as a broken client might send
        client._writer.write(struct.pack(">IIBB", size, stream.stream_id, 2, 0) + b"\0" * size)
        await client._writer.drain()
        await asyncio.sleep(0.2)
        assert None not in channel.chunks and not channel.released
        again, stream = await containerd_open(sock, "c5-stdin")  # the input goes on on a new stream
        await stream.send(pack("containerd.types.transfer.Data", transfer.Data(data=b"after")))
        await stream.close_send()
        assert await channel.read() == b"after"
        assert await channel.read() is None
        for done in (client, again):
            await done.close()
        hub.release("c5-stdin")
        await server.close()

    run(scenario())


def test_finished_streams_leave_no_connection_and_a_half_closed_output_stream_ends(sock: str) -> None:
    # containerd 2.1 dials a connection per stream and never closes it: every exec probe left two open
    # connections in the agent (and the proxy, and vhost-device-vsock) until the agent ran out of fds;
    # an output stream containerd closed before any output (an exec whose Exec failed) stayed for ever.
    async def scenario() -> None:
        server, hub = await serving(sock)
        clients = []
        for i in range(5):
            client, stream = await containerd_open(sock, f"e{i}-stdout")
            clients.append(client)
            receiving = asyncio.create_task(receive_all(stream))
            channel = hub.output(f"e{i}-stdout")
            await channel.write(b"probe ok\n")
            channel.close()
            assert await receiving == b"probe ok\n"
            hub.release(f"e{i}-stdout")
            if i == 0:  # ended by us, but containerd may still be reading (its window updates would fail)
                await asyncio.sleep(0.1)
                assert server.active_connections == 1
            await containerd_close(client, stream)  # containerd's cio.Close, once it has read all
        client, stream = await containerd_open(sock, "failed-stdout")  # its Exec never came
        clients.append(client)
        await stream.close_send()
        assert await stream.recv() is None
        for _ in range(100):
            if server.active_connections == 0 and all(client.closed for client in clients):
                break
            await asyncio.sleep(0.02)
        assert server.active_connections == 0
        assert all(client.closed for client in clients)  # closed by the agent (the proxy follows suit)
        assert hub.channels == {}
        await server.close()

    run(scenario())


def test_a_stream_lost_while_its_init_is_acknowledged_leaves_no_channel_attached() -> None:
    # The ack was sent outside the try that detaches the stream: each connection lost right then kept a
    # channel attached for good, which the hub's pruning never drops.
    class LostAtTheAck:
        def __init__(self, stream_id: str) -> None:
            init = streaming_pb2.StreamInit(id=stream_id)
            self.first = any_pb2.Any(type_url=streaming_io.STREAM_INIT_URL, value=init.SerializeToString())

        async def recv(self) -> bytes:
            return self.first.SerializeToString()

        async def send(self, data: bytes) -> None:
            raise ConnectionResetError("gone")

    async def scenario() -> None:
        hub = streaming_io.StreamHub()
        for i in range(5):
            with pytest.raises(ConnectionResetError):
                await hub._stream(LostAtTheAck(f"s{i}"), None)  # type: ignore[arg-type]
        assert [c for c in hub.channels.values() if c.attachment is not None] == []

    asyncio.run(scenario())
