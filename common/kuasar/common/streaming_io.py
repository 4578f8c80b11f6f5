"""containerd's streaming stdio (`io_type = "streaming"`): the `containerd.services.streaming.v1.Streaming`
service and per-id byte channels between it and the processes.

containerd opens one ttrpc connection per stream and calls `Stream`: a Data frame with
`Any(StreamInit{id})`, one acknowledgement from us (`Any(google.protobuf.Empty)`), then
`Any(containerd.types.transfer.Data)` messages, flow-controlled by `Any(WindowUpdate)`:

* stdout/stderr (`<id>-stdout`, `<id>-stderr`): we send Data chunks and end with a Data frame
  flagged REMOTE_CLOSED|NO_DATA once the process side hit end of file. containerd's window updates
  are read and ignored (as Kuasar does; containerd keeps granting).
* stdin (`<id>-stdin`): we grant a window, containerd sends Data within it, and half-closes at the
  end, which closes the process's stdin.

Streams are opened before the process exists (at CreateContainer / before Exec), so output is
buffered per id until a stream takes it, and a second stream for the same id (containerd
re-attaching after a restart) preempts the first; whatever the first had not sent yet is sent on
the new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from google.protobuf import any_pb2

from .api.containerd.services.streaming.v1 import streaming_pb2
from .api.containerd.types.transfer import streaming_pb2 as transfer
from .errors import InvalidArgument
from .ttrpc import Context, ServerStream, TtrpcServer

log = logging.getLogger(__name__)

STREAMING_SERVICE = "containerd.services.streaming.v1.Streaming"
STREAM_INIT_URL = "containerd.services.streaming.v1.StreamInit"
DATA_URL = "containerd.types.transfer.Data"
WINDOW_UPDATE_URL = "containerd.types.transfer.WindowUpdate"
EMPTY_URL = "google.protobuf.Empty"
# Largest Data message we send (containerd's own sender uses 32 KiB chunks for stdin).
MAX_CHUNK = 32 * 1024
# stdin window granted at a time (Kuasar and containerd's receiver use the same size).
STDIN_WINDOW = 32 * 1024
# Output buffered per id while no stream reads it; past this the producer waits (back-pressure on
# the process's pipe, as a FIFO nobody reads would give).
MAX_BUFFERED = 1 << 20
STREAM_PARAM = "streaming_id="
# Channels kept at most; past it, ones no process ever claimed are dropped, oldest first.
MAX_CHANNELS = 4096


def streaming_id(url: str) -> str | None:
    """The stream id of a stdio URL (`...?streaming_id=<id>-stdout`), or None if it has none."""
    _, sep, query = url.partition("?")
    if not sep:
        return None
    for part in query.split("&"):
        if part.startswith(STREAM_PARAM):
            return part[len(STREAM_PARAM):] or None
    return None


def _any(type_url: str, message) -> bytes:
    return any_pb2.Any(type_url=type_url, value=message.SerializeToString()).SerializeToString()


def _type_name(type_url: str) -> str:
    return type_url.rsplit("/", 1)[-1]


class _Attachment:
    """One live Stream call bound to a channel; `preempted` ends its handler."""

    def __init__(self) -> None:
        self.preempted = asyncio.Event()


class OutputChannel:
    """Bytes from a process to containerd (stdout or stderr of one process)."""

    def __init__(self, hub: StreamHub, stream_id: str) -> None:
        self.hub = hub
        self.id = stream_id
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.eof = False
        self.released = False
        self.has_producer = False
        self.attachment: _Attachment | None = None
        self._changed = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    # -- producer side (the process's pipe or pty) --------------------------------------------------
    async def write(self, data: bytes) -> None:
        """Queue output; waits while MAX_BUFFERED bytes are already waiting for a reader."""
        while self.buffered >= MAX_BUFFERED and not self.released:
            self._room.clear()
            await self._room.wait()
        if self.released or self.eof or not data:
            return
        for start in range(0, len(data), MAX_CHUNK):
            chunk = data[start:start + MAX_CHUNK]
            self.chunks.append(chunk)
            self.buffered += len(chunk)
        self._changed.set()

    def close(self) -> None:
        """End of output: the stream ends once everything queued is sent."""
        self.eof = True
        self._changed.set()

    # -- stream side ------------------------------------------------------------------------------
    async def serve(self, stream: ServerStream, attachment: _Attachment) -> None:
        drain = asyncio.create_task(_drain(stream), name=f"stream {self.id} window updates")
        preempted = asyncio.create_task(attachment.preempted.wait())
        try:
            while True:
                if attachment.preempted.is_set() or self.released:
                    return
                if self.chunks:
                    chunk = self.chunks[0]
                    await stream.send(_any(DATA_URL, transfer.Data(data=chunk)))
                    if attachment.preempted.is_set():
                        # A new stream took over meanwhile (a send may return once the connection is
                        # gone): the queue is its now, this chunk included.
                        return
                    # Only now is it delivered: a chunk whose send failed is resent on the next stream.
                    self.chunks.popleft()
                    self.buffered -= len(chunk)
                    if self.buffered < MAX_BUFFERED:
                        self._room.set()
                    continue
                if self.eof:
                    self.hub._finished(self)
                    return
                self._changed.clear()
                changed = asyncio.create_task(self._changed.wait())
                try:
                    await asyncio.wait([changed, preempted, drain], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                if drain.done():
                    # The connection failed (a new stream will pick up where this one stopped), or containerd
                    # half-closed it: it closes its reader only when it no longer wants the output (an
                    # exec whose Exec failed), and would otherwise leave this stream waiting for ever.
                    return
        finally:
            drain.cancel()
            preempted.cancel()


async def _drain(stream: ServerStream) -> None:
    """Read (and ignore) what containerd sends on an output stream, window updates, until its half-close."""
    while await stream.recv() is not None:
        pass


class InputChannel:
    """Bytes from containerd to a process (stdin)."""

    def __init__(self, hub: StreamHub, stream_id: str) -> None:
        self.hub = hub
        self.id = stream_id
        self.chunks: deque[bytes | None] = deque()  # None = end of input
        self.queued = 0
        self.released = False
        self.has_producer = False  # here: a process that reads this channel
        self.attachment: _Attachment | None = None
        self._readable = asyncio.Event()
        self._consumed = asyncio.Event()

    async def read(self) -> bytes | None:
        """The next bytes for the process, or None at end of input."""
        while not self.chunks:
            if self.released:
                return None
            self._readable.clear()
            await self._readable.wait()
        chunk = self.chunks.popleft()
        if chunk is not None:
            self.queued -= len(chunk)
            self._consumed.set()
        return chunk

    def _push(self, data: bytes | None) -> None:
        self.chunks.append(data)
        if data is not None:
            self.queued += len(data)
        self._readable.set()

    async def serve(self, stream: ServerStream, attachment: _Attachment) -> None:
        window = 0  # bytes containerd may still send us

        async def grant() -> None:
            nonlocal window
            # Keep at most one window of unread data queued: room opens as the process reads.
            while window + self.queued < STDIN_WINDOW:
                await stream.send(_any(WINDOW_UPDATE_URL, transfer.WindowUpdate(update=STDIN_WINDOW)))
                window += STDIN_WINDOW

        async def granter() -> None:
            while True:
                await grant()
                self._consumed.clear()
                await self._consumed.wait()

        granting = asyncio.create_task(granter(), name=f"stream {self.id} window")
        receive: asyncio.Task[bytes | None] | None = None
        try:
            while True:
                receive = asyncio.create_task(stream.recv())
                preempted = asyncio.create_task(attachment.preempted.wait())
                try:
                    await asyncio.wait([receive, preempted, granting], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    preempted.cancel()
                if not receive.done():
                    receive.cancel()
                    if granting.done():
                        granting.result()  # raise what broke the connection
                    return  # preempted: the new stream carries on
                message = receive.result()
                if message is None:  # containerd half-closed: end of input
                    self._end_of_input()
                    return
                window -= self._take(message)
        except asyncio.CancelledError:
            self._salvage(stream, receive)
            raise
        finally:
            granting.cancel()

    def _take(self, message: bytes) -> int:
        payload = any_pb2.Any.FromString(message)
        if _type_name(payload.type_url) != DATA_URL:
            return 0
        data = transfer.Data.FromString(payload.value).data
        if data and not self.released:
            self._push(data)
        return len(data)

    def _end_of_input(self) -> None:
        self._push(None)
        self.hub._finished(self)

    def _salvage(self, stream: ServerStream, receive: asyncio.Task[bytes | None] | None) -> None:
        """The connection went away (the handler is being cancelled): what containerd sent before it
        left, its half-close included, still reaches the process. The stream's receive buffer is read
        directly: the connection closes it only after its handlers are gone, so `closed` here can only
        mean containerd's own half-close."""
        if receive is not None:
            if receive.done() and not receive.cancelled() and receive.exception() is None:
                message = receive.result()
                if message is None:
                    self._end_of_input()
                    return
                self._take(message)
            else:
                receive.cancel()
        inbox = stream._inbox
        while inbox._items:
            self._take(inbox._items.popleft())
        if inbox.closed and inbox._error is None:
            self._end_of_input()


