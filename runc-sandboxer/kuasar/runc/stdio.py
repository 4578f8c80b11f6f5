"""Container stdio: containerd's FIFOs handed straight to runc, or a pty copied to and from them.

Without a terminal the container holds the FIFO ends itself, so its output does not depend on the
task server copying anything. With a terminal runc passes the pty master over a console socket and
the task server pumps bytes between it and the FIFOs.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
import struct
import termios
from dataclasses import dataclass, field
from pathlib import Path

from kuasar.common.errors import InvalidArgument, RuntimeFailure
from kuasar.common.iopump import Pump

from .runc import Stdio

log = logging.getLogger(__name__)

# runc sends the pty master right after it creates the console; this only bounds a broken runc.
CONSOLE_TIMEOUT = 30.0


def _fifo_path(path: str, what: str) -> str:
    if "://" in path:
        raise InvalidArgument(f"{what} {path!r}: only FIFO paths are supported by this sandboxer")
    if not os.path.isabs(path):
        raise InvalidArgument(f"{what} {path!r} must be an absolute path")
    return path


def open_fifo_for_writing(path: str) -> int:
    path = _fifo_path(path, "stdout/stderr")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise
        # No reader yet: containerd's fifo package opens its read end in a goroutine, so it can still
        # be on its way (seen under pod churn). Read-write never waits for a reader, and as the process
        # then holds a read end itself its first writes wait in the pipe instead of failing with EPIPE.
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        log.debug("%s has no reader yet; opened it read-write", path)
    os.set_blocking(fd, True)
    return fd


def open_fifo_for_reading(path: str) -> int:
    # CRI opens the writing end at CreateContainer, before Task.Create, so the container sees end of
    # input exactly when containerd closes its end.
    fd = os.open(_fifo_path(path, "stdin"), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(fd, True)
    return fd


@dataclass
class ProcessIO:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    fds: list[int] = field(default_factory=list)
    master: int = -1
    pumps: list[Pump] = field(default_factory=list)
    console_path: Path | None = None
    size: tuple[int, int] | None = None  # (width, height) asked for before the console existed
    _console: socket.socket | None = None

    def runc_stdio(self) -> Stdio:
        """Open the FIFOs for a non-terminal process (our copies are closed once runc has them)."""
        stdio = Stdio()
        try:
            if self.stdin:
                stdio.stdin = open_fifo_for_reading(self.stdin)
                self.fds.append(stdio.stdin)
            if self.stdout:
                stdio.stdout = open_fifo_for_writing(self.stdout)
                self.fds.append(stdio.stdout)
            if self.stderr:
                stdio.stderr = open_fifo_for_writing(self.stderr)
                self.fds.append(stdio.stderr)
        except OSError as exc:
            self.close()
            raise RuntimeFailure(f"opening stdio: {exc}") from None
        return stdio

    def listen_console(self, path: Path) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        path.unlink(missing_ok=True)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(1)
        sock.setblocking(False)
        self._console, self.console_path = sock, path

    async def receive_console(self) -> None:
        """Take the pty master runc sends and start copying it to/from the FIFOs."""
        assert self._console is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONSOLE_TIMEOUT):
                conn, _ = await loop.sock_accept(self._console)
                with conn:
                    ready = loop.create_future()
                    loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
                    try:
                        await ready
                    finally:
                        loop.remove_reader(conn.fileno())
                    _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        finally:
            self._close_console_socket()
        if not fds:
            raise RuntimeFailure("runc sent no console")
        self.master = fds[0]
        if self.size is not None:
            self.resize(*self.size)
        if self.stdout:
            out = open_fifo_for_writing(self.stdout)
            self.pumps.append(Pump(self.master, out, close_src=False))
        if self.stdin:
            stdin = open_fifo_for_reading(self.stdin)
            self.pumps.append(Pump(stdin, os.dup(self.master)))

    def _close_console_socket(self) -> None:
        if self._console is not None:
            self._console.close()
            self._console = None
        if self.console_path is not None:
            self.console_path.unlink(missing_ok=True)

    def resize(self, width: int, height: int) -> None:
        if not self.terminal:
            raise InvalidArgument("process has no terminal")
        self.size = (width, height)
        if self.master >= 0:  # else applied as soon as runc hands over the console
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def close_stdin(self) -> None:
        if self.terminal and len(self.pumps) > 1:
            self.pumps[1].cancel()

    def release_fds(self) -> None:
        """runc (and so the container) now holds the FIFOs; drop our copies."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def close(self) -> None:
        self.release_fds()
        self._close_console_socket()
        for pump in self.pumps:
            pump.cancel()
        self.pumps = []
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

