"""A pod's move into its cgroup, made by the attach-lock warmer after Create has answered."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kuasar.common import cgroups, pod_leftovers, proc_stat
from kuasar.common.api.kuasar.pods.v1 import pods_pb2 as pb
from kuasar.common.errors import FailedPrecondition, InvalidArgument, NotFound
from kuasar.common.pod_files import PODS_DIR
from kuasar.common.pod_service import Pod, PodService
from kuasar.common.reaper import Reaper

WAIT_S = 5.0


class FakeWarmer:
    """Runs submitted work at once (the real one runs it on its thread), or fails it with `error`."""

    def __init__(self, error: OSError | None) -> None:
        self.error = error
        self.submitted = 0

    def submit(self, work: Callable[[], None]) -> concurrent.futures.Future[None]:
        self.submitted += 1
        outcome: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self.error is None:
            work()
            outcome.set_result(None)
        else:
            outcome.set_exception(self.error)
        return outcome


def _placement(error: OSError | None) -> tuple[int, int, int | None]:
    """Place a real child process through PodService; return how often the warmer was asked, the
    child's pid and how it ended (None: still running, then killed here)."""
    async def main() -> tuple[int, int, int | None]:
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
                return warmer.submitted, child.pid, child.wait(timeout=WAIT_S if error is not None else 0.2)
            except subprocess.TimeoutExpired:
                return warmer.submitted, child.pid, None
        finally:
            child.kill()
            child.wait()

    return asyncio.run(main())


def fake_hierarchies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *names: str) -> list[Path]:
    """Empty directories standing for cgroup hierarchies' roots, as cgroups.hierarchy_roots gives them."""
    roots = [tmp_path / name for name in names]
    for root in roots:
        root.mkdir()
    monkeypatch.setattr(cgroups, "hierarchy_roots", lambda: roots)
    return roots


def test_the_warmer_writes_the_pods_pid_into_every_hierarchy(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    roots = [tmp_path / "memory", tmp_path / "pids"]
    for root in roots:
        (root / "kuasar-unit" / "p1").mkdir(parents=True)
        (root / "kuasar-unit" / "p1" / "cgroup.procs").write_text("")
    monkeypatch.setattr(cgroups, "hierarchy_roots", lambda: roots)
    submitted, pid, ended = _placement(None)
    assert submitted == 1
    assert [(root / "kuasar-unit" / "p1" / "cgroup.procs").read_text() for root in roots] == [str(pid)] * 2
    assert ended is None  # a placed pod keeps running


def test_a_failed_move_stops_the_pod() -> None:
    submitted, _pid, ended = _placement(PermissionError(13, "Permission denied"))
    assert submitted == 1 and ended == -9  # SIGKILL: the sandbox reports its exit, as a pod that never ran


def test_a_user_namespaced_pod_without_a_netns_or_on_a_launcher_is_refused_before_anything_is_made() -> None:
    """The task server's own guard (the sandboxer refuses these first): nothing to join, or a type whose
    pods its launcher makes (gVisor's)."""
    async def main() -> None:
        plain = PodService(Reaper(), containers=None)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="needs a netns"):
            await plain.create(pb.CreatePodRequest(id="u1", userns=True), None)  # type: ignore[arg-type]
        launched = PodService(Reaper(), containers=None, launcher=object())  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="cannot have their own user namespace"):
            await launched.create(pb.CreatePodRequest(id="u2", userns=True, netns_path="/proc/self/ns/net"),
                                  None)  # type: ignore[arg-type]
        assert plain.pods == {} and launched.pods == {}

    asyncio.run(main())


