"""containerd's stdio FIFOs, opened so the runtime process (and through it the container) holds them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kuasar.common.errors import InvalidArgument, RuntimeFailure

from .runsc import Stdio


def _fifo_path(path: str, what: str) -> str:
    if "://" in path:
        raise InvalidArgument(f"{what} {path!r}: only FIFO paths are supported by this sandboxer")
    if not os.path.isabs(path):
        raise InvalidArgument(f"{what} {path!r} must be an absolute path")
    return path


def _open(path: str, flags: int, what: str) -> int:
    # containerd (CRI) already holds the other end, so a non-blocking open succeeds at once.
    fd = os.open(_fifo_path(path, what), flags | os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(fd, True)
    return fd


@dataclass
class FifoIO:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    fds: list[int] = field(default_factory=list)

    def open(self) -> Stdio:
        """Open the FIFOs; close our copies with `release` once the runtime process has them."""
        stdio = Stdio()
        try:
            if self.stdin:
                stdio.stdin = _open(self.stdin, os.O_RDONLY, "stdin")
                self.fds.append(stdio.stdin)
            if self.stdout:
                stdio.stdout = _open(self.stdout, os.O_WRONLY, "stdout")
                self.fds.append(stdio.stdout)
            if self.stderr:
                stdio.stderr = _open(self.stderr, os.O_WRONLY, "stderr")
                self.fds.append(stdio.stderr)
        except OSError as exc:
            self.release()
            raise RuntimeFailure(f"opening stdio: {exc}") from None
        return stdio

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
