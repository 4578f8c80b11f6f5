"""A reproducible newc ("070701") cpio writer for Linux initramfs images.

Entries are given as a tree (`Tree`), written sorted with every parent directory before its
children, owned by root, with one fixed mtime and sequential inode numbers: the same tree always
gives the same bytes. The kernel's initramfs unpacker reads exactly this format
(`init/initramfs.c`; `Documentation/driver-api/early-userspace/buffer-format.rst`).
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110
# Copy buffer for file contents taken from the host.
CHUNK = 1 << 20


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def header(*, ino: int, mode: int, uid: int = 0, gid: int = 0, nlink: int = 1, mtime: int = 0,
           filesize: int = 0, devmajor: int = 0, devminor: int = 0, rdevmajor: int = 0, rdevminor: int = 0,
           name: str) -> bytes:
    """One entry header plus its NUL-terminated name, padded so the data starts 4-byte aligned."""
    encoded = name.encode() + b"\0"
    fields = (ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
              len(encoded), 0)
    for value in fields:
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"cpio field out of range in {name!r}: {value}")
    head = MAGIC + b"".join(b"%08X" % v for v in fields) + encoded
    return head + b"\0" * _pad4(len(head))


@dataclass(frozen=True)
class Entry:
    """One file-system object. `data` (bytes) or `source` (a host file) gives a file's contents."""

    mode: int  # full st_mode: type bits | permission bits
    data: bytes = b""
    source: Path | None = None
    rdev: tuple[int, int] = (0, 0)

    @property
    def size(self) -> int:
        return self.source.stat().st_size if self.source is not None else len(self.data)


class Tree:
    """Paths (relative, "/"-separated, no leading slash) to entries; parents are implied."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    @staticmethod
    def _norm(path: str) -> str:
        parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise ValueError(f"bad path in image: {path!r}")
        return "/".join(parts)

    def _parents(self, path: str) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            existing = self.entries.get(parent)
            if existing is None:
                self.entries[parent] = Entry(stat.S_IFDIR | 0o755)
            elif not stat.S_ISDIR(existing.mode):
                raise ValueError(f"{parent!r} is not a directory in the image (needed for {path!r})")

    def _put(self, path: str, entry: Entry) -> str:
        path = self._norm(path)
        self._parents(path)
        existing = self.entries.get(path)
        if existing is not None and stat.S_ISDIR(existing.mode) != stat.S_ISDIR(entry.mode):
            raise ValueError(f"{path!r} added twice with different types")
        self.entries[path] = entry
        return path

    def dir(self, path: str, mode: int = 0o755) -> None:
        self._put(path, Entry(stat.S_IFDIR | mode))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._put(path, Entry(stat.S_IFREG | mode, data=data))

    def copy(self, path: str, source: Path, mode: int | None = None) -> None:
        """A host file's contents (symlinks followed); mode defaults to the source's permissions."""
        source = Path(source).resolve()
        perm = stat.S_IMODE(source.stat().st_mode) if mode is None else mode
        self._put(path, Entry(stat.S_IFREG | perm, source=source))

    def symlink(self, path: str, target: str) -> None:
        self._put(path, Entry(stat.S_IFLNK | 0o777, data=target.encode()))

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._put(path, Entry(stat.S_IFCHR | mode, rdev=(major, minor)))

    def __contains__(self, path: str) -> bool:
        return self._norm(path) in self.entries

    def sorted_items(self) -> Iterator[tuple[str, Entry]]:
        # Plain string order puts every directory before its contents ("a" < "a-b" < "a/b").
        for path in sorted(self.entries):
            yield path, self.entries[path]

    def data_size(self) -> int:
        return sum(e.size for e in self.entries.values())


def write(tree: Tree, out: BinaryIO, mtime: int = 0) -> int:
    """Write `tree` as a newc archive (padded to 512 bytes); returns the bytes written."""
    written = 0
    for ino, (path, entry) in enumerate(tree.sorted_items(), start=1):
        size = 0 if stat.S_ISDIR(entry.mode) or stat.S_ISCHR(entry.mode) else entry.size
        head = header(ino=ino, mode=entry.mode, nlink=2 if stat.S_ISDIR(entry.mode) else 1, mtime=mtime,
                      filesize=size, rdevmajor=entry.rdev[0], rdevminor=entry.rdev[1], name=path)
        out.write(head)
        written += len(head)
        if entry.source is not None:
            copied = 0
            with open(entry.source, "rb") as src:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    copied += len(chunk)
            if copied != size:
                raise OSError(f"{entry.source} changed size while being archived")
        elif size:
            out.write(entry.data)
        out.write(b"\0" * _pad4(size))
        written += size + _pad4(size)
    trailer = header(ino=0, mode=0, nlink=1, name=TRAILER)
    out.write(trailer)
    written += len(trailer)
    tail = (512 - written % 512) % 512
    out.write(b"\0" * tail)
    return written + tail


def read(data: bytes) -> list[tuple[str, int, bytes]]:
    """Parse a newc archive into (name, mode, data) triples (for tests and image inspection)."""
    entries = []
    pos = 0
    while True:
        if data[pos:pos + 6] != MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = pos + HEADER_SIZE
        name = data[name_start:name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += _pad4(pos)
        if name == TRAILER:
            return entries
        entries.append((name, mode, data[pos:pos + filesize]))
        pos += filesize + _pad4(filesize)
