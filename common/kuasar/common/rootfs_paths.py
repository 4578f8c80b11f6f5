"""Paths inside a container's rootfs, resolved the way a process whose root it is would see them.

Symlinks in an image are the image's to choose: followed on the host, `/data -> /etc` would point a
bind mount (or a module lookup) at the host's /etc. Here every symlink is read and followed relative
to the rootfs, and `..` stops at its root, so a path never leaves it.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from .errors import InvalidArgument

# A symlink chain longer than this is a loop (Linux's own limit is 40).
MAX_SYMLINKS = 40


def resolve_in_root(root: Path, path: str, cwd: str = "/") -> Path:
    """`path` (absolute, or relative to `cwd`) as seen by a process whose root is `root`.

    Every symlink is read and followed relative to `root`, and `..` stops at `root`, so the result
    always lies under `root`. Missing components are kept as they are (the caller checks existence).
    """
    full = path if path.startswith("/") else posixpath.join(cwd if cwd.startswith("/") else "/" + cwd, path)
    pending = [part for part in reversed(full.split("/")) if part not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop()
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > MAX_SYMLINKS:
                raise InvalidArgument(f"{path!r}: too many levels of symbolic links in the rootfs")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending.extend(part for part in reversed(target.split("/")) if part not in ("", "."))
            continue
        resolved.append(part)
    return root.joinpath(*resolved)
