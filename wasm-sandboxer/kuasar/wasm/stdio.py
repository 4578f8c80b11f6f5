"""containerd's stdio FIFOs, opened by the task server and handed to the container process.

The container process holds the FIFO ends itself (dup'd onto its fds 0-2), so its output never
depends on the task server copying anything. There is no terminal: a WebAssembly module gets no pty.
"""

from __future__ import annotations

import os

from kuasar.common.errors import InvalidArgument, RuntimeFailure

from .launch import Stdio

NO_TERMINAL = ("terminal: true is not supported by the wasm sandboxer (a WebAssembly module has no "
               "pty); run the container without tty")


def _fifo_path(path: str, what: str) -> str:
    if "://" in path:
        raise InvalidArgument(f"{what} {path!r}: only FIFO paths are supported by the wasm sandboxer")
    if not os.path.isabs(path):
        raise InvalidArgument(f"{what} {path!r} must be an absolute path")
    return path


def open_stdio(stdin: str, stdout: str, stderr: str) -> Stdio:
    """Open the FIFOs (containerd already holds the other ends, so nothing blocks)."""
    stdio = Stdio()
    try:
        if stdin:
            stdio.stdin = os.open(_fifo_path(stdin, "stdin"), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.set_blocking(stdio.stdin, True)
        if stdout:
            stdio.stdout = os.open(_fifo_path(stdout, "stdout"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.set_blocking(stdio.stdout, True)
        if stderr:
            stdio.stderr = os.open(_fifo_path(stderr, "stderr"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.set_blocking(stdio.stderr, True)
    except OSError as exc:
        stdio.close()
        raise RuntimeFailure(f"opening stdio: {exc}") from None
    except BaseException:
        stdio.close()
        raise
    return stdio
