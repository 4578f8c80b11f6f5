"""Processes left behind without a record of their pids (their sandboxer or task server died while
starting them): found by their command line, which names a directory of their sandbox's own, and told
from a later process given the same pid by their start time (proc_stat). No psutil: the resident task
server sweeps with this and does not import it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from . import proc_stat

log = logging.getLogger(__name__)

# In the environment of every helper started for a sandbox (a VM's QEMU, its helpers and task proxy;
# Quark's QVisor and task relay), naming the sandbox's directory: `kill_strays` finds them by it, not by
# a command line, which anyone's can hold (an operator's `tail -f <dir>/console.log` was SIGKILLed).
OWNER_ENV = "KUASAR_STRAY_OWNER"
# A SIGKILLed process is gone in milliseconds; one in uninterruptible sleep (a stuck mount) may take longer,
# and waiting past this only delays the removal of everything else.
KILL_WAIT = 5.0
POLL_INTERVAL = 0.02


def _other_pids() -> Iterator[int]:
    """Every live process's pid but this one's."""
    ours = os.getpid()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != ours:
            yield int(entry.name)


def _command_lines() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, command line split at NULs) of every live process but this one."""
    for pid in _other_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                yield pid, cmdline.read().split(b"\0")
        except OSError:  # gone meanwhile
            continue


def processes_with(matches: Callable[[list[bytes]], bool]) -> list[tuple[int, int]]:
    """(pid, start time) of every live process but this one whose command line (its arguments, as
    bytes) `matches`."""
    found = []
    for pid, argv in _command_lines():
        if matches(argv) and (start := proc_stat.start_time(pid)):
            found.append((pid, start))
    return found


def commands_of(program: str, matches: Callable[[list[bytes]], bool]) -> list[tuple[int, int, list[bytes]]]:
    """(pid, start time, command line) of every live process but this one whose command line `matches`
    and that runs the very file `program` (its device and inode, not a name any process can take), in
    our mount namespace, as our user: one we may believe its arguments about what it was doing."""
    binary = os.stat(program)
    our_mounts, our_uid = os.stat("/proc/self/ns/mnt").st_ino, os.getuid()
    found = []
    for pid, argv in _command_lines():
        if not matches(argv):
            continue
        try:
            exe, mounts = os.stat(f"/proc/{pid}/exe"), os.stat(f"/proc/{pid}/ns/mnt")
            owner = os.stat(f"/proc/{pid}").st_uid
        except OSError:  # gone meanwhile
            continue
        if (exe.st_dev, exe.st_ino) != (binary.st_dev, binary.st_ino) or mounts.st_ino != our_mounts:
            continue
        if owner == our_uid and (start := proc_stat.start_time(pid)):
            found.append((pid, start, argv))
    return found


def descendants_of(ancestors: set[int]) -> list[tuple[int, int]]:
    """(pid, start time) of every live descendant of `ancestors` (a hook a runc command ran, and what
    that hook forked), found while the ancestors are alive: once they die, theirs are reparented."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = proc_stat.stat_fields(int(entry.name))
            if len(fields) > proc_stat.PPID:
                parents[int(entry.name)] = int(fields[proc_stat.PPID])
    found, frontier = [], set(ancestors)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - ancestors
        found += [(pid, start) for pid in sorted(frontier) if (start := proc_stat.start_time(pid))]
        ancestors = ancestors | frontier
    return found


def kill(pid: int, start: int) -> None:
    """SIGKILL `pid` if it is still the process that started at `start` (else it is gone already, and the
    pid may be another's now)."""
    if start and proc_stat.start_time(pid) == start:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def gone(pid: int, start: int) -> bool:
    """The process that started at `start` has exited (a zombie counts)."""
    return not start or proc_stat.start_time(pid) != start or proc_stat.exited(pid)


def owner_env(directory: str | os.PathLike[str]) -> dict[str, str]:
    """This process's environment, plus OWNER_ENV naming `directory`: for a helper of that sandbox."""
    return {**os.environ, OWNER_ENV: os.fspath(directory)}


def _owned_by(pid: int, tag: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return tag in environ.read().split(b"\0")
    except OSError:  # gone meanwhile
        return False


async def kill_strays(directory: Path) -> list[int]:
    """SIGKILL every process (but this one) started for the sandbox at `directory` (OWNER_ENV), and what
    they started; return their pids once they are gone, or KILL_WAIT has passed."""
    tag = f"{OWNER_ENV}={os.fspath(directory)}".encode()
    strays = [(pid, start) for pid in _other_pids() if _owned_by(pid, tag) and (start := proc_stat.start_time(pid))]
    for pid, start in strays:
        log.warning("killing stray process %d of %s", pid, directory)
        kill(pid, start)
    await wait_gone(strays)
    return [pid for pid, _ in strays]


async def wait_gone(processes: list[tuple[int, int]]) -> None:
    """Until every (pid, start time) is gone, or KILL_WAIT has passed."""
    deadline = time.monotonic() + KILL_WAIT
    while not all(gone(pid, start) for pid, start in processes) and time.monotonic() < deadline:  # noqa: ASYNC110 - not our children: no exit to await
        await asyncio.sleep(POLL_INTERVAL)
