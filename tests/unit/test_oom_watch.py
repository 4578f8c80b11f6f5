"""OomWatch on a real memory cgroup (v1's memory hierarchy, or v2): an OOM kill is reported, a removed
cgroup is not."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kuasar.common import cgroups
from kuasar.common.oom import OomWatch


@pytest.fixture
def memcg() -> Iterator[Path]:
    if cgroups.is_unified():
        hierarchy = cgroups.CGROUP_ROOT
        has_memory = "memory" in (hierarchy / "cgroup.subtree_control").read_text().split()
    else:
        hierarchy = cgroups.CGROUP_ROOT / "memory"
        has_memory = hierarchy.is_dir()
    if os.geteuid() != 0 or not has_memory:
        pytest.skip("needs root and a memory controller")
    directory = hierarchy / f"kuasar-it-oomwatch-{os.getpid()}"
    directory.mkdir()
    try:
        yield directory
    finally:
        if directory.exists():
            for pid in (directory / "cgroup.procs").read_text().split():
                os.kill(int(pid), 9)
            for _ in range(100):
                try:
                    directory.rmdir()
                    break
                except OSError:
                    asyncio.run(asyncio.sleep(0.05))


def limit_memory(directory: Path, limit: int) -> None:
    if cgroups.is_unified():
        (directory / "memory.max").write_text(str(limit))
        if (directory / "memory.swap.max").exists():  # else the hog swaps instead of being killed
            (directory / "memory.swap.max").write_text("0")
    else:
        (directory / "memory.limit_in_bytes").write_text(str(limit))


def in_cgroup(directory: Path, *argv: str) -> subprocess.Popen:
    procs = str(directory / "cgroup.procs")
    return subprocess.Popen(argv, preexec_fn=lambda: Path(procs).write_text(str(os.getpid())))  # noqa: PLW1509


def test_an_oom_kill_is_reported(memcg: Path) -> None:
    limit_memory(memcg, 16 << 20)
    sleeper = in_cgroup(memcg, "sleep", "30")

    async def scenario() -> int:
        seen = asyncio.Event()
        count = 0

        def on_oom() -> None:
            nonlocal count
            count += 1
            seen.set()

        watch = OomWatch(sleeper.pid, on_oom)
        hog = in_cgroup(memcg, sys.executable, "-c", "b = []\nwhile True: b.append(bytearray(1 << 20))")
        try:
            await asyncio.wait_for(seen.wait(), 20)
        finally:
            watch.close()
            hog.kill()
            hog.wait()
        return count

    try:
        assert asyncio.run(scenario()) >= 1
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_removed_cgroup_is_not_an_oom_kill(memcg: Path) -> None:
    # cgroup v1 signals the eventfd when the cgroup goes: CRI would show the container "OOMKilled".
    sleeper = in_cgroup(memcg, "sleep", "30")

    async def scenario() -> list[str]:
        calls: list[str] = []
        watch = OomWatch(sleeper.pid, lambda: calls.append("oom"))
        try:
            sleeper.kill()
            sleeper.wait()
            memcg.rmdir()
            await asyncio.sleep(1.0)  # the kernel signals the removal from a workqueue
        finally:
            watch.close()
        return calls

    assert asyncio.run(scenario()) == []


def test_an_oom_kill_not_yet_handled_by_the_loop_is_reported_by_check_now_once(memcg: Path) -> None:
    # A container's exit and its OOM notification wait in the same loop turn; the exit handled first
    # gave CRI's reason Error (wasm could even close the watch before the OOM was ever read).
    limit_memory(memcg, 16 << 20)
    sleeper = in_cgroup(memcg, "sleep", "30")

    async def scenario() -> list[str]:
        calls: list[str] = []
        watch = OomWatch(sleeper.pid, lambda: calls.append("oom"))
        hog = in_cgroup(memcg, sys.executable, "-c", "b = []\nwhile True: b.append(bytearray(1 << 20))")
        hog.wait(20)  # blocking: the loop has not looked at the watch
        try:
            watch.check_now()
            calls.append("exit published")
            await asyncio.sleep(0.2)  # the loop's own notification now finds nothing new
            watch.check_now()
        finally:
            watch.close()
        return calls

    try:
        assert asyncio.run(scenario()) == ["oom", "exit published"]
    finally:
        sleeper.kill()
        sleeper.wait()
