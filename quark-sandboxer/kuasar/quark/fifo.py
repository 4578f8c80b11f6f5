"""containerd's stdio FIFOs, opened so the runtime process (and through it the container) holds them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kuasar.common.console import open_fifo
from kuasar.common.errors import RuntimeFailure

from .runsc import Stdio


@dataclass
class FifoIO:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    fds: list[int] = field(default_factory=list)

    def open(self) -> Stdio:
        """Open the FIFOs; close our copies with `release` once the runtime process has them.

        containerd (CRI) already holds the other ends, so the non-blocking opens succeed at once.
        """
        stdio = Stdio()
        try:
            if self.stdin:
                stdio.stdin = open_fifo(self.stdin, os.O_RDONLY, "stdin")
                self.fds.append(stdio.stdin)
            if self.stdout:
                stdio.stdout = open_fifo(self.stdout, os.O_WRONLY, "stdout")
                self.fds.append(stdio.stdout)
            if self.stderr:
                stdio.stderr = open_fifo(self.stderr, os.O_WRONLY, "stderr")
                self.fds.append(stdio.stderr)
        except OSError as exc:
            self.release()
            raise RuntimeFailure(f"opening stdio: {exc}") from None
        return stdio

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
