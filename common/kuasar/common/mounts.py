"""Mount the rootfs containerd hands us (CreateTaskRequest.rootfs) and take it down again."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from . import linux
from .errors import InvalidArgument, RuntimeFailure

log = logging.getLogger(__name__)

# The kernel's default fs.mount-max: no namespace holds more mounts, so no target more layers. (containerd
# hands a rootfs as any number of mounts; a fixed small bound left the layers above it mounted.)
MOUNT_MAX = 100_000

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
# containerd's own options, not the kernel's: its snapshotter's `remap-ids` for a container in a user
# namespace (hostUsers: false) asks that the layers be seen through an id-mapped mount, as
# "uidmap=<container>:<host>:<size>[,...]" and the same for gids.
ID_MAP_OPTIONS = ("uidmap=", "gidmap=")
# Where the id-mapped views of an overlay's lower layers are attached while the overlay is mounted on
# them, beside the rootfs (overlayfs keeps its own clones of its layers' mounts, so they go right after).
IDMAPPED_LAYERS = ".idmapped-layers"
_PROC_USERNS = re.compile(r"/proc/(\d+)/ns/user")


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


def split_id_maps(options: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """The options without containerd's uidmap=/gidmap=, and those two by name ({} when absent)."""
    rest, maps = [], {}
    for option in options:
        name = next((prefix for prefix in ID_MAP_OPTIONS if option.startswith(prefix)), None)
        if name is None:
            rest.append(option)
        else:
            maps[name[:-1]] = option[len(name):]
    return rest, maps


def parse_id_map(text: str) -> list[tuple[int, int, int]]:
    """containerd's "<container>:<host>:<size>[,...]" as (container, host, size) triples."""
    try:
        triples = [tuple(int(part) for part in entry.split(":")) for entry in text.split(",")]
    except ValueError:
        triples = []
    if not triples or any(len(t) != 3 or min(t) < 0 or t[2] == 0 for t in triples):
        raise InvalidArgument(f"id map {text!r} is not <container>:<host>:<size>[,...]")
    return sorted(triples)  # type: ignore[arg-type]


def _check_userns_maps(userns: str, maps: dict[str, str]) -> None:
    """The rootfs must be mapped as the container's user namespace maps ids, or its files would show
    other owners inside than the processes that use them expect. Checked where /proc tells the maps."""
    if set(maps) != {"uidmap", "gidmap"}:
        raise InvalidArgument("rootfs id mapping needs both uidmap= and gidmap=")
    match = _PROC_USERNS.fullmatch(userns)
    for name in ("uidmap", "gidmap"):
        wanted = parse_id_map(maps[name])
        if match is None:
            continue
        try:
            lines = Path(f"/proc/{match.group(1)}/{name[:3]}_map").read_text().split("\n")
        except OSError as exc:
            raise InvalidArgument(f"user namespace {userns}: {exc.strerror}") from None
        actual = sorted(tuple(int(x) for x in line.split()) for line in lines if line.strip())
        if actual != wanted:
            raise InvalidArgument(f"rootfs {name} {maps[name]} is not how user namespace {userns} maps ids")


@contextlib.contextmanager
def _idmapped_layers(options: list[str], target: Path, userns_fd: int) -> Iterator[list[str]]:
    """An overlay's options with each lowerdir replaced by an id-mapped view of it, attached under
    IDMAPPED_LAYERS beside `target` for as long as the block runs (mount the overlay inside it)."""
    index = next((i for i, option in enumerate(options) if option.startswith("lowerdir=")), None)
    if index is None:
        raise InvalidArgument("an id-mapped overlay needs a lowerdir= option")
    work = target.parent / IDMAPPED_LAYERS
    work.mkdir(mode=0o700, exist_ok=True)
    attached: list[Path] = []
    try:
        views = []
        for layer in options[index].removeprefix("lowerdir=").split(":"):
            view = work / str(len(views))
            view.mkdir(exist_ok=True)
            linux.idmapped_bind(layer, str(view), userns_fd)
            attached.append(view)
            views.append(str(view))
        yield [*options[:index], "lowerdir=" + ":".join(views), *options[index + 1:]]
    finally:
        for view in attached:
            with contextlib.suppress(OSError):
                linux.umount(str(view), linux.MNT_DETACH)
        shutil.rmtree(work, ignore_errors=True)


