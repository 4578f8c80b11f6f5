"""containerd's stdio FIFOs, opened by the task server and handed to the container process.

The container process holds the FIFO ends itself (dup'd onto its fds 0-2), so its output never
depends on the task server copying anything. There is no terminal: a WebAssembly module gets no pty.
"""

from __future__ import annotations

import os

from kuasar.common.console import open_fifo
from kuasar.common.errors import RuntimeFailure

from .launch import Stdio

NO_TERMINAL = ("terminal: true is not supported by the wasm sandboxer (a WebAssembly module has no "
               "pty); run the container without tty")
SANDBOXER = "the wasm sandboxer"


def open_stdio(stdin: str, stdout: str, stderr: str) -> Stdio:
    """Open the FIFOs (containerd already holds the other ends, so nothing blocks)."""
    stdio = Stdio()
    try:
        if stdin:
            stdio.stdin = open_fifo(stdin, os.O_RDONLY, "stdin", SANDBOXER)
        if stdout:
            stdio.stdout = open_fifo(stdout, os.O_WRONLY, "stdout", SANDBOXER)
        if stderr:
            stdio.stderr = open_fifo(stderr, os.O_WRONLY, "stderr", SANDBOXER)
    except OSError as exc:
        stdio.close()
        raise RuntimeFailure(f"opening stdio: {exc}") from None
    except BaseException:
        stdio.close()
        raise
    return stdio
