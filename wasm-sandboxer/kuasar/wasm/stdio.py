"""containerd's stdio FIFOs, opened by the task server and handed to a container process without a
terminal.

The container process holds the FIFO ends itself (dup'd onto its fds 0-2), so its output never
depends on the task server copying anything. (A process with a terminal gets a pty instead: tasks.py.)
"""

from __future__ import annotations

import os

from kuasar.common.console import open_fifo
from kuasar.common.errors import RuntimeFailure

from .launch import Stdio

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
