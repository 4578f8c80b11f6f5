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
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
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
# The thread's comm name (`ps -T`, /proc/<pid>/task/<tid>/comm): what a look at the task server's
# threads tells apart from its event loop's.
THREAD_NAME = "attach-warmer"
# /proc/self/cgroup is one line per hierarchy (a dozen on cgroup v1), each well under 300 bytes.
PROC_CGROUP_MAX = 16384


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
    seconds after the last one closed.

    The thread is safe to fork beside (the wasm task server forks container processes that run
    Python): the forking thread holds the GIL, so this one is asleep in the kernel or between two
    bytecodes, and the locks it may hold then are its own, which a forked child replaces
    (`forget_thread`, registered with os.register_at_fork), and logging's (only while it reports
    giving up), which logging re-creates in a child."""

    def __init__(self, linger: float = LINGER_S) -> None:
        self.linger = linger
        self.disabled = False  # set once a write failed (no cgroupfs, no permission): nothing to gain
        self.writes = 0
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._until = 0.0  # monotonic time the current burst may end, once no block is open
        self.bursting = False
        # Released once per burst; the thread waits on it between bursts. A raw lock, not an Event:
        # waking must cost the thread next to no Python, which would hold the GIL the loop needs.
        self._wake = _thread.allocate_lock()
        self._wake.acquire()
        self._thread_started = False
        self.thread_id: int | None = None  # the thread's, once it runs
        self._target: tuple[bytes, int] | None = None  # /proc/self/cgroup as read, our cgroup.procs fd
        # Cgroup writes handed to the thread (work, outcome), made by it first thing.
        self._submitted: list[tuple[Callable[[], None], concurrent.futures.Future[None]]] = []

    def forget_thread(self) -> None:
        """In a forked child: the thread (and whatever held the lock) stayed in the parent."""
        with contextlib.suppress(OSError):
            self._drop_target()
        self._reset()

    def submit(self, work: Callable[[], None]) -> concurrent.futures.Future[None]:
        """Run `work`, a write to cgroup.procs files (putting a process in a cgroup), on the thread as the
        first writes of a burst.

        Such a write may itself wait out an RCU grace period (~8 ms, holding the kernel's cgroup_mutex);
        made here it is off the caller's path, and it warms the lock as the thread's own writes do.
        Without a thread (disabled) it is made at once.
        """
        outcome: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            if not self.disabled:
                self._submitted.append((work, outcome))
                self._start_burst()
                return outcome
        _run(work, outcome)
        return outcome

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            self._users += 1
            if not self.disabled:
                self._start_burst()
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                self._until = time.monotonic() + self.linger

    def _start_burst(self) -> None:
        # Called with self._lock held.
        if self.bursting:
            return
        self.bursting = True
        if not self._thread_started:
            # One thread for the process's life: starting one per burst cost the event loop ~0.3-1.5 ms
            # (the new thread's start-up and cgroup lookup held the GIL while a pod was being spawned).
            # Not threading.Thread: its start() waits until the new thread has run, which on a busy
            # machine made pod creation wait for a free CPU.
            self._thread_started = True
            _thread.start_new_thread(self._serve, (self._wake,))
        self._wake.release()

    def _serve(self, wake: _thread.LockType) -> None:
        self.thread_id = _thread.get_ident()
        with contextlib.suppress(OSError), open("/proc/thread-self/comm", "w") as comm:
            comm.write(THREAD_NAME)
        while True:
            wake.acquire()
            if wake is not self._wake:  # forgotten in a forked child; a parent's thread never is
                return
            self._burst()

    def _burst(self) -> None:
        fd = self._target_fd()
        pid = str(os.getpid()).encode()
        while True:
            self._run_submitted()
            if fd is None:  # disabled: only the submitted work was still to be done
                if self._goes_on(submitted_only=True):
                    continue
                return
            if not self._goes_on():
                return
            try:
                os.write(fd, pid)
            except OSError as exc:
                self._give_up(exc)
                fd = None
                continue
            self.writes += 1
            time.sleep(REWRITE_INTERVAL_S)

    def _run_submitted(self) -> None:
        with self._lock:
            submitted, self._submitted = self._submitted, []
        for work, outcome in submitted:
            _run(work, outcome)

    def _target_fd(self) -> int | None:
        """Our cgroup.procs, opened once and kept while /proc/self/cgroup says the same: writing a
        cgroup we have since been moved out of would move us back. Only a move costs the lookup."""
        try:
            placed = _read_proc_self_cgroup()
        except OSError as exc:
            self._give_up(exc)
            return None
        if self._target is not None and self._target[0] == placed:
            return self._target[1]
        self._drop_target()
        try:
            path = own_procs_file()
            if path is None:
                self._give_up(None)
                return None
            # Kept open: every call that releases the GIL is a hand-over the event loop's thread may
            # have to wait for, so a burst makes only the write and the sleep.
            self._target = (placed, os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        except OSError as exc:
            self._give_up(exc)
            return None
        return self._target[1]

    def _drop_target(self) -> None:
        if self._target is not None:
            os.close(self._target[1])
            self._target = None

    def _goes_on(self, submitted_only: bool = False) -> bool:
        with self._lock:
            if self._submitted:
                return True
            if submitted_only or (self._users == 0 and time.monotonic() >= self._until):
                self.bursting = False
                return False
            return True

    def _give_up(self, exc: OSError | None) -> None:
        if exc is not None:
            log.info("not keeping the cgroup attach lock warm: %s", exc)
        self._drop_target()
        with self._lock:
            self.disabled = True


def _run(work: Callable[[], None], outcome: concurrent.futures.Future[None]) -> None:
    if not outcome.set_running_or_notify_cancel():
        return
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - whatever it is, the caller hears of it; our thread goes on
        outcome.set_exception(exc)
    else:
        outcome.set_result(None)


def _read_proc_self_cgroup() -> bytes:
    fd = os.open("/proc/self/cgroup", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, PROC_CGROUP_MAX)
    finally:
        os.close(fd)


def warm(warmer: AttachLockWarmer | None) -> AbstractContextManager[None]:
    """`warmer.held()`, or nothing where a backend keeps no warmer (the guest's agent, tests)."""
    return warmer.held() if warmer is not None else nullcontext()


# One per process: the kernel lock it warms is one per machine.
WARMER = AttachLockWarmer()
os.register_at_fork(after_in_child=WARMER.forget_thread)
