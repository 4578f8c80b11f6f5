"""What a pod holds on the host, on disk, so that a task server started after another one died can undo it.

A task server keeps its pods in memory. If it dies (a crash, `kill -9`) its pod processes live on,
re-parented to PID 1, with their cgroups and /dev/shm mounts; the task server the sandboxer starts in
its place knows none of them, and containerd's removal of the pod then finds nothing to remove. So
each pod's process (pid and start time, which tell it from a later process given the same pid), the
cgroup directories made for it and its /dev/shm mount are written to `<dir>/pods/<id>/pod.json`, and
a fresh task server ends whatever such files describe before it serves: the process, then whatever
is left in the pod's own cgroups (killed, and waited for), then the mount and the cgroups. A record
goes only with all it lists: one whose cgroups are still in use (a process that would not die in
time) stays, and the next task server's sweep or the pod's Delete (its Shutdown) tries again.

The record is written just after the pod's Create; a task server killed before that leaves a pod
process nobody recorded. kuasar-pause carries the pod's directory in its command line (`--owner`), so
every process that names one under our `pods/` is ended as well: none can be a live task server's, as
only one runs per directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from . import cgroups, mounts, strays
from .pod_files import PODS_DIR
from .state import write_atomic

log = logging.getLogger(__name__)

RECORD_FILE = "pod.json"
# The flag before a pod process's directory in its command line (kuasar-pause --owner PATH).
OWNER_FLAG = b"--owner"
Record = TypeVar("Record")


@dataclass
class PodLeftovers:
    pid: int
    start: int  # the process's start time (clock ticks after boot), /proc/<pid>/stat field 22
    cgroups: list[str] = field(default_factory=list)  # directories made for the pod, parents first
    shm: str = ""  # the pod's /dev/shm mount, if it has one

    def write(self, directory: Path) -> None:
        """Into the pod's directory."""
        write_record(directory / RECORD_FILE, self)


