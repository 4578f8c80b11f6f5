"""The bounded per-stream receive buffer shared by server and client streams."""

from __future__ import annotations

import asyncio
from collections import deque

from kuasar.common.errors import KuasarError, ResourceExhausted

# Messages buffered per stream before the connection's reader waits for the consumer. Go ttrpc
# buffers 64 (`streamRecvBufferSize`), Rust ttrpc 100; 64 matches the peer containerd runs.
STREAM_RECV_BUFFER = 64
# How long the connection's reader waits for room before giving up on the stream. Go's value
# (1 s): long enough to ride out a busy consumer, short enough that one stuck stream does not
# stall every other stream on the connection for long.
STREAM_FULL_TIMEOUT = 1.0


class Inbox:
    """Messages for one stream: one producer (the connection reader), one consumer (recv)."""

    def __init__(self, limit: int = STREAM_RECV_BUFFER) -> None:
        self._limit = limit
        self._items: deque[bytes] = deque()
        self._closed = False
        self._error: KuasarError | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed

    async def put(self, payload: bytes) -> None:
        """Queue a message; messages after close are dropped. If the consumer leaves the buffer
        full for STREAM_FULL_TIMEOUT, the stream fails with RESOURCE_EXHAUSTED (as in Go)."""
        if self._closed:
            return
        if len(self._items) >= self._limit:
            self._writable.clear()
            try:
                async with asyncio.timeout(STREAM_FULL_TIMEOUT):
                    while len(self._items) >= self._limit and not self._closed:
                        await self._writable.wait()
                        self._writable.clear()
            except TimeoutError:
                self.close(ResourceExhausted(f"stream receive buffer full ({self._limit} messages)"))
                return
            if self._closed:
                return
        self._items.append(payload)
        self._readable.set()

    def put_nowait(self, payload: bytes) -> None:
        """Queue a message ignoring the limit: for the one a stream starts with."""
        self._items.append(payload)
        self._readable.set()

    def close(self, error: KuasarError | None = None) -> None:
        """No more messages. Queued ones are still delivered; then get() returns None, or raises
        `error` if the stream ended badly. The first close wins."""
        if self._closed:
            return
        self._closed = True
        self._error = error
        self._readable.set()
        self._writable.set()

    async def get(self) -> bytes | None:
        while not self._items:
            if self._closed:
                if self._error is not None:
                    raise self._error
                return None
            self._readable.clear()
            await self._readable.wait()
        payload = self._items.popleft()
        self._writable.set()
        return payload
