"""The root container that makes a pod's gVisor sandbox exist before (and between) its containers.

runsc runs several containers in one sandbox, and so under one application kernel, but the first one
created is the sandbox's root: the sandbox lives exactly as long as it does. A pod needs its sandbox at
RunPodSandbox, before any user container, and must outlive every one of them, so the root is a
container of our own, like Kubernetes' pause container but without an image: its rootfs is one small
shared, read-only directory holding our static `kuasar-pause` (the runc pods' pod process), which as
the sandbox's PID 1 reaps the orphans of a pod sharing its PID namespace as pause does, or where it is
not installed the host's statically linked busybox running `sleep` (which reaps nothing). User
containers join it as sub-containers (runsc recognises them by the CRI annotations
`io.kubernetes.cri.container-type = container` and `io.kubernetes.cri.sandbox-id = <pod>`, the pod id
being the root container's runsc id). A pod sharing one PID namespace sees it as PID 1, as it would
see pause.

The sandbox process (`runsc-sandbox`, the sentry) is what Controller.Start returns: it is a live host
process, re-parented to the task server (a child subreaper) once `runsc create` exits, so its exit is
reaped like a pod holder's, and CRI's `/proc/<pid>/ns/{net,ipc,uts[,pid]}` paths for the containers name
namespaces that exist as long as the pod does (runsc keeps sub-containers in the sandbox's own kernel
namespaces whatever the paths say, except that a PID namespace path means "share the pod's").
"""

from __future__ import annotations

import filecmp
import os
import shutil
import struct
from pathlib import Path
from typing import Any

from kuasar.common import linux, mounts
from kuasar.common.errors import FailedPrecondition
from kuasar.common.pod_files import private_dev_shm, put_dev_shm

CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
# Long enough for any pod, short enough for busybox's integer parsing (its sleep has no "infinity").
SLEEP_SECONDS = "2147483647"
PAUSE_ROOTFS = "pause-rootfs"
DEFAULT_BUSYBOX = "/bin/busybox"
# Where kuasar-pause goes in the root container's rootfs, and runs from.
PAUSE_IN_ROOTFS = "bin/kuasar-pause"
# The annotations of the pod's shared /dev/shm (runsc's `dev.gvisor.spec.mount.<name>.<field>`).
SHM_HINT = "dev.gvisor.spec.mount.kuasarpodshm."
PT_INTERP = 3
# A pause rootfs of its own (see ensure_pause_rootfs): busybox (~2 MB) and kuasar-pause, with room.
PAUSE_ROOTFS_TMPFS_SIZE = 16 << 20


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a program interpreter (needs no libc in the rootfs)."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit only: the platforms runsc supports
                return False
            endian = "<" if header[5] == 1 else ">"
            phoff, = struct.unpack_from(endian + "Q", header, 32)
            phentsize, phnum = struct.unpack_from(endian + "HH", header, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(struct.unpack_from(endian + "I", table, i * phentsize)[0] != PT_INTERP for i in range(phnum))


def gofer_cannot_bind_here(directory: Path) -> bool:
    """Whether the mount `directory` is on has flags runsc's gofer would drop: it binds a read-only
    root and remounts it MS_RDONLY|MS_NOSUID|MS_NODEV (atime left to the default, relatime) in a user
    namespace of its own, where the kernel refuses (EPERM) to clear a flag the mount had. systemd
    mounts /run noexec, so under the default --dir host-network gVisor pods failed to start there."""
    flags = os.statvfs(directory).f_flag
    return bool(flags & (os.ST_NOEXEC | os.ST_NOATIME)) or not flags & os.ST_RELATIME


def ensure_pause_rootfs(directory: Path, busybox: str = DEFAULT_BUSYBOX, pause: str | None = None) -> Path:
    """`<directory>/pause-rootfs`: bin/busybox + bin/sleep, bin/kuasar-pause if `pause` names a static
    one, and the mount points; made once, shared. Where `directory` is on a mount the gofer cannot
    bind (`gofer_cannot_bind_here`), the rootfs is a small tmpfs of its own, left mounted for the pods
    to come (and after a restart, found again)."""
    rootfs = directory / PAUSE_ROOTFS
    target = rootfs / "bin" / "busybox"
    pause = pause if pause is not None and is_static_elf(Path(pause)) else None
    if target.is_file() and (rootfs / "bin" / "sleep").is_symlink() and (
            pause is None or _same_file(pause, rootfs / PAUSE_IN_ROOTFS)):  # an upgraded one is copied again
        return rootfs
    source = Path(busybox)
    if not is_static_elf(source):
        raise FailedPrecondition(f"{source} is missing or not a statically linked busybox (Debian package "
                                 "busybox-static); the gVisor pod's root container needs one")
    own_mount = mounts.is_mountpoint(rootfs)
    if own_mount or gofer_cannot_bind_here(directory):
        if not own_mount:
            rootfs.mkdir(mode=0o755, exist_ok=True)
            linux.mount("tmpfs", str(rootfs), "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                        f"mode=0755,size={PAUSE_ROOTFS_TMPFS_SIZE}")
        _fill(rootfs, source, pause)
        return rootfs
    staging = directory / f".{PAUSE_ROOTFS}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    _fill(staging, source, pause)
    shutil.rmtree(rootfs, ignore_errors=True)
    os.replace(staging, rootfs)
    return rootfs


def _fill(rootfs: Path, busybox: Path, pause: str | None) -> None:
    for sub in ("bin", "dev", "proc", "sys", "tmp", "etc"):
        (rootfs / sub).mkdir(parents=True, mode=0o755, exist_ok=True)
    for name, source in (("bin/busybox", str(busybox)), (PAUSE_IN_ROOTFS, pause)):
        if source is not None:  # in place (a tmpfs rootfs is not replaced whole): by rename, never half
            staging = rootfs / f"{name}.{os.getpid()}"
            shutil.copy2(source, staging)
            os.chmod(staging, 0o755)
            os.replace(staging, rootfs / name)
    if not (rootfs / "bin" / "sleep").is_symlink():
        (rootfs / "bin" / "sleep").symlink_to("busybox")


def shm_annotations(source: str) -> dict[str, str]:
    """runsc's pod mount hints for the pod's /dev/shm: one tmpfs the sandbox makes, mounted by every
    container whose /dev/shm names `source` (runsc matches hints by source), as gVisor's own shim
    shares it. A bind of a host tmpfs would not do: glibc's shm_open uses /dev/shm only if it is a
    tmpfs, and in the sandbox a bind is no tmpfs."""
    return {f"{SHM_HINT}source": source, f"{SHM_HINT}type": "tmpfs", f"{SHM_HINT}share": "pod",
            f"{SHM_HINT}options": "rw"}


def use_pod_shm(spec: dict[str, Any], source: str) -> bool:
    """Make a container's /dev/shm the pod's shared tmpfs: containerd's private tmpfs there is named by
    the pod's `source`. A /dev/shm taken from elsewhere (a host-IPC pod's host /dev/shm, a volume) is
    left alone, and so is a spec without one."""
    private = private_dev_shm(spec)
    if not private:
        return False
    put_dev_shm(spec, private, dict(private[0], source=source))
    return True


def _same_file(source: str, copy: Path) -> bool:
    try:
        return filecmp.cmp(source, copy, shallow=False)
    except OSError:
        return False


def root_spec(pod_id: str, rootfs: Path, *, netns_path: str = "", hostname: str = "",
              cgroups_path: str = "", shm_source: str = "") -> dict[str, Any]:
    """OCI spec of a pod's root container: kuasar-pause if the rootfs has it, else `sleep`, as nobody,
    no capabilities, read-only root."""
    args = [f"/{PAUSE_IN_ROOTFS}"] if (rootfs / PAUSE_IN_ROOTFS).is_file() else ["/bin/sleep", SLEEP_SECONDS]
    namespaces: list[dict[str, str]] = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
    if netns_path:
        namespaces.append({"type": "network", "path": netns_path})
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 65534, "gid": 65534},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": {"bounding": [], "effective": [], "permitted": []},
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": hostname or "localhost",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "annotations": {CONTAINER_TYPE: "sandbox", SANDBOX_ID: pod_id,
                        **(shm_annotations(shm_source) if shm_source else {})},
        "linux": {"namespaces": namespaces},
    }
    if cgroups_path:
        spec["linux"]["cgroupsPath"] = cgroups_path
    return spec
