"""A real TtrpcServer on a unix socket, served by an event loop in a background thread.

For tests whose client side is synchronous (raw sockets, or code that calls `asyncio.run` itself, like
the shim helper's `main`). The loop's exception handler records anything that escapes a task, so a test
can assert the server never crashed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from kuasar.common.ttrpc import TtrpcServer

T = TypeVar("T")

START_TIMEOUT = 10.0


class ThreadedTtrpcServer:
    """`setup(server)` registers services (it runs in the server's loop, so it may create asyncio objects)."""

    def __init__(self, setup: Callable[[TtrpcServer], None]) -> None:
        self._setup = setup
        # pytest's tmp_path can exceed the 108-byte sun_path limit; keep the socket path short.
        self.directory = tempfile.mkdtemp(prefix="ttrpc-", dir="/tmp")
        self.path = os.path.join(self.directory, "task.sock")
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._on_loop_error)
        self.loop_errors: list[dict[str, Any]] = []
        self.server: TtrpcServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="ttrpc-server", daemon=True)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.loop_errors.append(context)
        loop.default_exception_handler(context)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = START_TIMEOUT) -> T:
        """Run `coro` in the server's loop and return its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def call_soon(self, fn: Callable[[], Awaitable[T] | T]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def start(self) -> ThreadedTtrpcServer:
        self._thread.start()

        async def start() -> None:
            self.server = TtrpcServer()
            self._setup(self.server)
            await self.server.start_unix(self.path)

        self.run(start())
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.loop.is_running()

    def stop(self) -> None:
        if self.server is not None and self.alive:
            self.run(self.server.close(), timeout=30)
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> ThreadedTtrpcServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
