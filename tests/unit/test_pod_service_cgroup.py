"""A pod's move into its cgroup, made by the attach-lock warmer after Create has answered."""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
from pathlib import Path

from kuasar.common import cgroups
from kuasar.common.pod_service import Pod, PodService
from kuasar.common.reaper import Reaper

WAIT_S = 5.0


class FakeWarmer:
    """Records placements; each one's outcome is given by the test."""

    def __init__(self, error: OSError | None) -> None:
        self.error = error
        self.placed: list[tuple[list[Path], int]] = []

    def place(self, procs_files: list[Path], pid: int) -> concurrent.futures.Future[None]:
        self.placed.append((procs_files, pid))
        outcome: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self.error is None:
            outcome.set_result(None)
        else:
            outcome.set_exception(self.error)
        return outcome


def _placement(error: OSError | None) -> tuple[list[tuple[list[Path], int]], int | None]:
    """Place a real child process through PodService; return what the warmer was asked to do and how
    the child ended (None: still running, then killed here)."""
    async def main() -> tuple[list[tuple[list[Path], int]], int | None]:
        warmer = FakeWarmer(error)
        service = PodService(Reaper(), containers=None, attach_warmer=warmer)  # type: ignore[arg-type]
        child = subprocess.Popen(["sleep", "30"])
        try:
            loop = asyncio.get_running_loop()
            pod = Pod("p1", child.pid, loop.create_future(), cgroups.PodCgroup("kuasar-unit/p1"))
            service.pods[pod.id] = pod
            assert pod.cgroup is not None
            pod.placed = service._place(pod, pod.cgroup)
            assert pod.placed is not None
            await asyncio.gather(pod.placed, return_exceptions=True)
            await asyncio.sleep(0)  # the done callback
            try:
                return warmer.placed, child.wait(timeout=WAIT_S if error is not None else 0.2)
            except subprocess.TimeoutExpired:
                return warmer.placed, None
        finally:
            child.kill()
            child.wait()

    return asyncio.run(main())


def test_the_warmer_is_asked_to_write_the_pods_pid_into_every_hierarchy() -> None:
    placed, ended = _placement(None)
    [(files, _pid)] = placed
    assert files == cgroups.PodCgroup("kuasar-unit/p1").procs_files()
    assert all(path.name == "cgroup.procs" and "kuasar-unit/p1" in str(path) for path in files)
    assert ended is None  # a placed pod keeps running


def test_a_failed_move_stops_the_pod() -> None:
    placed, ended = _placement(PermissionError(13, "Permission denied"))
    assert placed and ended == -9  # SIGKILL: the sandbox reports its exit, as a pod that never ran
