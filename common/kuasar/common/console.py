"""Container stdio helpers shared by the sandboxers: containerd's FIFOs, and runc's console socket.

* A FIFO path from containerd is checked (absolute, no URL) and opened without waiting for the other
  end (containerd already holds it), then made blocking for the process that inherits it.
* With a terminal, runc creates the pty and passes its master over a unix socket
  (`--console-socket`); `ConsoleReceiver` listens there, takes the master and applies the window size.
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
from pathlib import Path

from .errors import InvalidArgument, RuntimeFailure

log = logging.getLogger(__name__)


def fifo_path(path: str, what: str, sandboxer: str = "this sandboxer") -> str:
    """`path` if it is an absolute FIFO path (`what`: stdin, stdout, ... for the message)."""
    if "://" in path:
        raise InvalidArgument(f"{what} {path!r}: only FIFO paths are supported by {sandboxer}")
    if not os.path.isabs(path):
        raise InvalidArgument(f"{what} {path!r} must be an absolute path")
    return path


def open_fifo(path: str, flags: int, what: str, sandboxer: str = "this sandboxer") -> int:
    """Open one of containerd's FIFOs without waiting for its other end; the fd returned blocks."""
    path = fifo_path(path, what, sandboxer)
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.ENXIO or flags & os.O_ACCMODE != os.O_WRONLY:
            raise
        # No reader yet: containerd's fifo package opens its read end in a goroutine, so it can still
        # be on its way (seen under pod churn). Read-write never waits for a reader, and as the process
        # then holds a read end itself its first writes wait in the pipe instead of failing with EPIPE.
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        log.debug("%s has no reader yet; opened it read-write", path)
    os.set_blocking(fd, True)
    return fd


class ConsoleReceiver:
    """The terminal half of a process's IO: runc's console socket, the pty master and its window size.

    A class using it sets `terminal`, `master` (-1), `size` (None), `_console` (None) and
    `console_path` (None).
    """

    terminal: bool
    master: int
    size: tuple[int, int] | None  # (width, height) asked for before the console existed
    _console: socket.socket | None
    console_path: Path | None

    def listen_console(self, path: Path) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        path.unlink(missing_ok=True)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(1)
        sock.setblocking(False)
        self._console, self.console_path = sock, path

    async def _receive_master(self, timeout: float) -> None:  # noqa: ASYNC109
        """Take the pty master runc sends (within `timeout` seconds), then apply a pending size."""
        assert self._console is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
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

    def _close_console_socket(self) -> None:
        if self._console is not None:
            self._console.close()
            self._console = None
        if self.console_path is not None:
            self.console_path.unlink(missing_ok=True)

    def _close_console(self) -> None:
        """The process is done with its terminal: the socket (if still listening) and the master."""
        self._close_console_socket()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def resize(self, width: int, height: int) -> None:
        # Without a terminal there is nothing to size: containerd's shims answer such a ResizePty
        # with success, and clients (ctr, nerdctl) may send one on a window change regardless.
        if not self.terminal:
            return
        self.size = (width, height)
        if self.master >= 0:  # else applied as soon as runc hands over the console
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height & 0xFFFF, width & 0xFFFF, 0, 0))
