"""Directories standing for cgroups, for sweeps that kill what is in a cgroup and then remove it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from kuasar.common import cgroups

# How long a sweep waits for killed processes to leave a stand-in cgroup: they never do by themselves.
EMPTY_WAIT_S = 0.2


def stand_in_cgroupfs(monkeypatch: pytest.MonkeyPatch) -> None:
    """rmdir as on cgroupfs: a directory whose cgroup.procs lists a process is busy (EBUSY; unlike the
    kernel's, it is emptied only by `empty`), an empty one goes with its cgroup.procs."""
    real_rmdir = os.rmdir

    def rmdir(path: str | os.PathLike[str]) -> None:
        procs = Path(path) / "cgroup.procs"
        if procs.exists():
            if procs.read_text().strip():
                raise OSError(errno.EBUSY, "Device or resource busy", str(path))
            procs.unlink()
        real_rmdir(path)

    monkeypatch.setattr(os, "rmdir", rmdir)
    monkeypatch.setattr(cgroups, "EMPTY_WAIT_S", EMPTY_WAIT_S)


def cgroup(directory: Path, *pids: int) -> Path:
    """A stand-in cgroup holding `pids` (real processes: a sweep kills them)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in pids))
    return directory


def empty(directory: Path) -> None:
    """What the kernel does once the processes killed in a cgroup are reaped."""
    (directory / "cgroup.procs").write_text("")
