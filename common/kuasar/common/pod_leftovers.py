"""What a pod holds on the host, on disk, so that a task server started after another one died can undo it.

A task server keeps its pods in memory. If it dies (a crash, `kill -9`) its pod processes live on,
re-parented to PID 1, with their cgroups and /dev/shm mounts; the task server the sandboxer starts in
its place knows none of them, and containerd's removal of the pod then finds nothing to remove. So
each pod's process (pid and start time, which tell it from a later process given the same pid), the
cgroup directories made for it and its /dev/shm mount are written to `<dir>/pods/<id>/pod.json`, and
a fresh task server ends whatever such files describe before it serves.

The record is written just after the pod's Create; a task server killed before that leaves a pod
process nobody recorded. kuasar-pause carries the pod's directory in its command line (`--owner`), so
every process that names one under our `pods/` is ended as well: none can be a live task server's, as
only one runs per directory.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import cgroups, mounts, strays
from .pod_files import PODS_DIR

log = logging.getLogger(__name__)

RECORD_FILE = "pod.json"
# The flag before a pod process's directory in its command line (kuasar-pause --owner PATH).
OWNER_FLAG = b"--owner"


@dataclass
class PodLeftovers:
    pid: int
    start: int  # the process's start time (clock ticks after boot), /proc/<pid>/stat field 22
    cgroups: list[str] = field(default_factory=list)  # directories made for the pod, parents first
    shm: str = ""  # the pod's /dev/shm mount, if it has one

    def write(self, directory: Path) -> None:
        """Into the pod's directory. Not atomic: a torn file (a crash right here) is skipped."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(directory / RECORD_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(asdict(self)).encode())
        finally:
            os.close(fd)


def forget(directory: Path) -> None:
    with contextlib.suppress(OSError):
        (directory / RECORD_FILE).unlink()


async def sweep(sandboxer_dir: Path) -> int:
    """End every pod a dead task server left (see the module's docstring); how many there were."""
    found: list[tuple[Path, PodLeftovers]] = []
    for record_path in sorted((sandboxer_dir / PODS_DIR).glob(f"*/{RECORD_FILE}")):
        try:
            leftovers = PodLeftovers(**json.loads(record_path.read_bytes()))
        except (OSError, ValueError, TypeError) as exc:
            log.error("%s unreadable, skipped: %s", record_path, exc)
            continue
        log.warning("pod %s: left by a task server that is gone; ending its process %s",
                    record_path.parent.name, leftovers.pid or "(not recorded yet)")
        # Every process is killed before any is waited for: each takes a few ms to go, paid once
        # rather than once per pod (a dead task server may have left hundreds).
        strays.kill(leftovers.pid, leftovers.start)
        found.append((record_path, leftovers))
    recorded = {(leftovers.pid, leftovers.start) for _, leftovers in found}
    unrecorded = [process for process in owned_processes(sandboxer_dir / PODS_DIR) if process not in recorded]
    for pid, start in unrecorded:
        log.warning("pod process %d: its record was never written; ending it", pid)
        strays.kill(pid, start)
    await strays.wait_gone(unrecorded + [(leftovers.pid, leftovers.start) for _, leftovers in found])
    for record_path, leftovers in found:
        if leftovers.shm:
            mounts.unmount_all(Path(leftovers.shm))
        for directory in reversed(leftovers.cgroups):  # its containers' cgroups, below the pod's
            _remove_empty_below(Path(directory))
        try:
            cgroups.PodCgroup("", list(leftovers.cgroups)).remove()
        except OSError as exc:
            log.error("pod %s: its cgroups: %s", record_path.parent.name, exc)
        forget(record_path.parent)
    return len(found)


def owned_processes(pods_root: Path) -> list[tuple[int, int]]:
    """(pid, start time) of every process whose command line has `--owner <a path under pods_root>`."""
    prefix = os.fsencode(pods_root) + b"/"
    return strays.processes_with(lambda argv: any(flag == OWNER_FLAG and value.startswith(prefix)
                                                  for flag, value in itertools.pairwise(argv)))


def _remove_empty_below(directory: Path) -> None:
    """Every cgroup below `directory` without processes (those of the dead task server's containers
    that their runtime did not remove: a wasm container's); one still in use stays (EBUSY)."""
    for below, _, _ in sorted(os.walk(directory), key=lambda entry: len(entry[0]), reverse=True):
        if below != str(directory):
            with contextlib.suppress(OSError):
                os.rmdir(below)
