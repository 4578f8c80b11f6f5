"""Helper processes of a VM (QEMU, vhost-device-vsock, the task proxy): start, identify, watch, stop.

Each runs in its own session so it outlives a restart of the sandboxer, and is known by its pid plus
its start time (`/proc/<pid>/stat` field 22), so a recycled pid is never mistaken for it. Exits are
observed with a pidfd: for our own children the exit status comes from `waitpid`; for processes we
re-attached to after a restart (no longer our children) only the fact of the exit is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kuasar.common import proc_stat, strays

log = logging.getLogger(__name__)


@dataclass
class ProcessRef:
    """A process we started: pid plus start time (identity across pid reuse)."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        return cls(pid, proc_stat.start_time(pid))

    @classmethod
    def from_json(cls, data: Any) -> ProcessRef | None:
        if not isinstance(data, dict) or not data.get("pid"):
            return None
        return cls(int(data["pid"]), int(data.get("start", 0)))

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    def alive(self) -> bool:
        """Still this very process (and not a zombie)."""
        return self.pid > 0 and not strays.gone(self.pid, self.start)

    def signal(self, sig: int) -> bool:
        if not self.alive():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True


def exit_status(returncode: int) -> int:
    """Popen's returncode in the shell convention (128 + signal for a death by signal)."""
    return 128 - returncode if returncode < 0 else returncode


def spawn(argv: Sequence[str], log_path: Path, pass_fds: Sequence[int] = (),
          env: dict[str, str] | None = None, executable: str | None = None) -> subprocess.Popen:
    """Start `argv` (no shell) in a new session, stdin from /dev/null, output appended to `log_path`."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(list(argv), executable=executable, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, pass_fds=tuple(pass_fds),
                                close_fds=True, env=env)


class ExitWatch:
    """A future that completes when a process exits: its status (children) or None (adopted)."""

    def __init__(self, ref: ProcessRef, popen: subprocess.Popen | None = None) -> None:
        self.ref = ref
        self.popen = popen
        loop = asyncio.get_running_loop()
        self.future: asyncio.Future[int | None] = loop.create_future()
        self._fd = -1
        try:
            self._fd = os.pidfd_open(ref.pid)
        except ProcessLookupError:
            self._finish()
            return
        if popen is None and not ref.alive():  # gone (or recycled) before we looked
            self._finish()
            return
        loop.add_reader(self._fd, self._finish)

    def _finish(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        status: int | None = None
        if self.popen is not None:
            try:
                status = exit_status(self.popen.wait(timeout=5))
            except subprocess.TimeoutExpired:  # pidfd said it exited; should not happen
                status = None
        if not self.future.done():
            self.future.set_result(status)

    @property
    def done(self) -> bool:
        return self.future.done()

    async def wait(self, timeout: float | None = None) -> int | None:
        """The exit status (None if unknown); raises TimeoutError if still running after `timeout`."""
        async with asyncio.timeout(timeout):
            return await asyncio.shield(self.future)

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


async def terminate(ref: ProcessRef | None, watch: ExitWatch | None = None, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; returns once the process is gone (bounded)."""
    if ref is None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not ref.signal(sig) and (watch is None or watch.done):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if watch is not None:
                with contextlib.suppress(TimeoutError):
                    await watch.wait(0.05)
                if watch.done:
                    return
            elif not ref.alive():
                return
            else:
                await asyncio.sleep(0.02)
    log.warning("process %d did not go away after SIGKILL", ref.pid)


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []
