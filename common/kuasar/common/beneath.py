"""Binding onto a place a pod can write to (its rootfs, a volume) without following a symlink on the way.

A target checked by path (`rootfs_paths.resolve_in_root`) and then used by path can have a component
swapped for a symlink in between by whoever writes there (a module, another container of the pod, an
exec), and the mount lands outside, on the host. Here every component is opened with O_NOFOLLOW from
the one before, and the mount goes onto the opened file (`/proc/self/fd/<n>`), so what was checked is
what is used: a component that is a symlink by then fails the bind instead.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from . import linux
from .errors import InvalidArgument

# What `open_beneath` makes of a missing last component.
FILE = "file"
DIRECTORY = "directory"


def _open_component(name: str, dir_fd: int, last: bool) -> int:
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY),
                     dir_fd=dir_fd)
    except NotADirectoryError:
        if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, "a symbolic link on the way", name) from None
        raise
    if stat.S_ISLNK(os.fstat(fd).st_mode):  # O_PATH|O_NOFOLLOW opens a symlink itself rather than failing
        os.close(fd)
        raise OSError(errno.ELOOP, "a symbolic link on the way", name)
    return fd


def open_beneath(root: str | os.PathLike[str], relative: str, make: str = "") -> tuple[int, int, str]:
    """(fd of the parent directory, O_PATH fd of `root`/`relative`, its last component), every component
    opened without following a symlink; with `make` (FILE or DIRECTORY) a missing last component is made
    as such, and missing directories on the way. The caller closes both fds."""
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise InvalidArgument(f"{relative!r} does not name a place beneath {root}")
    parent = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            try:
                fd = _open_component(name, parent, last)
            except FileNotFoundError:
                if not make:
                    raise
                if last and make == FILE:
                    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     0o644, dir_fd=parent))
                else:
                    os.mkdir(name, 0o755, dir_fd=parent)
                fd = _open_component(name, parent, last)
            if last:
                return parent, fd, name
            os.close(parent)
            parent = fd
    except BaseException:
        os.close(parent)
        raise
    raise AssertionError("unreachable")


def bind_beneath(source: str, root: str | os.PathLike[str], relative: str, readonly: bool = False,
                 recursive: bool = False, then: Callable[[str], None] | None = None) -> None:
    """Bind `source` (a file or a directory, made to match if missing) onto `root`/`relative`, which is
    reached without following a symlink (see the module docstring); read-only if asked. `then` is
    given a path of the new mount (`/proc/self/fd/<n>`, checked to be the bind) to change it further."""
    make = DIRECTORY if os.path.isdir(source) else FILE
    where = f"{Path(root) / relative.lstrip('/')}"
    try:
        parent, fd, name = open_beneath(root, relative, make)
    except OSError as exc:
        raise InvalidArgument(f"binding {source} at {where}: {exc.strerror or exc}") from None
    try:
        try:
            linux.mount(source, f"/proc/self/fd/{fd}", "", linux.MS_BIND | (linux.MS_REC if recursive else 0))
        except OSError as exc:
            raise InvalidArgument(f"binding {source} at {where}: {exc.strerror or exc}") from None
        if readonly or then is not None:
            _change_the_bind(source, parent, name, where, readonly, then)
    finally:
        os.close(fd)
        os.close(parent)


def _change_the_bind(source: str, parent: int, name: str, where: str, readonly: bool,
                     then: Callable[[str], None] | None) -> None:
    # The fd opened before the bind names the file it covers; the bind is what `name` leads to now,
    # checked to be the source (a rename meanwhile must not leave the bind writable unnoticed).
    try:
        mounted = _open_component(name, parent, last=True)
    except OSError as exc:
        raise InvalidArgument(f"binding {source} at {where}: {exc.strerror or exc}") from None
    try:
        got, want = os.fstat(mounted), os.stat(source)
        if (got.st_dev, got.st_ino) != (want.st_dev, want.st_ino):
            raise InvalidArgument(f"binding {source} at {where}: the place changed under the bind")
        if then is not None:
            then(f"/proc/self/fd/{mounted}")
        if readonly:
            linux.mount("none", f"/proc/self/fd/{mounted}", "", linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY)
    except OSError as exc:
        raise InvalidArgument(f"binding {source} at {where}: {exc.strerror or exc}") from None
    finally:
        os.close(mounted)
