"""Host-side mounts in a VM's shared directory: bind what the guest must see, and take every mount
down before anything is deleted (a recursive delete through a leftover bind would wipe a volume)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat as stat_mod
from pathlib import Path

from kuasar.common import linux, mounts
from kuasar.common.errors import InvalidArgument, RuntimeFailure

log = logging.getLogger(__name__)


def mounts_under(root: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below `root`, deepest first (none when mountinfo cannot be read)."""
    try:
        return mounts.mount_points_under(root)
    except OSError:
        return []


def unmount_tree(root: str | os.PathLike[str]) -> list[str]:
    """Unmount everything at or below `root` (lazily when busy); returns what is still mounted."""
    for _ in range(8):
        points = mounts_under(root)
        if not points:
            return []
        for point in points:
            try:
                linux.umount(point)
            except OSError as err:
                if err.errno == errno.EBUSY:
                    try:
                        linux.umount(point, linux.MNT_DETACH)
                    except OSError:
                        pass
                elif err.errno not in (errno.EINVAL, errno.ENOENT):
                    log.warning("umount %s: %s", point, err)
    return mounts_under(root)


def remove_tree(root: str | os.PathLike[str], mounted_at: str | os.PathLike[str] | None = None) -> None:
    """Unmount, then delete `root`; refuses to delete while anything is still mounted below it.
    `mounted_at`: where its mounts are, when that is another view of it (`read_only_view`)."""
    if not os.path.lexists(root):
        return
    left = unmount_tree(mounted_at if mounted_at is not None else root)
    if left:
        raise RuntimeFailure(f"not removing {root}: still mounted: {', '.join(left)}")
    shutil.rmtree(root, ignore_errors=True)
    if os.path.lexists(root):
        raise RuntimeFailure(f"could not remove {root}")


def read_only_view(source: Path, view: Path) -> None:
    """Make `view` a read-only bind of the directory `source`, private (no mount made in one reaches
    the other, nor the host's other mount namespaces). A VM's shared directory is such a view: the
    guest (QEMU serves it as root) cannot create, rename or replace anything there, so no symlink of
    its making lies on a path the host mounts onto or deletes; the host makes entries in `source` and
    mounts onto the view, and what is mounted there (a rootfs, a volume) is as writable as it is."""
    view.mkdir(mode=0o711, exist_ok=True)
    try:
        linux.mount(str(source), str(view), "", linux.MS_BIND)
        linux.mount("", str(view), "", linux.MS_PRIVATE)
        linux.mount("", str(view), "", linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY)
    except OSError as err:
        unmount_tree(view)
        raise RuntimeFailure(f"making {view} a read-only view of {source}: {err}") from None


def bind(source: str, target: Path, readonly: bool, make_at: Path | None = None) -> None:
    """Bind a host file or directory onto `target` (created to match, at `make_at` when `target` is
    in a read-only view of it), read-only if asked."""
    try:
        st = os.stat(source)
    except OSError as err:
        raise InvalidArgument(f"bind source {source}: {err.strerror}") from None
    point = make_at if make_at is not None else target
    if stat_mod.S_ISDIR(st.st_mode):
        point.mkdir(parents=True, exist_ok=True)
    elif stat_mod.S_ISREG(st.st_mode):
        point.parent.mkdir(parents=True, exist_ok=True)
        point.touch(exist_ok=True)
    else:
        raise InvalidArgument(f"bind source {source}: only files and directories can be shared with a VM")
    try:
        linux.mount(source, str(target), "", linux.MS_BIND | linux.MS_REC)
        # A slave, not a peer of the source (mounts are shared on a systemd host): unmount_tree takes our
        # copy's submounts one by one, and as a peer each unmount reached the source too, taking a
        # hostPath volume's own submounts off the host. The host's mounts still show through.
        linux.mount("", str(target), "", linux.MS_REC | linux.MS_SLAVE)
        if readonly:
            linux.set_readonly_recursive(str(target))  # its submounts too, not only the top mount
    except OSError as err:
        unmount_tree(target)
        raise RuntimeFailure(f"binding {source} into the VM's shared directory: {err}") from None
