"""asyncio ttrpc server: routes requests to handlers, one task per stream, over any stream transport."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from google.protobuf.message import DecodeError, Message

from kuasar.common.api.ttrpc import request_pb2
from kuasar.common.errors import (
    AlreadyExists,
    Code,
    Internal,
    KuasarError,
    from_code,
)
from kuasar.common.request_timing import TIMING

from .connection import MessageRefused, NewRequest, ServerConnection, StreamClosed, StreamData, status_response
from .frames import Flag, ProtocolError
from .inbox import Inbox

log = logging.getLogger(__name__)

# Metadata key containerd sets to the namespace of the call (`namespaces.TTRPCHeader`).
NAMESPACE_KEY = "containerd-namespace-ttrpc"
# Bytes asked of the transport per read; frames larger than this just take several reads.
READ_CHUNK = 64 << 10
# How long a closing connection waits for cancelled handlers, and for its last bytes to reach a
# peer that may have stopped reading. Bounded so a misbehaving handler or peer cannot hang close.
CLOSE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Context:
    """What a handler may want to know about its call."""

    service: str
    method: str
    metadata: Mapping[str, list[str]]
    timeout: float | None  # seconds the client allowed (timeout_nano); None = no deadline
    deadline: float | None  # the same as an event loop time (`loop.time()`)
    connection_id: int

    @property
    def namespace(self) -> str | None:
        values = self.metadata.get(NAMESPACE_KEY)
        return values[0] if values else None


class ServerStream:
    """The server end of a streaming call.

    Incoming messages are buffered (STREAM_RECV_BUFFER); a handler that has no use for them must
    still drain `recv()`, or the stream fails with RESOURCE_EXHAUSTED once the buffer stays full.
    """

    def __init__(self, conn: _ServerConn, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._inbox = Inbox()
        self.remote_closed = False  # the client half-closed it

    async def recv(self) -> bytes | None:
        """The next message, or None once the client half-closed."""
        return await self._inbox.get()

    async def send(self, payload: bytes) -> None:
        await self._conn.write(self._conn.proto.send_data(self.stream_id, payload))


UnaryHandler = Callable[[Message, Context], Awaitable[Message | bytes]]
StreamHandler = Callable[[ServerStream, Context], Awaitable[None]]


@dataclass(frozen=True)
class _Route:
    handler: Callable[..., Awaitable[object]]
    request_type: type[Message] | None  # None for streams
    ends_connection: bool = False  # see TtrpcServer.add_stream


class _ServerConn:
    """One accepted connection: a reader loop, one task per stream, one serialized writer."""

    def __init__(self, server: TtrpcServer, conn_id: int,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.id = conn_id
        self.reader = reader
        self.writer = writer
        self.proto = ServerConnection()
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.streams: dict[int, ServerStream] = {}
        self.done = asyncio.Event()
        self._write_lock = asyncio.Lock()
        # Streams of an `ends_connection` route that we have ended, whose client has not half-closed yet:
        # until it has, it may still be reading what we sent (and sends window updates meanwhile).
        self._ending: set[int] = set()
        self._close_when_idle = False

    async def write(self, data: bytes) -> None:
        if self.writer.is_closing():
            raise ConnectionResetError("ttrpc connection is closed")
        # write() is synchronous, so frames never interleave; the lock makes writers take turns
        # waiting for the peer to drain, which is the only back-pressure ttrpc has.
        self.writer.write(data)
        async with self._write_lock:
            await self.writer.drain()

    async def run(self) -> None:
        try:
            await self._read_loop()
        except ProtocolError as err:
            log.warning("ttrpc connection %d: %s; closing it", self.id, err.message)
            reply = self.proto.reject(err)
            if reply is not None:
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await self.write(reply)
        except OSError as err:  # reset by peer and friends: same as a clean EOF
            log.debug("ttrpc connection %d: %s", self.id, err)
        finally:
            await self._shutdown()

    async def _read_loop(self) -> None:
        while True:
            data = await self.reader.read(READ_CHUNK)
            received = TIMING.start()
            if not data:
                self.proto.receive_eof()
                return
            for event in self.proto.receive_data(data):
                if isinstance(event, NewRequest):
                    self._start(event, received)
                elif isinstance(event, StreamData):
                    stream = self.streams.get(event.stream_id)
                    if stream is None:  # data for a unary method, or a stream we ended: nobody to give it to
                        if event.end and event.stream_id in self._ending:
                            self._ending.discard(event.stream_id)
                            self._close_when_idle = True
                        continue
                    if event.payload is not None:
                        await stream._inbox.put(event.payload)
                    if event.end:
                        stream.remote_closed = True
                        stream._inbox.close()
                elif isinstance(event, MessageRefused):
                    await self._refuse(event)
            # Decided here, after the whole chunk: a request later in it is a reason to stay.
            self._close_if_idle()

    def _close_if_idle(self, finishing: int | None = None) -> None:
        """Close a connection whose `ends_connection` streams are over in both directions, once no other
        call or stream runs on it (`finishing`: the stream whose handler is ending now)."""
        if not self._close_when_idle or self._ending or self.streams:
            return
        if self.tasks.keys() <= ({finishing} if finishing is not None else set()):
            self.writer.close()  # the read loop then sees the end and shuts the connection down

    async def _refuse(self, event: MessageRefused) -> None:
        """Answer a refused frame (over the size limit, or against its stream's rules) on its stream; a
        call already running there is given up (its client now holds the answer), and the connection
        serves on."""
        log.warning("ttrpc connection %d: %s on stream %d", self.id, event.message, event.stream_id)
        task = self.tasks.get(event.stream_id)
        if task is not None:
            task.cancel()
        stream = self.streams.pop(event.stream_id, None)
        if stream is not None:
            # With the error: a clean close reads as the client's half-close (a process's end of stdin).
            stream._inbox.close(from_code(event.code, event.message))
        await self.write(self.proto.refuse(event))

    def _start(self, event: NewRequest, received: int = 0) -> None:
        req = event.request
        route = self.server._routes.get(req.service, {}).get(req.method)
        stream = None
        if route is not None and route.request_type is None:
            # Registered before any later frame of this chunk is dispatched, so none is lost.
            stream = self.streams[event.stream_id] = ServerStream(self, event.stream_id)
            if req.payload or not event.flags & Flag.REMOTE_OPEN:
                # Without REMOTE_OPEN the payload *is* the client's message, even if empty.
                stream._inbox.put_nowait(req.payload)
            if not event.flags & Flag.REMOTE_OPEN:
                stream._inbox.close()
        task = asyncio.create_task(self._handle(event, route, stream, received),
                                   name=f"ttrpc /{req.service}/{req.method} #{event.stream_id}")
        self.tasks[event.stream_id] = task
        task.add_done_callback(lambda _t, sid=event.stream_id: self.tasks.pop(sid, None))

    async def _handle(self, event: NewRequest, route: _Route | None, stream: ServerStream | None,
                      started: int = 0) -> None:
        req, sid = event.request, event.stream_id
        try:
            payload = await self._invoke(event, route, stream)
        except KuasarError as err:
            response = status_response(err.code, err.message)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # aimed at us: the connection is going away
                raise
            # A cancellation escaping from inside the handler: still owe the client an answer.
            response = status_response(Code.CANCELLED, "handler cancelled")
        else:
            response = request_pb2.Response(payload=payload) if stream is None else None
        finally:
            if stream is not None:
                self.streams.pop(sid, None)
                stream._inbox.close()
        try:
            if response is None:  # a stream that ended well: Data REMOTE_CLOSED|NO_DATA, never a Response
                reply = self.proto.send_data(sid, None, end=True)
            else:
                reply = self._encode_response(sid, response)
            if started:  # the name is only made with timing on
                TIMING.done("ttrpc", f"{req.service.rpartition('.')[2]}/{req.method}", started)
            await self.write(reply)
        except (OSError, StreamClosed) as err:
            log.debug("ttrpc connection %d: reply to /%s/%s lost: %s", self.id, req.service, req.method, err)
        if route is not None and route.ends_connection and stream is not None:
            if stream.remote_closed or response is not None:  # (a Response ends the call for the client too)
                self._close_when_idle = True
                self._close_if_idle(finishing=sid)
            else:  # the client may still be reading what we sent: its half-close decides (the read loop)
                self._ending.add(sid)
        elif self._close_when_idle:  # the last of other calls that kept such a connection open
            self._close_if_idle(finishing=sid)

    async def _invoke(self, event: NewRequest, route: _Route | None, stream: ServerStream | None) -> bytes:
        """Run the handler; every failure comes out as a KuasarError carrying its status."""
        req = event.request
        if route is None:
            what = f"method {req.method}" if req.service in self.server._routes else f"service {req.service}"
            raise from_code(Code.UNIMPLEMENTED, what)
        ctx = self._context(req)
        if ctx.timeout == 0:  # expired before it came: run nothing (a timeout would fire only at an await)
            raise from_code(Code.DEADLINE_EXCEEDED, "deadline exceeded")
        scope = asyncio.timeout_at(ctx.deadline)
        try:
            async with scope:
                if stream is not None:
                    await route.handler(stream, ctx)
                    return b""
                assert route.request_type is not None
                try:
                    message = route.request_type.FromString(req.payload)
                except DecodeError as err:  # INTERNAL, as Go's ttrpc answers it
                    name = route.request_type.DESCRIPTOR.full_name
                    raise from_code(Code.INTERNAL, f"ttrpc: error unmarshalling payload ({name}): {err}") from None
                result = await route.handler(message, ctx)
            if isinstance(result, bytes):  # a relay's reply, serialized already by whoever answered it
                return result
            if not isinstance(result, Message):
                raise Internal(f"/{req.service}/{req.method} returned {type(result).__name__}, not a message")
            return result.SerializeToString()
        except KuasarError:
            raise
        except TimeoutError as err:
            if scope.expired():
                raise from_code(Code.DEADLINE_EXCEEDED, "deadline exceeded") from None
            raise self._unknown(req, err) from err
        except Exception as err:
            raise self._unknown(req, err) from err

    def _unknown(self, req: request_pb2.Request, err: Exception) -> KuasarError:
        log.error("ttrpc /%s/%s failed", req.service, req.method, exc_info=err)
        return from_code(Code.UNKNOWN, str(err))

    def _context(self, req: request_pb2.Request) -> Context:
        metadata: dict[str, list[str]] = {}
        for kv in req.metadata:  # keys are case-insensitive; Go lowercases them too
            metadata.setdefault(kv.key.lower(), []).append(kv.value)
        # Only 0 means no deadline: Go's client sends the time left, negative once its caller's
        # deadline has passed, and such a call must not run on as if it had none.
        timeout = max(req.timeout_nano, 0) / 1e9 if req.timeout_nano else None
        deadline = asyncio.get_running_loop().time() + timeout if timeout is not None else None
        return Context(req.service, req.method, MappingProxyType(metadata), timeout, deadline, self.id)

    def _encode_response(self, sid: int, response: request_pb2.Response) -> bytes:
        try:
            return self.proto.send_response(sid, response)
        except KuasarError as err:  # a reply too big to send becomes an error the client can see
            return self.proto.send_response(sid, status_response(err.code, err.message))

    async def _shutdown(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:  # the peer is gone or broken: nobody will read what handlers produce
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
            for task in stuck:
                log.warning("ttrpc connection %d: handler %s ignores cancellation", self.id, task.get_name())
        for stream in self.streams.values():
            stream._inbox.close()
        self.writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.writer.wait_closed()
        except (OSError, TimeoutError):
            self.writer.transport.abort()
        self.done.set()
        self.server._connection_closed(self)

    def abort(self) -> None:
        """Drop the transport; the reader then sees EOF and runs the normal shutdown."""
        self.writer.transport.abort()


class TtrpcServer:
    """Routes ttrpc calls to registered handlers over any number of listeners and connections.

    `on_connection_closed(connection_id)` runs after a connection's handlers are gone and its
    transport is closed (for owners that track peers, and for leak checks in tests).
    """

    def __init__(self, *, on_connection_closed: Callable[[int], None] | None = None) -> None:
        self.on_connection_closed = on_connection_closed
        self._routes: dict[str, dict[str, _Route]] = {}
        self._conns: dict[int, _ServerConn] = {}
        self._listeners: list[asyncio.Server] = []
        self._ids = itertools.count(1)
        self._closing = False

    def add_unary(self, service: str, method: str, request_type: type[Message],
                  handler: UnaryHandler) -> None:
        self._add(service, method, _Route(handler, request_type))

    def add_stream(self, service: str, method: str, handler: StreamHandler, *, ends_connection: bool = False) -> None:
        """With `ends_connection`, a connection is closed once such a stream is over in both directions (we
        ended it and the client half-closed it) and nothing else runs on it: for clients that dial a
        connection per stream and never close it (containerd before 2.3 for its streaming IO: every exec
        probe left two open connections, and the guest agent ran out of file descriptors after some
        hundreds). Not at our end alone: a client may still be reading, and sending window updates."""
        self._add(service, method, _Route(handler, None, ends_connection))

    def _add(self, service: str, method: str, route: _Route) -> None:
        methods = self._routes.setdefault(service, {})
        if method in methods:
            raise AlreadyExists(f"ttrpc method /{service}/{method} registered twice")
        methods[method] = route

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    @property
    def active_handlers(self) -> int:
        return sum(len(conn.tasks) for conn in self._conns.values())

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection until the peer leaves, breaks the protocol, or the server closes."""
        if self._closing:
            writer.close()
            return
        conn = _ServerConn(self, next(self._ids), reader, writer)
        self._conns[conn.id] = conn
        await conn.run()

    async def start_unix(self, path: str, mode: int = 0o600) -> None:
        """Listen on a unix socket at `path`, replacing a stale socket file left by a previous run."""
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
            else:
                raise AlreadyExists(f"{path} exists and is not a socket")
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            # Before listen(): until then connect() is refused, so no client sees the umask mode.
            os.chmod(path, mode)
            await self.add_listener(sock)
        except BaseException:
            sock.close()
            raise

    async def add_listener(self, sock: socket.socket) -> None:
        """Serve on an already-bound stream socket (unix, vsock, or one inherited across exec)."""
        self._listeners.append(await asyncio.start_server(self.serve_connection, sock=sock))

    async def close(self) -> None:
        """Stop listening, cancel every handler, close every connection."""
        self._closing = True
        for listener in self._listeners:
            listener.close()
        conns = list(self._conns.values())
        for conn in conns:
            conn.abort()
        if conns:
            await asyncio.wait([asyncio.create_task(c.done.wait()) for c in conns], timeout=2 * CLOSE_TIMEOUT)
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()

    def _connection_closed(self, conn: _ServerConn) -> None:
        self._conns.pop(conn.id, None)
        if self.on_connection_closed is not None:
            try:
                self.on_connection_closed(conn.id)
            except Exception:
                log.exception("ttrpc on_connection_closed callback failed")