def _mount_one(m: MountLike, target: Path, userns: str) -> None:
    options, maps = split_id_maps(m.options)
    if maps:
        _mount_idmapped(m, options, maps, target, userns)
        return
    flags, data = parse_options(options)
    fstype = "" if flags & linux.MS_BIND else m.type
    if m.type == "bind":
        flags |= linux.MS_BIND
        fstype = ""
    linux.mount(m.source, str(target), fstype, flags & ~linux.MS_RDONLY if flags & linux.MS_BIND else flags, data)
    if flags & linux.MS_BIND and flags & linux.MS_RDONLY:
        try:
            linux.mount("", str(target), "", flags | linux.MS_REMOUNT)
        except OSError:
            unmount_all(target)
            raise


def _mount_idmapped(m: MountLike, options: list[str], maps: dict[str, str], target: Path, userns: str) -> None:
    """An overlay on id-mapped views of its lower layers (its upper dir is the snapshotter's, already
    owned by the mapped root), or a bind mount that is id-mapped itself."""
    if not userns:
        raise InvalidArgument("rootfs asks for id-mapped layers (uidmap=/gidmap=) but the container "
                              "joins no user namespace")
    _check_userns_maps(userns, maps)
    flags, _ = parse_options(options)
    if m.type != "overlay" and m.type != "bind" and not flags & linux.MS_BIND:
        raise InvalidArgument(f"id-mapped {m.type} rootfs: only overlay and bind mounts can be mapped")
    userns_fd = os.open(userns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if m.type == "overlay":
            with _idmapped_layers(options, target, userns_fd) as mapped:
                flags, data = parse_options(mapped)
                linux.mount(m.source, str(target), m.type, flags, data)
        else:
            linux.idmapped_bind(m.source, str(target), userns_fd,
                                linux.MOUNT_ATTR_RDONLY if flags & linux.MS_RDONLY else 0)
    finally:
        os.close(userns_fd)


def mount_rootfs(mounts: Iterable[MountLike], target: Path, userns: str = "") -> None:
    """Mount containerd's rootfs mounts onto `target` in order (normally one overlay). `userns` is the
    user namespace the container joins (a path), which layers marked uidmap=/gidmap= are mapped by."""
    target.mkdir(parents=True, exist_ok=True)
    done = 0
    try:
        for m in mounts:
            _mount_one(m, target, userns)
            done += 1
    except (OSError, InvalidArgument) as exc:
        if done:
            unmount_all(target)  # every layer stacked so far
        if isinstance(exc, OSError):
            raise RuntimeFailure(f"mounting rootfs on {target}: {exc}") from None
        raise


def unmount_all(target: Path) -> None:
    """Unmount every layer stacked on `target`; a missing path or no mount is fine."""
    for _ in range(MOUNT_MAX):  # every round takes one layer off, or ends the loop
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


MOUNTINFO = "/proc/self/mountinfo"
# The kernel writes a mount point's space, tab, newline and backslash as \ooo and every other byte as it is.
_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def mount_points_under(*roots: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below any of `roots`, deepest first, from /proc/self/mountinfo.

    Decoded as os.fsdecode (and so os.path.realpath) decodes a path: a name that is not UTF-8 still
    compares equal and can be passed back to umount."""
    tops = [os.path.realpath(root).rstrip("/") for root in roots]
    found = set()
    with open(MOUNTINFO, "rb") as mountinfo:
        for line in mountinfo:
            point = os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), line.split()[4]))
            if any(point == top or point.startswith(top + "/") for top in tops):
                found.add(point)
    return sorted(found, key=lambda point: (-point.count("/"), point))


def is_mountpoint(path: Path) -> bool:
    return os.path.ismount(path)


def mount_tmpfs(target: Path, size: int) -> None:
    """A tmpfs of `size` bytes at `target` (made if missing), as CRI mounts a pod's /dev/shm."""
    target.mkdir(parents=True, exist_ok=True, mode=0o755)
    linux.mount("shm", str(target), "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
                f"mode=1777,size={size}")
