"""One SIGCHLD handler per process that reaps every child and routes each exit status to its waiter.

A task server is a child subreaper: container processes re-parent to it when runc exits, so it sees
their exits. Exits that arrive before anyone asked for the pid (a short exec that ends before runc's
pid file is read) are kept for a while so no status is ever lost or stolen.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Unclaimed exits kept for late subscribers; bounded because orphans we never care about reap here too.
MAX_UNCLAIMED_EXITS = 1024


@dataclass(frozen=True)
class Exit:
    pid: int
    status: int  # shell convention: exit code, or 128 + signal number
    at_ns: int


def exit_status(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


class Reaper:
    def __init__(self) -> None:
        self._waiters: dict[int, list[asyncio.Future[Exit]]] = {}
        self._unclaimed: OrderedDict[int, Exit] = OrderedDict()
        self._unclaimed_seen: dict[int, int] = {}  # pid -> time.monotonic_ns() its kept exit was reaped
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)

    def watch(self, pid: int, since_ns: int | None = None) -> asyncio.Future[Exit]:
        """A future for `pid`'s exit.

        Pids are reused (32768 of them by default), so an exit kept for a pid may be an earlier
        process's. Called in the same loop step as the spawn (no await between), `since_ns` None, any
        kept exit is one. A pid learned later (from runc's pid file, a pod process's report) passes
        `since_ns`, time.monotonic_ns() from before the command that made the process: only an exit
        reaped since then can be its own.
        """
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[Exit] = loop.create_future()
        early = self._unclaimed.pop(pid, None)
        early_seen = self._unclaimed_seen.pop(pid, 0)
        if early is not None and since_ns is not None and early_seen >= since_ns:
            future.set_result(early)
        else:
            self._waiters.setdefault(pid, []).append(future)
        return future

    def forget(self, pid: int) -> None:
        for future in self._waiters.pop(pid, []):
            future.cancel()

    def reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            exited = Exit(pid, exit_status(wait_status), time.time_ns())
            waiters = self._waiters.pop(pid, None)
            if not waiters:
                self._unclaimed.pop(pid, None)  # a pid reused since: the newest exit goes last
                self._unclaimed[pid] = exited
                self._unclaimed_seen[pid] = time.monotonic_ns()
                while len(self._unclaimed) > MAX_UNCLAIMED_EXITS:
                    self._unclaimed_seen.pop(self._unclaimed.popitem(last=False)[0], None)
                continue
            for future in waiters:
                if not future.done():
                    future.set_result(exited)
