"""Mount the rootfs containerd hands us (CreateTaskRequest.rootfs) and take it down again."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from . import linux
from .errors import InvalidArgument, RuntimeFailure

log = logging.getLogger(__name__)

# Options that are mount(2) flags rather than filesystem data, as mount(8) spells them.
_FLAG_OPTIONS = {
    "ro": (linux.MS_RDONLY, True), "rw": (linux.MS_RDONLY, False),
    "nosuid": (linux.MS_NOSUID, True), "suid": (linux.MS_NOSUID, False),
    "nodev": (linux.MS_NODEV, True), "dev": (linux.MS_NODEV, False),
    "noexec": (linux.MS_NOEXEC, True), "exec": (linux.MS_NOEXEC, False),
    "noatime": (linux.MS_NOATIME, True), "nodiratime": (linux.MS_NODIRATIME, True),
    "relatime": (linux.MS_RELATIME, True),
    "bind": (linux.MS_BIND, True), "rbind": (linux.MS_BIND | linux.MS_REC, True),
}
# mount(2) takes at most one page of data; longer overlay lowerdir lists need another approach.
MAX_MOUNT_DATA = 4095


class MountLike(Protocol):
    type: str
    source: str
    options: Iterable[str]


def parse_options(options: Iterable[str]) -> tuple[int, str]:
    flags, data = 0, []
    for option in options:
        if option in _FLAG_OPTIONS:
            bit, on = _FLAG_OPTIONS[option]
            flags = flags | bit if on else flags & ~bit
        else:
            data.append(option)
    joined = ",".join(data)
    if len(joined) > MAX_MOUNT_DATA:
        raise InvalidArgument(f"mount options are {len(joined)} bytes, more than {MAX_MOUNT_DATA}")
    return flags, joined


def mount_rootfs(mounts: Iterable[MountLike], target: Path) -> None:
    """Mount containerd's rootfs mounts onto `target` in order (normally one overlay)."""
    target.mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    try:
        for m in mounts:
            flags, data = parse_options(m.options)
            fstype = "" if flags & linux.MS_BIND else m.type
            if m.type == "bind":
                flags |= linux.MS_BIND
                fstype = ""
            linux.mount(m.source, str(target), fstype, flags & ~linux.MS_RDONLY if flags & linux.MS_BIND
                        else flags, data)
            done.append(str(target))
            if flags & linux.MS_BIND and flags & linux.MS_RDONLY:
                linux.mount("", str(target), "", flags | linux.MS_REMOUNT)
    except OSError as exc:
        for path in reversed(done):
            unmount_all(Path(path))
        raise RuntimeFailure(f"mounting rootfs on {target}: {exc}") from None


def unmount_all(target: Path) -> None:
    """Unmount every layer stacked on `target`; a missing path or no mount is fine."""
    for _ in range(16):  # bound: at most this many stacked mounts
        try:
            linux.umount(str(target))
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return
            if exc.errno == errno.EBUSY:
                log.warning("%s busy; detaching lazily", target)
                try:
                    linux.umount(str(target), linux.MNT_DETACH)
                except OSError:
                    return
            else:
                raise


def is_mountpoint(path: Path) -> bool:
    return os.path.ismount(path)


def mount_tmpfs(target: Path, size: int) -> None:
    """A tmpfs of `size` bytes at `target` (made if missing), as CRI mounts a pod's /dev/shm."""
    target.mkdir(parents=True, exist_ok=True, mode=0o755)
    linux.mount("shm", str(target), "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
                f"mode=1777,size={size}")