def write_record(path: Path, record: Any) -> None:
    """A dataclass instance as JSON into `path`, its directory made if missing. By rename: a record is
    written again as what it lists changes, and a crash during a rewrite in place left an empty file,
    which the sweep skips, losing what the old one listed. Not fsynced: it matters after a crash of
    the process, not of the machine (a reboot takes the processes, mounts and cgroups with it)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, json.dumps(asdict(record)).encode(), durable=False)


def read_record(path: Path, kind: type[Record]) -> Record | None:
    """What `write_record` wrote into `path`; None, logged, if it cannot be read (torn, say)."""
    try:
        return kind(**json.loads(path.read_bytes()))
    except (OSError, ValueError, TypeError) as exc:
        log.error("%s unreadable, skipped: %s", path, exc)
        return None


def forget(directory: Path) -> None:
    with contextlib.suppress(OSError):
        (directory / RECORD_FILE).unlink()


async def sweep(sandboxer_dir: Path) -> int:
    """End every pod a dead task server left (see the module's docstring); how many there were. A record
    stays while something it lists is still there, for the next sweep or the pod's Delete (`retry`)."""
    found: list[tuple[Path, PodLeftovers]] = []
    for record_path in sorted((sandboxer_dir / PODS_DIR).glob(f"*/{RECORD_FILE}")):
        leftovers = read_record(record_path, PodLeftovers)
        if leftovers is not None:
            log.warning("pod %s: left by a task server that is gone; ending its process %s",
                        record_path.parent.name, leftovers.pid or "(not recorded yet)")
            found.append((record_path.parent, leftovers))
    recorded = {(leftovers.pid, leftovers.start) for _, leftovers in found}
    unrecorded = [process for process in owned_processes(sandboxer_dir / PODS_DIR) if process not in recorded]
    for pid, _ in unrecorded:
        log.warning("pod process %d: its record was never written; ending it", pid)
    await _end(found, unrecorded)
    return len(found)


async def retry(pod_directory: Path) -> bool:
    """End what the record in `pod_directory` still lists (a sweep kept it: something would not go then),
    for the pod's Delete in a task server that does not know the pod; whether nothing is left of it."""
    record_path = pod_directory / RECORD_FILE
    leftovers = read_record(record_path, PodLeftovers) if record_path.exists() else None
    if leftovers is None:  # none (the common case: no such pod), or torn: nothing to go by
        return True
    log.warning("pod %s: a task server that is gone left it, and not all of it went; trying again",
                pod_directory.name)
    return not await _end([(pod_directory, leftovers)], [])


async def _end(found: list[tuple[Path, PodLeftovers]], unrecorded: list[tuple[int, int]]) -> list[Path]:
    """Kill the pods' processes, then whatever is left in their own cgroups, and remove what they hold;
    forget the record of each pod nothing is left of. The pod directories whose record stays."""
    # Every process is killed before any is waited for: each takes a few ms to go, paid once rather
    # than once per pod (a dead task server may have left hundreds).
    processes = [(leftovers.pid, leftovers.start) for _, leftovers in found] + unrecorded
    for pid, start in processes:
        strays.kill(pid, start)
    await strays.wait_gone(processes)
    # What else is in a pod's own cgroups (an exec's process, a container's the runtime's sweep missed)
    # would keep them, and the record could never go.
    owned = [Path(directory) for pod_directory, leftovers in found
             for directory in own_cgroups(pod_directory.name, leftovers.cgroups)]
    for directory in owned:
        cgroups.kill_members(directory / "cgroup.procs")
    await _wait_emptied(owned)
    kept = []
    for pod_directory, leftovers in found:
        if _remove(pod_directory.name, leftovers):
            forget(pod_directory)
        else:
            kept.append(pod_directory)
    return kept


def own_cgroups(pod_id: str, directories: list[str]) -> list[str]:
    """The pod's own cgroups among those its record lists, in every hierarchy: its process's leaf, named
    after the pod (cgroup v2, or a root parent). The rest are parents made for it: CRI's cgroup_parent,
    which other pods may share (given the same parent, or made since a restart, when the parent already
    existed and went unrecorded), so never ours to empty. Under v1 a pod has no leaf: its process is
    ended by pid, and its parents are removed only if empty."""
    return [d for d in directories if os.path.basename(d) == pod_id]


async def _wait_emptied(directories: list[Path]) -> None:
    """Until no process is left in the cgroups at `directories` or below them, or EMPTY_WAIT_S has passed:
    a killed process keeps its cgroup busy until it is reaped (by an init that may take its time)."""
    deadline = time.monotonic() + cgroups.EMPTY_WAIT_S
    while any(cgroups.procs_below(d / "cgroup.procs") for d in directories) and time.monotonic() < deadline:  # noqa: ASYNC110 - not our children: no exit to await
        await asyncio.sleep(cgroups.EMPTY_POLL_S)


def _remove(pod_id: str, leftovers: PodLeftovers) -> bool:
    """Unmount the pod's /dev/shm and remove its cgroups, deepest first; whether all of its own went (a
    parent still in use is another pod's now, and stays, as PodCgroup.remove leaves it)."""
    removed = True
    if leftovers.shm:
        try:
            mounts.unmount_all(Path(leftovers.shm))
        except OSError as exc:
            log.error("pod %s: unmounting its /dev/shm: %s", pod_id, exc)
            removed = False
    own = own_cgroups(pod_id, leftovers.cgroups)
    for directory in reversed(leftovers.cgroups):  # children before their parents
        if directory in own:
            _remove_empty_below(Path(directory))
        with contextlib.suppress(OSError):  # busy (or gone): told below
            os.rmdir(directory)
    busy = [directory for directory in own if os.path.isdir(directory)]
    if busy:
        log.error("pod %s: cgroups %s are still in use; its record stays, to be tried again", pod_id, busy)
    return removed and not busy


def owned_processes(pods_root: Path) -> list[tuple[int, int]]:
    """(pid, start time) of every process whose command line has `--owner <a path under pods_root>`."""
    prefix = os.fsencode(pods_root) + b"/"
    return strays.processes_with(lambda argv: any(flag == OWNER_FLAG and value.startswith(prefix)
                                                  for flag, value in itertools.pairwise(argv)))


def _remove_empty_below(directory: Path) -> None:
    """Every cgroup below `directory` without processes (what made its own below the pod's); one still in
    use stays (EBUSY)."""
    for below, _, _ in sorted(os.walk(directory), key=lambda entry: len(entry[0]), reverse=True):
        if below != str(directory):
            with contextlib.suppress(OSError):
                os.rmdir(below)
