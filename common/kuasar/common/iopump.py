"""Copy bytes between two file descriptors on the event loop (pty master <-> containerd's fifos).

Both ends are switched to non-blocking mode so a reader that stalls (containerd not draining a fifo)
back-pressures this one pump instead of freezing the task server's loop.
"""

from __future__ import annotations

import asyncio
import errno
import os

# One read per wakeup; a pty delivers at most a few KiB at a time anyway.
CHUNK = 32 * 1024


class Pump:
    def __init__(self, src: int, dst: int, *, close_src: bool = True, close_dst: bool = True) -> None:
        self.src, self.dst = src, dst
        self._close_src, self._close_dst = close_src, close_dst
        os.set_blocking(src, False)
        os.set_blocking(dst, False)
        self.done = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run())
        # Closed when the task is done, not in its coroutine: a task cancelled before it first ran never
        # runs its coroutine at all (a process whose IO setup failed right after this pump was made).
        self._task.add_done_callback(self._finish)

    async def _wait(self, fd: int, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        add, remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
        add(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            remove(fd)

    async def _run(self) -> None:
        try:
            while True:
                try:
                    data = os.read(self.src, CHUNK)
                except BlockingIOError:
                    await self._wait(self.src, writable=False)
                    continue
                except OSError as exc:
                    if exc.errno == errno.EIO:  # pty master after the last slave closed: EOF
                        break
                    raise
                if not data:
                    break
                while data:
                    try:
                        written = os.write(self.dst, data)
                        data = data[written:]
                    except BlockingIOError:
                        await self._wait(self.dst, writable=True)
        except OSError:
            pass

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
