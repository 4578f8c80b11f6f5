"""Opt-in timing of the requests our daemons answer and the runc commands they run.

A pod start is a conversation between containerd, our daemons and runc; only timestamps taken inside
our processes can tell which of them the time went to (the benchmark's attribution does that). With
`KUASAR_REQUEST_TIMING` naming a directory, every process of ours that reads it (a sandboxer, and the
task server it starts, which inherits its environment) appends one line per finished request or
command to `<directory>/<pid>.tsv`; a request is timed from the arrival of the bytes that completed it
until its reply is handed to the socket (not through the write: the peer it wakes may run first on
this CPU, and that time is the peer's):

    <kind> TAB <method> TAB <start ns> TAB <end ns>

with kind `sandbox` (containerd's Sandbox API), `ttrpc` (Task API and the task server's pod service)
or `runc` (the runc subcommand as method), times from CLOCK_MONOTONIC (`time.monotonic_ns`, the clock
every process on the machine shares). Unset, each hook costs one attribute test.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "KUASAR_REQUEST_TIMING"
FILE_SUFFIX = ".tsv"


class RequestTiming:
    def __init__(self, directory: str | None) -> None:
        self.enabled = bool(directory)
        self._directory = directory or ""
        self._fd: int | None = None
        self._pid = 0

    @classmethod
    def from_env(cls) -> RequestTiming:
        return cls(os.environ.get(ENV) or None)

    def start(self) -> int:
        """The start of a request (0 when timing is off)."""
        return time.monotonic_ns() if self.enabled else 0

    def done(self, kind: str, method: str, start: int) -> None:
        """Record a request that began at `start` and ends now."""
        if not start:
            return
        end = time.monotonic_ns()
        fd = self._file()
        if fd is None:
            return
        try:
            os.write(fd, f"{kind}\t{method}\t{start}\t{end}\n".encode())
        except OSError as exc:
            self._give_up(exc)

    def _file(self) -> int | None:
        # Opened on first use and again in a forked child (the wasm task server forks), so that each
        # process writes its own file: O_APPEND keeps lines whole, the pid tells processes apart.
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            try:
                path = Path(self._directory) / f"{pid}{FILE_SUFFIX}"
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                self._pid = pid
            except OSError as exc:
                self._give_up(exc)
                return None
        return self._fd

    def _give_up(self, exc: OSError) -> None:
        # A diagnostic must never fail a request: one warning, then timing is off in this process.
        log.warning("request timing off: %s: %s", self._directory, exc)
        self.enabled = False


TIMING = RequestTiming.from_env()
