"""Copy bytes between two file descriptors on the event loop (pty master <-> containerd's fifos).

Both ends are switched to non-blocking mode so a reader that stalls (containerd not draining a fifo)
back-pressures this one pump instead of freezing the task server's loop.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Callable
from functools import partial

# One read per wakeup; a pty delivers at most a few KiB at a time anyway.
CHUNK = 32 * 1024
# After the process on the far side of a pty exited, what it wrote last reaches the master a moment
# later (the kernel pushes a pty's buffer from a work queue): a finishing read stops at the first lull
# this long, not at the first empty read.
FINISH_LULL = 0.05
# ... and after this long of reading at the latest (time spent waiting for the reader does not count):
# children the process left may write on for ever (`sleep 100 &` in an interactive shell), and their
# output is not the process's.
FINISH_LIMIT = 1.0


async def wait_fd(fd: int, writable: bool, waiting: list[asyncio.Future[None]] | None = None) -> None:
    """Wait until `fd` is readable (writable); the wait's future is in `waiting` meanwhile, for whoever
    needs to end it early."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
    add(fd, lambda: ready.done() or ready.set_result(None))
    if waiting is not None:
        waiting.append(ready)
    try:
        await ready
    finally:
        remove(fd)
        if waiting is not None:
            waiting.remove(ready)


async def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to a non-blocking fd, waiting on the loop while it is full."""
    while data:
        try:
            data = data[os.write(fd, data):]
        except BlockingIOError:
            await wait_fd(fd, writable=True)


class Source:
    """Reads of a non-blocking fd (a pipe, or a pty master), awaited on the loop, which end at end of
    file, at EIO (a pty master once the last slave closed), or, once told that the process writing
    into it exited (`finish`), at the first lull."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._finish_by: float | None = None
        self._waiting: list[asyncio.Future[None]] = []

    async def read(self) -> bytes:
        """The next bytes; b"" at the end."""
        while True:
            data = self._read_now()
            if data is not None:
                return data
            if not await self._readable():
                # One more read once a finished source fell quiet: data that came while the loop was busy
                # (its readiness and the lull's end due in the same turn) is still read, not left in the pty.
                return self._read_now() or b""

    def _read_now(self) -> bytes | None:
        """What the fd holds now: b"" at its end (end of file, or EIO), None when nothing came yet."""
        try:
            return os.read(self.fd, CHUNK)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise

    async def copy_to(self, write: Callable[[bytes], Awaitable[object]]) -> None:
        """Hand everything read to `write` until the end. Time `write` spends waiting for its reader does
        not count against FINISH_LIMIT: what the process left must not be cut off because containerd
        or a client reads slowly."""
        loop = asyncio.get_running_loop()
        while data := await self.read():
            writing_from = loop.time()
            await write(data)
            if self._finish_by is not None:
                self._finish_by += loop.time() - writing_from
                if loop.time() >= self._finish_by:
                    return
            # One loop turn per chunk: a pty that always has output and a reader that always takes it
            # would otherwise keep every other pod's calls, exits and copies waiting.
            await asyncio.sleep(0)

    async def _readable(self) -> bool:
        if self._finish_by is None:
            await wait_fd(self.fd, False, self._waiting)  # finish() may end this early
            return True
        left = self._finish_by - asyncio.get_running_loop().time()
        if left <= 0:
            return False
        try:
            async with asyncio.timeout(min(FINISH_LULL, left)):
                await wait_fd(self.fd, False, self._waiting)
        except TimeoutError:
            return False
        return True

    def finish(self) -> None:
        """The process writing into this fd exited: what it left is read, then the reads end, even
        while others still hold the pty's far side open."""
        if self._finish_by is not None:
            return
        self._finish_by = asyncio.get_running_loop().time() + FINISH_LIMIT
        for ready in self._waiting:
            if not ready.done():
                ready.set_result(None)  # read again now: empty then, the lull decides


class Pump:
    def __init__(self, src: int, dst: int, *, close_src: bool = True, close_dst: bool = True) -> None:
        self.src, self.dst = src, dst
        self.source = Source(src)
        self._close_src, self._close_dst = close_src, close_dst
        os.set_blocking(dst, False)
        self.done = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run())
        # Closed when the task is done, not in its coroutine: a task cancelled before it first ran never
        # runs its coroutine at all (a process whose IO setup failed right after this pump was made).
        self._task.add_done_callback(self._finish)

    async def _run(self) -> None:
        try:
            await self.source.copy_to(partial(write_all, self.dst))
        except OSError:
            pass

    def finish(self) -> None:
        """The process writing into `src` exited: copy what it left, then end (see Source.finish)."""
        self.source.finish()

    def _finish(self, task: asyncio.Task[None]) -> None:
        self._close()
        if not self.done.done():
            self.done.set_result(None)

    def _close(self) -> None:
        for fd, wanted in ((self.src, self._close_src), (self.dst, self._close_dst)):
            if wanted:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def cancel(self) -> None:
        self._task.cancel()
