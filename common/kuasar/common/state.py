"""Per-sandbox state on disk under `--dir`, written atomically so a crash never leaves half a file."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .ids import validate_id

log = logging.getLogger(__name__)

STATE_FILE = "sandbox.json"


def write_atomic(path: Path, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Write via temp file + rename, so a reader (or a restarted process) sees the old or the new file.

    `durable` also fsyncs the file and then the directory so the rename survives a power loss; that
    costs about a millisecond on a disk and is only worth it for data that outlives the machine.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            _write_all(fd, data)  # a short write (a nearly full disk) must not become the file
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def overwrite(path: Path, data: bytes) -> None:
    """Write `data` over an existing file from its start, cutting off what is left of the old content.

    For a file that only we read, and only after this returns: no temp file and rename (~0.3-0.5 ms on
    ext4), and no truncation to zero first, which makes ext4 flush the new data at close (~0.15 ms).
    A crash in the middle leaves a torn file, so it is not for anything read after a restart.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        _write_all(fd, data)
        if os.fstat(fd).st_size > len(data):
            os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class StateStore:
    """One directory per sandbox (`<root>/<id>/`), holding `sandbox.json` and whatever the sandbox type adds."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.root / validate_id(sandbox_id, "sandbox id")

    def save(self, sandbox_id: str, record: dict[str, Any]) -> None:
        directory = self.sandbox_dir(sandbox_id)
        directory.mkdir(exist_ok=True, mode=0o700)
        # Atomic but not fsynced: two fsyncs cost ~1 ms per save on a disk, paid twice in every
        # RunPodSandbox. A record describes processes (pods, containers, VMs) that die with the
        # kernel, and the page cache outlives any crash of ours, so every restart of a sandboxer or
        # task server still reads the last record. Only a power loss or kernel crash can lose the
        # newest records, and then their sandboxes are gone too: containerd's Stop and Shutdown of an
        # id we no longer know succeed (see SandboxController), a torn file is skipped by load_all,
        # and a stale READY record is reported exited by the sandbox type's recover().
        write_atomic(directory / STATE_FILE, json.dumps(record, sort_keys=True).encode(), durable=False)

    def load_all(self) -> dict[str, dict[str, Any]]:
        """Read every persisted sandbox; unreadable entries are logged and skipped, never fatal."""
        found: dict[str, dict[str, Any]] = {}
        for entry in sorted(self.root.iterdir()):
            path = entry / STATE_FILE
            if not path.is_file():
                continue
            try:
                found[entry.name] = json.loads(path.read_bytes())
            except (OSError, ValueError) as exc:
                log.error("skipping unreadable state %s: %s", path, exc)
        return found

    def names(self) -> set[str]:
        """The name of every sandbox directory, whatever its record holds."""
        return {entry.name for entry in self.root.iterdir() if entry.is_dir()}

    def remove_incomplete(self) -> list[str]:
        """Remove the directories that hold no record: a first save cut short (made, its file not yet
        renamed in) by a crash. Nothing else lives there. Returns their names."""
        removed = []
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and not entry.is_symlink() and not (entry / STATE_FILE).exists():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed

    def remove(self, sandbox_id: str) -> None:
        shutil.rmtree(self.sandbox_dir(sandbox_id), ignore_errors=True)
