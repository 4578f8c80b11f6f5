"""Keep the kernel's cgroup-attach lock switched to its writer mode while runc puts a process in cgroups.

Every write to a `cgroup.procs` file takes one kernel-wide percpu rw-semaphore
(`cgroup_threadgroup_rwsem`) for writing. Taking it after a quiet spell first waits for an RCU grace
period, so that its readers (fork, exit) leave their fast path; the lock drifts back after another grace
period without writers. Measured here (kernel 6.18, 2 CPUs, cgroup v1): a write after 20 ms of quiet
takes ~7.7 ms, a write within 10 ms of the previous one 0.08 ms. `runc create` and `runc exec` make
such a write about 10 ms after they start, and wait for it: a grace period of every container start.

While a process is being placed, a thread of ours rewrites our own pid into the cgroup we already live
in, which moves nothing: it pays the grace period while runc is still starting up, and keeps the lock in
its writer mode until runc's own write has gone through. With `favordynmods` the lock stays in that mode
anyway and this costs one cheap write per interval.
"""

from __future__ import annotations

import _thread
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from . import cgroups

log = logging.getLogger(__name__)

# Well below the measured ~8 ms after which the lock drifts back to its reader mode without writers.
REWRITE_INTERVAL_S = 0.004
# How long a burst goes on after the last `held()` block closed: a pod's first container follows its
# RunPodSandbox by containerd's CreateContainer and the start of StartContainer (~10-15 ms here), and a
# burst that is already running spares the next runc the grace period it would otherwise wait for first.
LINGER_S = 0.05
# Where we look for our own cgroup on cgroup v1: any hierarchy will do, the lock is kernel-wide.
V1_HIERARCHIES = ("pids", "memory", "cpu", "freezer", "devices")


def own_procs_file() -> Path | None:
    """The `cgroup.procs` of the cgroup this process lives in now (None if there is none to write)."""
    paths = cgroups.proc_cgroups(os.getpid())
    if cgroups.is_unified():
        candidates = [cgroups.CGROUP_ROOT / paths[""].lstrip("/")] if "" in paths else []
    else:
        candidates = [cgroups.CGROUP_ROOT / name / paths[name].lstrip("/") for name in V1_HIERARCHIES
                      if name in paths]
    for directory in candidates:
        if ".." not in Path(directory).parts and (directory / "cgroup.procs").is_file():
            return directory / "cgroup.procs"
    return None


class AttachLockWarmer:
    """Holds the lock in writer mode, from one thread, while a `held()` block is open and `linger`
    seconds after the last one closed."""

    def __init__(self, linger: float = LINGER_S) -> None:
        self.linger = linger
        self._lock = threading.Lock()
        self._users = 0
        self._until = 0.0  # monotonic time the current burst may end, once no block is open
        self._burst: object | None = None  # the running burst's token
        self.disabled = False  # set once a write failed (no cgroupfs, no permission): nothing to gain
        self.writes = 0

    def forget_thread(self) -> None:
        """In a forked child: the thread (and whatever held the lock) stayed in the parent."""
        self._lock = threading.Lock()
        self._users = 0
        self._until = 0.0
        self._burst = None

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            self._users += 1
            if self._burst is None and not self.disabled:
                # Not threading.Thread: its start() waits until the new thread has run, which on a busy
                # machine made pod creation wait ~0.5 ms for a free CPU. Nothing here needs that handshake.
                self._burst = burst = object()
                _thread.start_new_thread(self._rewrite, (burst,))
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                self._until = time.monotonic() + self.linger

    def _end(self, burst: object, disable: bool = False) -> None:
        with self._lock:
            self.disabled = self.disabled or disable
            if self._burst is burst:
                self._burst = None

    def _rewrite(self, burst: object) -> None:
        # Looked up for every burst: writing a cgroup we have since been moved out of would move us back.
        try:
            target = own_procs_file()
        except OSError:
            target = None
        if target is None:
            self._end(burst, disable=True)
            return
        try:
            # Opened once per burst: every call that releases the GIL is a hand-over the event loop's
            # thread may have to wait for, so the loop makes only the write and the sleep.
            fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            self._give_up(burst, target, exc)
            return
        pid = str(os.getpid()).encode()
        try:
            while self._goes_on(burst):
                try:
                    os.write(fd, pid)
                except OSError as exc:
                    self._give_up(burst, target, exc)
                    return
                self.writes += 1
                time.sleep(REWRITE_INTERVAL_S)
        finally:
            os.close(fd)

    def _goes_on(self, burst: object) -> bool:
        with self._lock:
            if self._burst is not burst:  # forgotten in a forked child
                return False
            if self._users == 0 and time.monotonic() >= self._until:
                self._burst = None
                return False
            return True

    def _give_up(self, burst: object, target: Path, exc: OSError) -> None:
        log.info("not keeping the cgroup attach lock warm: writing %s failed: %s", target, exc)
        self._end(burst, disable=True)


def warm(warmer: AttachLockWarmer | None) -> AbstractContextManager[None]:
    """`warmer.held()`, or nothing where a backend keeps no warmer (the guest's agent, tests)."""
    return warmer.held() if warmer is not None else nullcontext()


# One per process: the kernel lock it warms is one per machine.
WARMER = AttachLockWarmer()
os.register_at_fork(after_in_child=WARMER.forget_thread)