def test_a_parent_made_for_two_pods_goes_with_the_last_of_them(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    roots = fake_hierarchies(tmp_path, monkeypatch, "memory", "pids")
    monkeypatch.setattr(cgroups, "_USERS", {})
    first, second = cgroups.PodCgroup("made/pod-a"), cgroups.PodCgroup("made/pod-b")
    first.create()
    second.create()
    first.remove()
    assert all((root / "made" / "pod-b").is_dir() for root in roots)
    assert not any((root / "made" / "pod-a").exists() for root in roots)
    second.remove()
    assert [list(root.iterdir()) for root in roots] == [[], []]
    assert cgroups._USERS == {}


def test_a_cgroup_that_leaves_its_parents_removes_only_itself(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    roots = fake_hierarchies(tmp_path, monkeypatch, "memory")
    monkeypatch.setattr(cgroups, "_USERS", {})
    pod, container = cgroups.PodCgroup("k8s.io/pod"), cgroups.PodCgroup("k8s.io/container")
    pod.create()
    container.create()
    container.leave_parents()  # as runc leaves a container's parents (wasm-sandboxer does the same)
    container.remove()
    pod.remove()  # the parent was made for the pod, and goes with it
    assert list(roots[0].iterdir()) == []
    assert cgroups._USERS == {}


def test_a_pod_process_goes_into_a_cgroup_of_its_own_below_the_pods(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # It went into the pod's cgroup itself, the parent of its containers' cgroups: cgroup v2 refuses
    # controllers to the children of a cgroup that holds a process, so the containers got no limits.
    roots = fake_hierarchies(tmp_path, monkeypatch, "memory", "pids")
    cgroup = cgroups.PodCgroup("kubepods/pod1", process_leaf="p1")
    cgroup.create()
    assert cgroup.path == "kubepods/pod1" and cgroup.process_path == "kubepods/pod1/p1"
    cgroup.add(4242)
    for root in roots:
        assert (root / "kubepods" / "pod1" / "p1" / "cgroup.procs").read_text() == "4242"
        assert not (root / "kubepods" / "pod1" / "cgroup.procs").exists()
        (root / "kubepods" / "pod1" / "p1" / "cgroup.procs").unlink()  # a real cgroup's file goes with it
    cgroup.remove()
    assert [list(root.iterdir()) for root in roots] == [[], []]
    with pytest.raises(InvalidArgument):
        cgroups.PodCgroup("kubepods/pod1", process_leaf="../escape")


def test_a_cgroup_another_process_makes_meanwhile_is_used_and_left_to_it(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Between our exists() and mkdir() another task server (another sandbox type, the same new
    # cgroup_parent) made it: Create failed with FileExistsError.
    [root] = fake_hierarchies(tmp_path, monkeypatch, "memory")
    real_exists = Path.exists

    def made_meanwhile(path: Path) -> bool:
        found = real_exists(path)
        if path == root / "shared" and not found:
            path.mkdir()  # the other process wins the race
        return found

    monkeypatch.setattr(Path, "exists", made_meanwhile)
    cgroup = cgroups.PodCgroup("shared/pod1")
    cgroup.create()
    assert cgroup.created == [str(root / "shared" / "pod1")]
    cgroup.remove()
    assert (root / "shared").is_dir() and not (root / "shared" / "pod1").exists()


def test_a_delete_of_a_pod_being_made_waits_for_it_and_removes_it() -> None:
    """The Create of a caller that gave up (a cancelled Start: ttrpc sends no cancel) goes on in the task
    server. A Delete that answered NotFound meanwhile left the pod it made running for good."""

    class SlowLauncher:  # gVisor's: runsc create and start take ~0.5 s
        def __init__(self, pid: int) -> None:
            self.pid = pid
            self.go = asyncio.Event()
            self.released: list[str] = []

        async def launch_pod(self, req: pb.CreatePodRequest, cgroup: object) -> int:
            await self.go.wait()
            return self.pid

        async def release_pod(self, pod_id: str) -> None:
            self.released.append(pod_id)

    class NoContainers:
        async def remove_pod_containers(self, pod_id: str) -> None:
            pass

    async def main() -> None:
        reaper = Reaper()
        reaper.install()
        child = subprocess.Popen(["sleep", "30"])
        try:
            launcher = SlowLauncher(child.pid)
            service = PodService(reaper, containers=NoContainers(), launcher=launcher)  # type: ignore[arg-type]
            pod_id = "p" * 64
            creating = asyncio.create_task(service.create(pb.CreatePodRequest(id=pod_id), None))  # type: ignore[arg-type]
            await asyncio.sleep(0.01)
            deleting = asyncio.create_task(service.delete(pb.PodRequest(id=pod_id), None))  # type: ignore[arg-type]
            await asyncio.sleep(0.01)
            assert not deleting.done()  # not NotFound: it waits for the pod being made
            launcher.go.set()
            await creating
            await asyncio.wait_for(deleting, 5)
            assert launcher.released == [pod_id] and pod_id not in service.pods
            assert not os.path.exists(f"/proc/{child.pid}"), "the pod's process was killed and reaped"
        finally:
            child.kill()

    asyncio.run(main())


def test_what_a_pod_holds_is_recorded_before_its_process_is_known(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A task server killed while a pod's process was being started left the cgroups made for it: its
    # record was only written once the process was known.
    (tmp_path / "cg").mkdir()
    roots = fake_hierarchies(tmp_path / "cg", monkeypatch, "memory")
    monkeypatch.setattr(cgroups, "_USERS", {})

    class SlowLauncher:
        def __init__(self) -> None:
            self.go = asyncio.Event()
            self.fail = False

        async def launch_pod(self, req: pb.CreatePodRequest, cgroup: object) -> int:
            await self.go.wait()
            if self.fail:
                raise RuntimeError("runsc create failed")
            return os.getpid()

    async def main() -> None:
        launcher = SlowLauncher()
        directory = tmp_path / "sandboxer"
        service = PodService(Reaper(), containers=None, launcher=launcher, directory=directory)  # type: ignore[arg-type]
        record = directory / PODS_DIR / ("p" * 64) / pod_leftovers.RECORD_FILE
        creating = asyncio.create_task(service.create(
            pb.CreatePodRequest(id="p" * 64, cgroup_parent="kubepods/pod-p"), None))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        made = [str(root / "kubepods") for root in roots] + [str(root / "kubepods" / "pod-p") for root in roots]
        assert json.loads(record.read_text()) == {"pid": 0, "start": 0, "cgroups": made, "shm": ""}
        launcher.fail = True
        launcher.go.set()
        with pytest.raises(RuntimeError):
            await creating
        assert not record.exists() and [list(root.iterdir()) for root in roots] == [[]]

    asyncio.run(main())


def test_the_delete_of_a_pod_a_dead_task_server_left_tries_its_kept_record_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The sweep keeps the record of a pod whose cgroups would not go; the sandboxer's Shutdown then
    # removed the pod's directory, record and all, and nothing was ever tried again.
    left: dict[Path, bool] = {}

    async def retry(pod_directory: Path) -> bool:
        return not left.pop(pod_directory, False)

    monkeypatch.setattr(pod_leftovers, "retry", retry)
    directory = tmp_path / "sandboxer"
    service = PodService(Reaper(), containers=None, directory=directory)  # type: ignore[arg-type]
    pod_id = "p" * 64
    left[directory / PODS_DIR / pod_id] = True

    async def delete() -> None:
        await service.delete(pb.PodRequest(id=pod_id), None)  # type: ignore[arg-type]

    with pytest.raises(FailedPrecondition, match="still in use"):
        asyncio.run(delete())  # so that its Shutdown is tried again
    with pytest.raises(NotFound):  # nothing left of it now: as for any pod it does not know
        asyncio.run(delete())


class SlowWarmer:
    """Runs submitted work on a thread of its own after `delay` (a burst, an RCU grace period)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.pool = concurrent.futures.ThreadPoolExecutor(1)

    def submit(self, work: Callable[[], None]) -> concurrent.futures.Future[None]:
        def later() -> None:
            import time
            time.sleep(self.delay)
            work()
        return self.pool.submit(later)


@pytest.mark.parametrize("request_kind", ["Kill", "Delete"])
def test_a_pod_is_signalled_only_once_its_move_into_its_cgroup_is_done(request_kind: str) -> None:
    # Kill did not wait for the move, Delete waited only after the pod was killed and reaped: the warmer's
    # thread, behind, wrote a pid already free (another process's once reused) into the pod's cgroup.
    written: list[tuple[int, bool]] = []

    class RecordingCgroup(cgroups.PodCgroup):
        def add(self, pid: int) -> None:
            written.append((pid, os.path.exists(f"/proc/{pid}") and not proc_stat.exited(pid)))

        def remove(self) -> None:
            pass

    class NoContainers:
        async def kill_pod_containers(self, pod_id: str, sig: int) -> None: ...
        async def remove_pod_containers(self, pod_id: str) -> None: ...

    async def main() -> None:
        reaper = Reaper()
        reaper.install()
        service = PodService(reaper, containers=NoContainers(), attach_warmer=SlowWarmer(0.1))  # type: ignore[arg-type]
        child = subprocess.Popen(["sleep", "30"])
        try:
            pod = Pod("p1", child.pid, reaper.watch(child.pid, 0), RecordingCgroup("kuasar-unit/p1"))
            service.pods[pod.id] = pod
            assert pod.cgroup is not None
            pod.placed = service._place(pod, pod.cgroup)
            if request_kind == "Kill":
                await service.kill(pb.KillPodRequest(id="p1", signal=9), None)  # type: ignore[arg-type]
                await asyncio.wait_for(asyncio.shield(pod.exit), WAIT_S)
            else:
                await asyncio.wait_for(service.delete(pb.PodRequest(id="p1"), None), WAIT_S)  # type: ignore[arg-type]
            assert written == [(child.pid, True)]  # written while the pod still lived
        finally:
            child.kill()
            child.wait()

    asyncio.run(main())