Channel = OutputChannel | InputChannel


class StreamHub:
    """Channels by stream id; serves `Streaming/Stream` and hands channels to processes."""

    def __init__(self) -> None:
        self.channels: dict[str, Channel] = {}

    def register(self, server: TtrpcServer) -> None:
        server.add_stream(STREAMING_SERVICE, "Stream", self._stream, ends_connection=True)

    @staticmethod
    def _is_input(stream_id: str) -> bool:
        return stream_id.endswith("-stdin")

    def _channel(self, stream_id: str) -> Channel:
        channel = self.channels.get(stream_id)
        if channel is None:
            if len(self.channels) >= MAX_CHANNELS:
                self._prune()
            cls = InputChannel if self._is_input(stream_id) else OutputChannel
            channel = self.channels[stream_id] = cls(self, stream_id)
        return channel

    def _prune(self) -> None:
        """Forget the oldest channels no process ever took and no stream serves (streams for
        processes that were never created), so they cannot pile up."""
        for sid, channel in list(self.channels.items()):
            if len(self.channels) < MAX_CHANNELS:
                return
            if not channel.has_producer and channel.attachment is None:
                log.warning("stream %s: dropping its unclaimed channel", sid)
                self.release(sid)

    def output(self, stream_id: str) -> OutputChannel:
        """The channel a process writes `stream_id` (stdout/stderr) into."""
        channel = self._channel(stream_id)
        if not isinstance(channel, OutputChannel):
            raise InvalidArgument(f"stream {stream_id!r} is an input stream")
        channel.has_producer = True
        return channel

    def input(self, stream_id: str) -> InputChannel:
        """The channel a process reads `stream_id` (stdin) from."""
        channel = self._channel(stream_id)
        if not isinstance(channel, InputChannel):
            raise InvalidArgument(f"stream {stream_id!r} is not an input stream")
        channel.has_producer = True
        return channel

    def release(self, stream_id: str) -> None:
        """The process is gone for good (deleted): drop its channel and end any stream on it."""
        channel = self.channels.pop(stream_id, None)
        if channel is None:
            return
        channel.released = True
        if isinstance(channel, OutputChannel):
            channel._changed.set()
            channel._room.set()
        else:
            channel._readable.set()
        if channel.attachment is not None:
            channel.attachment.preempted.set()

    def _finished(self, channel: Channel) -> None:
        """A channel's stream is complete (all output sent / end of input received)."""
        if channel.has_producer or isinstance(channel, InputChannel):
            # The process still refers to it (release() drops it), or stdin that arrived before the
            # process exists, end of input included, still has to reach it.
            return
        if self.channels.get(channel.id) is channel:
            del self.channels[channel.id]

    async def _stream(self, stream: ServerStream, ctx: Context) -> None:
        first = await stream.recv()
        if first is None:
            raise InvalidArgument("stream closed before StreamInit")
        init_any = any_pb2.Any.FromString(first)
        if _type_name(init_any.type_url) != STREAM_INIT_URL:
            raise InvalidArgument(f"first stream message is {init_any.type_url!r}, not StreamInit")
        stream_id = streaming_pb2.StreamInit.FromString(init_any.value).id
        if not stream_id:
            raise InvalidArgument("StreamInit without an id")
        channel = self._channel(stream_id)
        if channel.attachment is not None:  # a newer stream for the same id wins
            log.info("stream %s: re-attached, preempting the previous stream", stream_id)
            channel.attachment.preempted.set()
        attachment = channel.attachment = _Attachment()
        try:
            # The ack inside: a connection lost during it left the attachment, and the channel, for good
            # (`_prune` keeps attached channels).
            await stream.send(any_pb2.Any(type_url=EMPTY_URL).SerializeToString())
            await channel.serve(stream, attachment)  # type: ignore[arg-type]
        finally:
            if channel.attachment is attachment:
                channel.attachment = None
                if not channel.has_producer and not channel.chunks and self.channels.get(stream_id) is channel:
                    del self.channels[stream_id]  # a stream for an id no process ever used


__all__ = ["InputChannel", "OutputChannel", "STREAMING_SERVICE", "StreamHub", "streaming_id"]
