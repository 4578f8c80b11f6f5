"""What a wasm container holds on the host, on disk, so that a task server started after another one
died can undo it.

A container's processes die with their task server (launch.py), but its cgroup and its rootfs mount
stay. containerd makes a container's cgroupsPath `<cgroup_parent>/<id>`: beside the pod's process
leaf, not below the cgroups a pod's record lists (pod_leftovers), in a parent kubelet made that is
not ours to sweep. So, as runc keeps the state of runc's containers in its root, each container's
cgroup path and rootfs mount are written to `<dir>/containers/<id>.json` before either is made, and
the file goes once Delete has removed both. A fresh task server removes what such files list before
it serves, and before the pods' sweep (the containers' cgroups are in the pods'): every cgroup's
processes killed first, one wait for all of them. A file whose cgroup is still in use stays, for
the next task server to try again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from kuasar.common import cgroups, mounts
from kuasar.common.pod_leftovers import read_record, write_record

log = logging.getLogger(__name__)

CONTAINERS_DIR = "containers"
SUFFIX = ".json"


@dataclass
class ContainerLeftovers:
    cgroup: str = ""  # its cgroupfs path, made in every hierarchy; "" without one
    rootfs: str = ""  # where the rootfs containerd handed over was mounted; "" if it came mounted


class ContainerRecords:
    def __init__(self, sandboxer_dir: Path) -> None:
        self.directory = sandboxer_dir / CONTAINERS_DIR

    def write(self, container_id: str, leftovers: ContainerLeftovers) -> None:
        """Before the container makes what `leftovers` lists (nothing to list: no file)."""
        if not leftovers.cgroup and not leftovers.rootfs:
            return
        try:
            write_record(self._path(container_id), leftovers)
        except OSError as exc:  # the container runs anyway; only a task server crash would now leak it
            log.error("container %s: recording what it holds: %s", container_id, exc)

    def forget(self, container_id: str) -> None:
        self._path(container_id).unlink(missing_ok=True)

    def sweep(self) -> int:
        """Remove what every file lists (see the module's docstring); how many there were."""
        found: list[tuple[Path, ContainerLeftovers]] = []
        for half_written in self.directory.glob(f".*{SUFFIX}.tmp"):  # its writer died before the rename
            half_written.unlink(missing_ok=True)
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            leftovers = read_record(path, ContainerLeftovers)
            if leftovers is not None:
                log.warning("container %s: left by a task server that is gone; removing its cgroup %r and "
                            "rootfs mount %r", path.stem, leftovers.cgroup, leftovers.rootfs)
                found.append((path, leftovers))
        for directory in cgroups.empty_and_remove([leftovers.cgroup for _, leftovers in found]):
            log.error("cgroup %s is still in use; left in place, and its record, for another try", directory)
        for path, leftovers in found:
            if _unmount(path.stem, leftovers.rootfs) and not cgroups.directories_of(leftovers.cgroup):
                path.unlink(missing_ok=True)
        return len(found)

    def _path(self, container_id: str) -> Path:
        return self.directory / f"{container_id}{SUFFIX}"


def _unmount(container_id: str, rootfs: str) -> bool:
    """Whether the rootfs is unmounted (or was never ours to unmount)."""
    if not rootfs:
        return True
    try:
        mounts.unmount_all(Path(rootfs))
    except OSError as exc:
        log.error("container %s: unmounting its rootfs: %s", container_id, exc)
        return False
    return True
