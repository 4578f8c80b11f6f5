"""Container stdio in the guest: pipes (or a pty) between runc's process and containerd's streams.

A stdio string is one of:

* `<address>?streaming_id=<id>` (containerd's `io_type = "streaming"`): the bytes travel over the
  `Streaming/Stream` call for that id (`kuasar.common.streaming_io`);
* an absolute guest path (a file, e.g. in the shared directory, or /dev/null): handed to runc;
* empty: /dev/null.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from pathlib import Path

from kuasar.common.console import ConsoleReceiver
from kuasar.common.errors import InvalidArgument, RuntimeFailure
from kuasar.common.runc_cli import Stdio
from kuasar.common.streaming_io import InputChannel, OutputChannel, StreamHub, streaming_id

CHUNK = 32 * 1024
# runc sends the pty master right after it creates the console; this only bounds a broken runc.
CONSOLE_TIMEOUT = 60.0


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_writer(fd)


async def pump_out(fd: int, channel: OutputChannel, close_fd: bool = True) -> None:
    """Copy a pipe or pty master into an output channel until end of file (EIO on a pty)."""
    os.set_blocking(fd, False)
    try:
        while True:
            try:
                data = os.read(fd, CHUNK)
            except BlockingIOError:
                await _readable(fd)
                continue
            except OSError as err:
                if err.errno == errno.EIO:
                    break
                raise
            if not data:
                break
            await channel.write(data)
    finally:
        channel.close()
        if close_fd:
            os.close(fd)


async def pump_in(channel: InputChannel, fd: int) -> None:
    """Copy an input channel into a pipe or pty master until end of input; then close `fd`."""
    os.set_blocking(fd, False)
    try:
        while (data := await channel.read()) is not None:
            while data:
                try:
                    data = data[os.write(fd, data):]
                except BlockingIOError:
                    await _writable(fd)
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
        self._stdin_task: asyncio.Task[None] | None = None
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
        return stdio

    def _input_fd(self, url: str) -> int:
        sid = streaming_id(url)
        if sid is None:
            fd = os.open(url, os.O_RDONLY | os.O_CLOEXEC)
        else:
            fd, write_end = os.pipe()
            self._stdin_task = self._spawn(pump_in(self.hub.input(sid), write_end), f"stdin {sid}")
        self._child_fds.append(fd)
        return fd

    def _output_fd(self, url: str) -> int:
        sid = streaming_id(url)
        if sid is None:
            fd = os.open(url, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        else:
            read_end, fd = os.pipe()
            self._spawn(pump_out(read_end, self.hub.output(sid)), f"output {sid}")
        self._child_fds.append(fd)
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
            self._spawn(pump_out(os.dup(self.master), self.hub.output(out)), f"pty output {out}")
        sin = streaming_id(self.stdin) if self.stdin else None
        if sin is not None:
            self._stdin_task = self._spawn(pump_in(self.hub.input(sin), os.dup(self.master)), f"pty stdin {sin}")

    def close_stdin(self) -> None:
        if self._stdin_task is not None:
            self._stdin_task.cancel()  # its finally closes the write end: the process sees EOF
        elif self.stdin:
            sid = streaming_id(self.stdin)
            if sid is not None:
                self.hub.release(sid)

    async def wait_output(self, timeout: float) -> None:  # noqa: ASYNC109
        """Give the output pumps up to `timeout` to reach end of file (after the process exited)."""
        pending = [t for t in self._tasks if t is not self._stdin_task and not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    def close(self) -> None:
        """The process is deleted: stop pumping and forget its streams."""
        self.release_child_fds()
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self._close_console()
        for sid in self.ids:
            self.hub.release(sid)
