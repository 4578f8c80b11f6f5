"""Container stdio: containerd's FIFOs handed straight to the runtime (runc, runsc), or a pty copied
to and from them.

Without a terminal the container holds the FIFO ends itself, so its output does not depend on the
task server copying anything. With a terminal the runtime passes the pty master over a console socket
and the task server pumps bytes between it and the FIFOs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from .console import ConsoleReceiver, open_fifo
from .errors import RuntimeFailure
from .iopump import Pump
from .runc_cli import Stdio

log = logging.getLogger(__name__)

# The runtime sends the pty master right after it creates the console; this only bounds a broken one.
CONSOLE_TIMEOUT = 30.0


def open_fifo_for_writing(path: str) -> int:
    return open_fifo(path, os.O_WRONLY, "stdout/stderr")


def open_fifo_for_reading(path: str) -> int:
    return open_fifo(path, os.O_RDONLY, "stdin")


@dataclass
class ProcessIO(ConsoleReceiver):
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    fds: list[int] = field(default_factory=list)
    readers: list[int] = field(default_factory=list)  # our read ends of the output FIFOs, kept to the end
    master: int = -1
    pumps: list[Pump] = field(default_factory=list)
    stdin_pump: Pump | None = None  # the copy into the pty (of `pumps`), which CloseIO finishes
    stdin_writer: int = -1  # our write end of the stdin FIFO, which CloseIO closes (see _hold_stdin)
    stdin_closed: bool = False  # CloseIO came (it may come before Start opens the FIFOs: CRI's attach)
    console_path: Path | None = None
    size: tuple[int, int] | None = None  # (width, height) asked for before the console existed
    exited: bool = False  # the process exited: the copy out of its pty ends once it has what it left
    _console: socket.socket | None = None

    def runc_stdio(self) -> Stdio:
        """Open the FIFOs for a non-terminal process (our copies are closed once runc has them)."""
        stdio = Stdio()
        try:
            if self.stdin:
                stdio.stdin = open_fifo_for_reading(self.stdin)
                self.fds.append(stdio.stdin)
                self._hold_stdin()
            if self.stdout:
                stdio.stdout = open_fifo_for_writing(self.stdout)
                self.fds.append(stdio.stdout)
            if self.stderr:
                stdio.stderr = open_fifo_for_writing(self.stderr)
                self.fds.append(stdio.stderr)
            self._hold_readers()
        except OSError as exc:
            self.close()
            raise RuntimeFailure(f"opening stdio: {exc}") from None
        except BaseException:  # a path refused (not a FIFO path): what was opened before it goes too
            self.close()
            raise
        return stdio

    async def receive_console(self) -> None:
        """Take the pty master the runtime sends and start copying it to/from the FIFOs."""
        await self._receive_master(CONSOLE_TIMEOUT)
        self._pump_console()

    def attach_master(self, master: int) -> None:
        """Use a pty master made here (for a runtime that takes its terminal from its own stdio)."""
        self.master = master
        if self.size is not None:
            self.resize(*self.size)
        self._pump_console()

    def _pump_console(self) -> None:
        if self.stdout:
            out = open_fifo_for_writing(self.stdout)
            self.pumps.append(Pump(self.master, out, close_src=False))
            self._hold_readers()
            if self.exited:
                self.pumps[-1].finish()
        if self.stdin:
            stdin = open_fifo_for_reading(self.stdin)
            self._hold_stdin()
            self.stdin_pump = Pump(stdin, os.dup(self.master))
            self.pumps.append(self.stdin_pump)

    def process_exited(self) -> None:
        """End the copy out of the pty once it has what the process left (iopump.Pump.finish), so that
        containerd sees the end of its output even while children it left hold the pty (`sleep 100 &`
        in `kubectl exec -it`, whose session would otherwise hang), as containerd's shim shuts its
        console down when the process exits. Without a terminal the process's FIFOs are its own."""
        self.exited = True
        for pump in self._output_pumps():
            pump.finish()

    def _output_pumps(self) -> list[Pump]:
        return [pump for pump in self.pumps if pump is not self.stdin_pump]

    async def drain_output(self, timeout: float) -> None:  # noqa: ASYNC109
        """The process is gone (a Delete): give the copy out of the pty up to `timeout` to deliver what
        it left to containerd (a reader behind, a pty buffer not yet read) before the IO is closed.
        Also for an exit that was recorded but never published (a start that failed)."""
        self.process_exited()
        pending = [pump.done for pump in self._output_pumps() if not pump.done.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    def _hold_readers(self) -> None:
        """Keep a read end of each output FIFO for as long as the process lives, as containerd's shim
        does: while containerd restarts nobody else reads them, and a write to a FIFO without a reader
        kills the writer with SIGPIPE (or, for our pty copy, ends it). With ours held, output waits in
        the FIFO (then the writer waits) until containerd opens it again. We never read from it."""
        for path in dict.fromkeys(p for p in (self.stdout, self.stderr) if p):  # once each, stdout may be stderr
            self.readers.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))

    def _hold_stdin(self) -> None:
        """Keep a write end of the stdin FIFO until CloseIO, as containerd's shim does: the process (or
        our copy into its pty) then sees end of input only when both containerd is done with it and
        CloseIO says so, not when containerd merely goes away (a restart, a crash) and its end with
        it. A `sh` reading it would exit; our pty copy would end for good. A containerd that comes
        back opens the FIFO again."""
        if self.stdin_writer < 0 and not self.stdin_closed:
            self.stdin_writer = os.open(self.stdin, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def close_stdin(self) -> None:
        self.stdin_closed = True
        if self.terminal and self.stdin_pump is not None:
            # What containerd wrote before it closed its end is copied into the pty first (cancelled, the
            # copy dropped it: `echo cmd | kubectl exec -it` lost all of it); then the copy ends, as it
            # must even while someone else holds the FIFO's write end open.
            self.stdin_pump.finish()
        self._drop_stdin_writer()

    def _drop_stdin_writer(self) -> None:
        writer, self.stdin_writer = self.stdin_writer, -1
        if writer >= 0:
            os.close(writer)

    def release_fds(self) -> None:
        """runc (and so the container) now holds the FIFOs; drop our copies."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def close(self) -> None:
        pumps, self.pumps = self.pumps, []
        for pump in pumps:
            pump.cancel()
        self.release_fds()
        readers, self.readers = self.readers, []
        for fd in readers:
            os.close(fd)
        self._drop_stdin_writer()
        running = [pump.done for pump in pumps if not pump.done.done()]
        if running and self.master >= 0:
            # A cancelled copy stops watching the master only when its task unwinds, a loop turn later;
            # closed before, the master's number could be another fd's by then, whose watch that
            # would remove.
            master, self.master = self.master, -1
            asyncio.gather(*running).add_done_callback(lambda _: os.close(master))
        self._close_console()

