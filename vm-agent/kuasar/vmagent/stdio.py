"""Container stdio in the guest: pipes (or a pty) between runc's process and containerd's streams.

A stdio string is one of:

* `<address>?streaming_id=<id>` (containerd's `io_type = "streaming"`): the bytes travel over the
  `Streaming/Stream` call for that id (`kuasar.common.streaming_io`);
* an absolute guest path (a file, e.g. in the shared directory, or /dev/null): handed to runc;
* empty: /dev/null.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from kuasar.common.console import ConsoleReceiver
from kuasar.common.errors import InvalidArgument, RuntimeFailure
from kuasar.common.iopump import Source, write_all
from kuasar.common.runc_cli import Stdio
from kuasar.common.streaming_io import InputChannel, OutputChannel, StreamHub, streaming_id

# runc sends the pty master right after it creates the console; this only bounds a broken runc.
CONSOLE_TIMEOUT = 60.0
# How long stdin may still arrive after CloseIO without a terminal (see ProcessIO.close_stdin): what
# containerd sends before it, which is in flight for milliseconds.
STDIN_CLOSE_GRACE = 1.0


async def pump_out(source: Source, channel: OutputChannel, close_fd: bool = True) -> None:
    """Copy a pipe or pty master into an output channel until its end (see iopump.Source)."""
    try:
        await source.copy_to(channel.write)  # (which waits while the host is behind)
    finally:
        channel.close()
        if close_fd:
            os.close(source.fd)


async def pump_in(channel: InputChannel, fd: int) -> None:
    """Copy an input channel into a pipe or pty master until end of input; then close `fd`."""
    try:
        os.set_blocking(fd, False)
        while (data := await channel.read()) is not None:
            await write_all(fd, data)
    except OSError:
        pass  # the process closed its stdin
    finally:
        os.close(fd)


class ProcessIO(ConsoleReceiver):
    def __init__(self, hub: StreamHub, stdin: str = "", stdout: str = "", stderr: str = "",
                 terminal: bool = False) -> None:
        self.hub = hub
        self.stdin, self.stdout, self.stderr, self.terminal = stdin, stdout, stderr, terminal
        self.ids = [i for i in (self._stream(stdin), self._stream(stdout), self._stream(stderr)) if i]
        self._child_fds: list[int] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._unstarted: dict[asyncio.Task[None], int] = {}  # pumps yet to run, and the fd each is to own
        self._stdin_task: asyncio.Task[None] | None = None
        self._stdin_closed = False  # CloseIO came before the copy into the pty started (CRI's attach)
        self._pty_out: Source | None = None  # the copy out of the pty, which ends once the process exited
        self.exited = False
        self.master = -1
        self.size: tuple[int, int] | None = None
        self._console: socket.socket | None = None
        self.console_path: Path | None = None

    @staticmethod
    def _stream(url: str) -> str | None:
        if not url:
            return None
        sid = streaming_id(url)
        if sid is None:
            if "://" in url or not url.startswith("/"):
                raise InvalidArgument(f"stdio {url!r}: expected a streaming URL (?streaming_id=) or a guest path")
        return sid

    def _spawn(self, coro, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        return task

    def _spawn_pump(self, fd: int, pump: Callable[[int], Awaitable[None]], name: str) -> asyncio.Task[None]:
        """Run `pump(fd)`, whose finally closes `fd`. Until the pump's first step `fd` stays ours to
        close: a task cancelled before it ever ran never enters its coroutine, so never that finally."""
        async def run() -> None:
            self._unstarted.pop(task, None)
            await pump(fd)

        task = self._spawn(run(), name)
        self._unstarted[task] = fd
        return task

    def _cancel(self, task: asyncio.Task[None]) -> None:
        """Stop a pump; one that never ran has its fd closed here (it was never watched by the loop, so
        closing it now cannot race a reader or writer registered on that fd number)."""
        task.cancel()
        fd = self._unstarted.pop(task, None)
        if fd is not None:
            os.close(fd)

    # -- without a terminal: pipes ------------------------------------------------------------------
    def runc_stdio(self) -> Stdio:
        """Open the fds runc gives the process; the pumps start at once (output is buffered per id)."""
        stdio = Stdio()
        try:
            if self.stdin:
                stdio.stdin = self._input_fd(self.stdin)
            if self.stdout:
                stdio.stdout = self._output_fd(self.stdout)
            if self.stderr:
                stdio.stderr = self._output_fd(self.stderr)
        except OSError as err:
            self.close()
            raise RuntimeFailure(f"opening stdio: {err}") from None
        except BaseException:  # e.g. InvalidArgument for a stream id of the wrong direction
            self.close()
            raise
        return stdio

    # Each channel is looked up before its pipe is made (the hub may refuse the id), and each pipe end
    # is handed to its owner (the child fds, a pump) at once, so that close() finds every one.
    def _input_fd(self, url: str) -> int:
        sid = streaming_id(url)
        if sid is None:
            fd = os.open(url, os.O_RDONLY | os.O_CLOEXEC)
            self._child_fds.append(fd)
            return fd
        channel = self.hub.input(sid)
        fd, write_end = os.pipe()
        self._child_fds.append(fd)
        self._stdin_task = self._spawn_pump(write_end, partial(pump_in, channel), f"stdin {sid}")
        return fd

    def _output_fd(self, url: str) -> int:
        sid = streaming_id(url)
        if sid is None:
            fd = os.open(url, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            self._child_fds.append(fd)
            return fd
        channel = self.hub.output(sid)
        read_end, fd = os.pipe()
        self._child_fds.append(fd)
        self._spawn_pump(read_end, lambda end: pump_out(Source(end), channel), f"output {sid}")
        return fd

    def release_child_fds(self) -> None:
        """runc (and so the process) holds its ends now; drop ours so end of file can happen."""
        for fd in self._child_fds:
            os.close(fd)
        self._child_fds = []

    # -- with a terminal: runc's console socket (kuasar.common.console) ------------------------------
    async def receive_console(self) -> None:
        await self._receive_master(CONSOLE_TIMEOUT)
        out = streaming_id(self.stdout) if self.stdout else None
        if out is not None:
            channel = self.hub.output(out)
            self._pty_out = pty_out = Source(os.dup(self.master))
            self._spawn_pump(pty_out.fd, lambda _: pump_out(pty_out, channel), f"pty output {out}")
            if self.exited:
                pty_out.finish()
        sin = streaming_id(self.stdin) if self.stdin else None
        if sin is not None:
            stdin = self.hub.input(sin)
            self._stdin_task = self._spawn_pump(os.dup(self.master), partial(pump_in, stdin), f"pty stdin {sin}")
            if self._stdin_closed:
                self._close_input_later(stdin)

    def process_exited(self) -> None:
        """End the copy out of the pty once it has what the process left, so containerd sees the end of
        its output even while children it left hold the pty (as fifo_stdio.ProcessIO does). Without a
        terminal, as containerd's shim, output ends when every holder of the pipe has closed it."""
        self.exited = True
        if self._pty_out is not None:
            self._pty_out.finish()

    def close_stdin(self) -> None:
        # Our pump ends the process's input at the stream's half-close, which containerd sends just
        # before CloseIO, on the stream's own connection: the rest of the data and that half-close may
        # still be on their way, and stopping the pump now would drop them (a terminal's copy into the
        # pty was cancelled, and one not started yet lost its channel with what it held). A client that
        # never half-closes still gets its CloseIO: after STDIN_CLOSE_GRACE the channel is released, and
        # the pump ends once it has written what arrived.
        if self.terminal and self._stdin_task is None:
            self._stdin_closed = True  # the channel, and what it holds, waits for the copy (receive_console)
            return
        sid = streaming_id(self.stdin) if self.stdin else None
        channel = self.hub.channels.get(sid) if sid is not None else None
        if channel is not None and self._stdin_task is not None and not self._stdin_task.done():
            self._close_input_later(channel)

    def _close_input_later(self, channel: InputChannel | OutputChannel) -> None:
        asyncio.get_running_loop().call_later(STDIN_CLOSE_GRACE, self._end_input, channel)

    def _end_input(self, channel: InputChannel | OutputChannel) -> None:
        if self.hub.channels.get(channel.id) is channel:  # not a later process's of the same id
            self.hub.release(channel.id)

    async def drain_output(self, timeout: float) -> None:  # noqa: ASYNC109
        """The process is gone (a Delete): give the output pumps up to `timeout` to deliver what it
        left and reach their end (see fifo_stdio.ProcessIO.drain_output)."""
        self.process_exited()
        pending = [t for t in self._tasks if t is not self._stdin_task and not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    def close(self) -> None:
        """The process is deleted: stop pumping and forget its streams."""
        self.release_child_fds()
        for task in self._tasks:
            self._cancel(task)
        self._tasks = []
        self._close_console()
        for sid in self.ids:
            self.hub.release(sid)
