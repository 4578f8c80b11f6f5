"""Notice when the kernel OOM-kills inside a container's memory cgroup (for `/tasks/oom` events).

cgroup v1 signals OOM through an eventfd registered in `cgroup.event_control`; cgroup v2 bumps the
`oom_kill` counter in `memory.events`, which inotify reports as a modification. Both are edge
notifications on the event loop: no polling, no thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Callable
from pathlib import Path

from . import cgroups
from .linux import libc

log = logging.getLogger(__name__)

IN_MODIFY = 0x2
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC


class OomWatch:
    """Calls `on_oom` each time the memory cgroup of `pid` sees an OOM kill; `close()` stops it."""

    def __init__(self, pid: int, on_oom: Callable[[], None]) -> None:
        self.on_oom = on_oom
        self._fds: list[int] = []
        self._reader_fd = -1
        self._last_kills = 0
        self._events_path: Path | None = None
        self._control_fd = -1
        paths = cgroups.proc_cgroups(pid)
        try:
            if cgroups.is_unified():
                self._watch_v2(cgroups.CGROUP_ROOT / paths.get("", "/").lstrip("/"))
            elif "memory" in paths:
                self._watch_v1(cgroups.CGROUP_ROOT / "memory" / paths["memory"].lstrip("/"))
        except OSError as exc:  # a container without a memory cgroup simply gets no OOM events
            log.debug("no OOM watch for pid %d: %s", pid, exc)
            self.close()

    def _watch_v1(self, directory: Path) -> None:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(efd)
        control = os.open(directory / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        self._fds.append(control)
        self._control_fd = control
        with open(directory / "cgroup.event_control", "w") as f:
            f.write(f"{efd} {control}")
        self._start(efd, self._on_v1)

    def _on_v1(self) -> None:
        try:
            os.eventfd_read(self._reader_fd)
        except BlockingIOError:
            return
        try:
            # cgroup v1 signals the eventfd also when the cgroup is removed; its files then fail (ENODEV).
            # (Not the oom_kill count: the signal comes before the kill is counted.)
            os.pread(self._control_fd, 256, 0)
        except OSError:
            return
        self.on_oom()

    def _watch_v2(self, directory: Path) -> None:
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._fds.append(fd)
        self._events_path = directory / "memory.events"
        if libc.inotify_add_watch(fd, str(self._events_path).encode(), IN_MODIFY) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {self._events_path}")
        self._last_kills = self._oom_kills()
        self._start(fd, self._on_v2)

    def _oom_kills(self) -> int:
        assert self._events_path is not None
        for line in self._events_path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def _on_v2(self) -> None:
        try:
            os.read(self._reader_fd, 4096)
        except BlockingIOError:
            return
        self._count_v2()

    def _count_v2(self) -> None:
        try:
            kills = self._oom_kills()
        except OSError:
            return
        if kills > self._last_kills:
            self._last_kills = kills
            self.on_oom()

    def check_now(self) -> None:
        """Report an OOM kill whose notification is not handled yet. A container's exit may be seen
        first (both wait in the same turn of the loop; cgroup v2 notifies at most every 10 ms), and
        CRI gives a container whose exit came before its OOM event the reason Error; gVisor's shim looks
        the same way when a container exits. Each kill is still reported once."""
        if self._reader_fd < 0:
            return
        if self._events_path is not None:
            self._count_v2()
        else:
            self._on_v1()

    def _start(self, fd: int, callback: Callable[[], None]) -> None:
        self._reader_fd = fd
        asyncio.get_running_loop().add_reader(fd, callback)

    def close(self) -> None:
        if self._reader_fd >= 0:
            asyncio.get_running_loop().remove_reader(self._reader_fd)
            self._reader_fd = -1
        for fd in self._fds:
            os.close(fd)
        self._fds = []


