"""Compiled modules kept on disk, so a module that was started once starts again without compiling.

An artifact (`Module.serialize()`) is valid only for the exact wasmtime build and `Config` that made
it, so the key is sha256(module bytes) + wasmtime version + machine + the engine settings. Files are
written to a temporary name and renamed, so concurrent containers compiling the same module each
produce a complete file and readers never see a partial one; pruning only unlinks (a module that is
memory-mapped from a pruned file keeps working). The directory is the sandboxer's own (root, 0700):
deserializing is only safe for artifacts we wrote ourselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import time
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".cwasm"
# Leftover temporary files (a child killed while writing) older than this are removed by prune().
STALE_TMP_SECONDS = 3600.0
DEFAULT_MAX_BYTES = 512 << 20


def wasmtime_version() -> str:
    try:
        return metadata.version("wasmtime")
    except metadata.PackageNotFoundError:
        return "unknown"


def engine_fingerprint(settings: dict[str, object]) -> str:
    """What, besides the module bytes, an artifact depends on."""
    fields = ";".join(f"{key}={settings[key]!r}" for key in sorted(settings))
    return f"wasmtime {wasmtime_version()}; {platform.machine()}; {fields}"


def module_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ModuleCache:
    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes

    @staticmethod
    def key(digest: str, fingerprint: str) -> str:
        return hashlib.sha256(f"{digest}\n{fingerprint}".encode()).hexdigest()

    def path(self, digest: str, fingerprint: str) -> Path:
        return self.directory / f"{self.key(digest, fingerprint)}{SUFFIX}"

    def store(self, path: Path, artifact: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(artifact)
            os.replace(tmp, path)
        except BaseException:  # a full disk: no partial artifact left for prune() to find an hour later
            tmp.unlink(missing_ok=True)
            raise

    def touch(self, path: Path) -> None:
        """Mark `path` as recently used (prune() drops the least recently used first)."""
        try:
            os.utime(path)
        except OSError:
            pass

    def entries(self) -> list[tuple[float, int, Path]]:
        found = []
        try:
            with os.scandir(self.directory) as it:
                for entry in it:
                    if entry.name.endswith(SUFFIX) and not entry.name.startswith("."):
                        stat = entry.stat(follow_symlinks=False)
                        found.append((stat.st_mtime, stat.st_size, Path(entry.path)))
        except FileNotFoundError:
            pass
        return sorted(found)

    def prune(self) -> int:
        """Drop least recently used artifacts until the cache fits `max_bytes`; returns files removed."""
        removed = 0
        now = time.time()
        try:
            with os.scandir(self.directory) as it:
                for entry in it:
                    # A container process may rename its temp file meanwhile: that one is no business
                    # of ours, and no reason to give up on the rest.
                    with contextlib.suppress(FileNotFoundError):
                        if entry.name.endswith(".tmp") and now - entry.stat().st_mtime > STALE_TMP_SECONDS:
                            os.unlink(entry.path)
        except FileNotFoundError:
            return 0
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            total -= size
        if removed:
            log.info("module cache: removed %d artifacts (now %d bytes)", removed, total)
        return removed
