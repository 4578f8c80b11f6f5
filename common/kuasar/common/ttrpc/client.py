"""asyncio ttrpc client: concurrent calls and streams multiplexed over one connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar, overload

from google.protobuf.message import DecodeError, Message

from kuasar.common.api.ttrpc import request_pb2
from kuasar.common.errors import Code, DeadlineExceeded, Internal, KuasarError, Unavailable, from_code

from .connection import ClientConnection, Event, MessageRefused, ResponseReceived, StreamData
from .frames import NO_FLAGS, Flag, ProtocolError
from .inbox import Inbox

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

# Bytes asked of the transport per read; frames larger than this just take several reads.
READ_CHUNK = 64 << 10
# How long close() waits for the last bytes to reach a peer that may have stopped reading.
CLOSE_TIMEOUT = 5.0


class ClientStream:
    """The client end of a streaming call (see `TtrpcClient.open_stream`)."""

    def __init__(self, client: TtrpcClient, stream_id: int) -> None:
        self._client = client
        self.stream_id = stream_id
        self._inbox = Inbox()

    async def send(self, payload: bytes) -> None:
        await self._client._write(self._client._proto.send_data(self.stream_id, payload))

    async def close_send(self) -> None:
        """Half-close: the server's recv() returns None; replies keep coming."""
        await self._client._write(self._client._proto.close_send(self.stream_id))

    async def recv(self) -> bytes | None:
        """The next message; None once the server ended the stream; raises its error status."""
        return await self._inbox.get()


class TtrpcClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Prefer `from_streams`/`connect_unix`; must run inside the event loop."""
        self._reader = reader
        self._writer = writer
        self._proto = ClientConnection()
        self._calls: dict[int, asyncio.Future[request_pb2.Response]] = {}
        self._streams: dict[int, ClientStream] = {}
        self._drain_lock = asyncio.Lock()
        self._error: Unavailable | None = None
        self._read_task = asyncio.create_task(self._read_loop(), name="ttrpc client reader")

    @classmethod
    def from_streams(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> TtrpcClient:
        return cls(reader, writer)

    @classmethod
    async def connect_unix(cls, path: str) -> TtrpcClient:
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except OSError as err:
            raise Unavailable(f"ttrpc connect {path}: {err}") from err
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        return self._error is not None

    async def __aenter__(self) -> TtrpcClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # `timeout` is a parameter, not left to an enclosing asyncio.timeout, because it also goes on
    # the wire (timeout_nano) so the server can give up too; hence the ASYNC109 waivers.
    @overload
    async def call(self, service: str, method: str, request: Message | bytes, response_type: type[M], *,
                   timeout: float | None = None,  # noqa: ASYNC109
                   metadata: Mapping[str, str] | None = None) -> M: ...

    @overload
    async def call(self, service: str, method: str, request: Message | bytes, response_type: None = None, *,
                   timeout: float | None = None,  # noqa: ASYNC109
                   metadata: Mapping[str, str] | None = None) -> bytes: ...

    async def call(self, service: str, method: str, request: Message | bytes,
                   response_type: type[M] | None = None, *,
                   timeout: float | None = None,  # noqa: ASYNC109
                   metadata: Mapping[str, str] | None = None) -> M | bytes:
        """A unary call; the reply decoded as `response_type`, or its raw bytes when None.

        `timeout` (seconds) bounds the wait here and is sent as timeout_nano, so the server
        cancels its handler too. A non-OK status raises the matching KuasarError.
        """
        return await self.begin_call(service, method, request, response_type, timeout=timeout, metadata=metadata)

    def begin_call(self, service: str, method: str, request: Message | bytes,
                   response_type: type[M] | None = None, *, timeout: float | None = None,
                   metadata: Mapping[str, str] | None = None) -> Coroutine[Any, Any, M | bytes]:
        """`call`, with the request written before this returns (no await in between). The returned
        coroutine waits for the reply; it must be awaited or made a task, or the call stays registered."""
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        req = _request(service, method, payload, metadata, timeout)
        future: asyncio.Future[request_pb2.Response] = asyncio.get_running_loop().create_future()
        sid = self._start(req, NO_FLAGS)
        self._calls[sid] = future
        return self._reply(f"/{service}/{method}", sid, future, response_type, timeout)

    async def _reply(self, name: str, sid: int, future: asyncio.Future[request_pb2.Response],
                     response_type: type[M] | None, timeout: float | None) -> M | bytes:  # noqa: ASYNC109
        try:
            async with asyncio.timeout(timeout) as scope:
                await self._drain()
                response = await future
        except TimeoutError:
            if scope.expired():
                raise DeadlineExceeded(f"{name}: deadline exceeded") from None
            raise
        finally:
            self._calls.pop(sid, None)
            self._proto.forget(sid)
        if response.status.code != Code.OK:
            raise from_code(response.status.code, response.status.message)
        if response_type is None:
            return response.payload
        try:
            return response_type.FromString(response.payload)
        except DecodeError as err:
            raise Internal(f"{name}: undecodable reply: {err}") from None

    async def open_stream(self, service: str, method: str, metadata: Mapping[str, str] | None = None, *,
                          payload: bytes = b"", client_streaming: bool = True) -> ClientStream:
        """Open a streaming call. By default bidirectional (Request flagged REMOTE_OPEN, messages
        then go as Data frames); `payload` is an optional first message carried in the Request.
        With client_streaming=False it is server-streaming: `payload` is the only client message
        (Request flagged REMOTE_CLOSED) and send() is refused."""
        flags = Flag.REMOTE_OPEN if client_streaming else Flag.REMOTE_CLOSED
        req = _request(service, method, payload, metadata, None)
        sid = self._start(req, flags)
        stream = self._streams[sid] = ClientStream(self, sid)
        try:
            await self._drain()
        except BaseException:  # cancelled, say, while a slow server reads: nobody will own the stream
            self._abandon(sid)
            raise
        return stream

    def _abandon(self, sid: int) -> None:
        """Give up a stream whose request went out: half-closed, so that the server's handler is not
        left waiting for messages, and forgotten, so that what the server still sends is dropped."""
        with contextlib.suppress(KuasarError, OSError):
            if self._error is None and self._proto.is_active(sid):
                self._writer.write(self._proto.close_send(sid))
        self._streams.pop(sid, None)
        self._proto.forget(sid)

    async def wait_closed(self) -> None:
        """Until the connection is gone (the server closed it, or `close`)."""
        await asyncio.wait({self._read_task})

    async def close(self) -> None:
        """Close the connection; pending calls and streams fail with Unavailable."""
        self._read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._read_task
        # The reader's cleanup runs even if it never started; make sure callers see "closed".
        self._fail_all("client closed")
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._writer.wait_closed()
        except (OSError, TimeoutError):
            self._writer.transport.abort()

    def _start(self, req: request_pb2.Request, flags: Flag) -> int:
        if self._error is not None:
            raise self._error
        try:
            sid, data = self._proto.start_request(req, flags)
        except ProtocolError as err:
            raise from_code(err.code, err.message) from None
        # Allocating the id and writing happen in one synchronous step, so ids reach the wire in
        # increasing order however many callers race here.
        self._writer.write(data)
        return sid

    async def _write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._writer.write(data)
        await self._drain()

    async def _drain(self) -> None:
        try:
            async with self._drain_lock:
                await self._writer.drain()
        except OSError as err:
            raise Unavailable(f"ttrpc connection lost: {err}") from err

    async def _read_loop(self) -> None:
        reason = "connection closed by server"
        try:
            while True:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    self._proto.receive_eof()
                    break
                for event in self._proto.receive_data(data):
                    await self._dispatch(event)
        except ProtocolError as err:
            reason = f"protocol error from server: {err.message}"
            log.warning("ttrpc client: %s", reason)
        except OSError as err:
            reason = str(err)
        except asyncio.CancelledError:
            reason = "client closed"
            raise
        finally:
            self._fail_all(reason)

    async def _dispatch(self, event: Event) -> None:
        if isinstance(event, ResponseReceived):
            future = self._calls.get(event.stream_id)
            if future is not None:
                if not future.done():
                    future.set_result(event.response)
                return
            stream = self._streams.pop(event.stream_id, None)
            if stream is not None:
                status = event.response.status
                if status.code != Code.OK:
                    stream._inbox.close(from_code(status.code, status.message))
                    return
                # A stream may also end with a Response; its payload is the last message.
                if event.response.payload:
                    await stream._inbox.put(event.response.payload)
                stream._inbox.close()
        elif isinstance(event, StreamData):
            future = self._calls.get(event.stream_id)
            if future is not None:
                if not future.done():
                    future.set_exception(Internal("server sent stream data on a unary call"))
                return
            stream = self._streams.get(event.stream_id)
            if stream is None:
                return
            if event.payload is not None:
                await stream._inbox.put(event.payload)
            if event.end:
                self._streams.pop(event.stream_id, None)
                stream._inbox.close()
        elif isinstance(event, MessageRefused):  # a reply over the size limit fails its call alone
            error = from_code(event.code, event.message)
            future = self._calls.get(event.stream_id)
            if future is not None and not future.done():
                future.set_exception(error)
            stream = self._streams.pop(event.stream_id, None)
            if stream is not None:
                stream._inbox.close(error)

    def _fail_all(self, reason: str) -> None:
        if self._error is None:
            self._error = Unavailable(f"ttrpc connection closed: {reason}")
        for future in self._calls.values():
            if not future.done():
                future.set_exception(self._error)
        for stream in self._streams.values():
            stream._inbox.close(self._error)
        self._calls.clear()
        self._streams.clear()
        self._writer.close()


def _request(service: str, method: str, payload: bytes, metadata: Mapping[str, str] | None,
             timeout: float | None) -> request_pb2.Request:
    return request_pb2.Request(
        service=service, method=method, payload=payload,
        # Go's client derives timeout_nano the same way, from the time left before the deadline.
        timeout_nano=int(timeout * 1e9) if timeout else 0,
        metadata=[request_pb2.KeyValue(key=k, value=v) for k, v in (metadata or {}).items()],
    )


__all__ = ["ClientStream", "TtrpcClient"]
