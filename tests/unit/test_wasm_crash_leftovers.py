"""What a wasm task server killed with `kill -9` leaves, and what its successor (or its own process
model) does about it: container processes die with it even while they compile; a container's cgroup
(beside the pod's, in a parent kubelet made) and rootfs mount are recorded before they are made, and
removed by the next task server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kuasar.common import cgroups, mounts
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types import mount_pb2
from kuasar.common.proc_stat import exited, start_time
from kuasar.wasm import tasks as wasm_tasks
from kuasar.wasm.leftovers import CONTAINERS_DIR, ContainerLeftovers, ContainerRecords
from tests.support.cgroupfs import cgroup, empty, stand_in_cgroupfs

POD_CGROUP = "kubepods/burstable/podUID"  # kubelet's: not ours to remove

# A task server that launches one container process whose module takes 5 s to compile (wasmtime on a
# large module under a CPU limit), then waits; it prints the container process's pid.
SLOW_COMPILE_SERVER = r'''
import asyncio, time
from kuasar.wasm import launch as L
from kuasar.wasm.runner import RunSpec
from kuasar.common.reaper import Reaper

class SlowCompile:
    def __init__(self, run):
        time.sleep(5)
    def run(self):
        return 0

L.WasmtimeModule = SlowCompile

async def main():
    reaper = Reaper()
    reaper.install()
    started = L.launch(L.LaunchPlan("c1", "wasmtime", RunSpec("/x.wasm", ["/x.wasm"], [])), L.Stdio(), reaper, True)
    print(started.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
'''


def test_a_wasm_container_process_dies_with_its_task_server_while_it_compiles() -> None:
    # Its death signal was set only once the module was compiled: a task server killed meanwhile left it
    # compiling, then running, in the pod's cgroup and namespaces, known to nobody.
    server = subprocess.Popen([sys.executable, "-c", SLOW_COMPILE_SERVER], stdout=subprocess.PIPE)
    assert server.stdout is not None
    child = int(server.stdout.readline())
    started = start_time(child)
    try:
        time.sleep(0.3)  # the child is compiling
        server.kill()
        server.wait()
        deadline = time.monotonic() + 2
        while start_time(child) == started and not exited(child) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert start_time(child) != started or exited(child), "the container process outlived its task server"
    finally:
        server.stdout.close()
        if start_time(child) == started:
            os.kill(child, signal.SIGKILL)


class Unmounts:
    """Stands in for mounting and unmounting a rootfs (no mount is made here)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mounted: list[Path] = []
        self.unmounted: list[Path] = []
        monkeypatch.setattr(mounts, "mount_rootfs", lambda layers, target: self.mounted.append(target))
        monkeypatch.setattr(mounts, "unmount_all", self.unmounted.append)


@pytest.fixture
def cgroup_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in cgroup v2 hierarchy holding kubelet's pod cgroup and the pod's process leaf in it."""
    root = tmp_path / "cgroup"
    (root / POD_CGROUP / "pod1").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("memory pids\n")
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", root)
    monkeypatch.setattr(cgroups, "_USERS", {})
    stand_in_cgroupfs(monkeypatch)
    return root


def wasm_tasks_in(directory: Path) -> wasm_tasks.WasmTasks:
    return wasm_tasks.WasmTasks(reaper=None, events=None, directory=directory,  # type: ignore[arg-type]
                                settings=wasm_tasks.WasmSettings(cache=False))


def create_request(tmp_path: Path, container_id: str) -> task.CreateTaskRequest:
    """CRI's Create of a container of pod1, its cgroupsPath as containerd makes it: <cgroup_parent>/<id>."""
    bundle = tmp_path / "bundles" / container_id
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "rootfs" / "m.wasm").write_bytes(b"\0asm\x01\0\0\0")
    (bundle / "config.json").write_text(json.dumps({
        "annotations": {"io.kubernetes.cri.sandbox-id": "pod1"}, "process": {"args": ["/m.wasm"]},
        "root": {"path": "rootfs"}, "linux": {"cgroupsPath": f"/{POD_CGROUP}/{container_id}"}}))
    return task.CreateTaskRequest(id=container_id, bundle=str(bundle),
                                  rootfs=[mount_pb2.Mount(type="overlay", source="overlay")])


def create_until_the_launch(tasks: wasm_tasks.WasmTasks, req: task.CreateTaskRequest) -> None:
    """Create, failing where the process would be started (the task server is killed there, or the
    module does not run)."""
    async def killed_here(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the task server ends here")

    tasks._launch = killed_here  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="ends here"):
        asyncio.run(tasks.create(req, SimpleNamespace(namespace="k8s.io")))  # type: ignore[arg-type]


def test_a_containers_cgroup_beside_the_pods_and_its_rootfs_mount_go_with_the_next_task_server(
        tmp_path: Path, cgroup_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The wasm task server has no runc root to go by: the container's cgroup, which containerd puts in
    # kubelet's pod cgroup beside the pod's process leaf (below no cgroup the pod's record lists), and
    # its rootfs mount were left for good by a task server killed while they stood.
    directory = tmp_path / "sandboxer"
    record = directory / CONTAINERS_DIR / "c1.json"
    made_with_a_record: list[bool] = []
    real_create = cgroups.PodCgroup.create

    def create(cgroup: cgroups.PodCgroup, before_making=None) -> None:  # noqa: ANN001
        def recorded_first(made: cgroups.PodCgroup) -> None:
            before_making(made)
            made_with_a_record.append(json.loads(record.read_text())["cgroup"] == made.path)
        real_create(cgroup, recorded_first)

    monkeypatch.setattr(cgroups.PodCgroup, "create", create)
    rootfs = Unmounts(monkeypatch)
    dead = wasm_tasks_in(directory)

    async def killed_before_it_undoes_anything(container: wasm_tasks.Container) -> None:
        pass

    dead._release = killed_before_it_undoes_anything  # type: ignore[method-assign]
    create_until_the_launch(dead, create_request(tmp_path, "c1"))
    container_cgroup = cgroup_root / POD_CGROUP / "c1"
    assert made_with_a_record == [True] and container_cgroup.is_dir()
    assert json.loads(record.read_text()) == {"cgroup": f"{POD_CGROUP}/c1",
                                              "rootfs": str(tmp_path / "bundles" / "c1" / "rootfs")}

    asyncio.run(wasm_tasks_in(directory).sweep_leftovers())  # the next task server, before it serves
    assert not container_cgroup.exists()
    assert rootfs.unmounted == [tmp_path / "bundles" / "c1" / "rootfs"]
    assert not record.exists()
    assert (cgroup_root / POD_CGROUP / "pod1").is_dir(), "kubelet's cgroup and the pod's are left to them"


def test_a_container_undone_by_its_own_task_server_leaves_no_record(
        tmp_path: Path, cgroup_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rootfs = Unmounts(monkeypatch)
    tasks = wasm_tasks_in(tmp_path / "sandboxer")
    create_until_the_launch(tasks, create_request(tmp_path, "c1"))  # a Create that fails: its _release
    assert rootfs.unmounted == rootfs.mounted == [tmp_path / "bundles" / "c1" / "rootfs"]
    assert not (cgroup_root / POD_CGROUP / "c1").exists()
    assert not (tmp_path / "sandboxer" / CONTAINERS_DIR / "c1.json").exists()


def test_a_leftover_containers_cgroup_is_emptied_and_its_record_kept_while_it_is_in_use(
        tmp_path: Path, cgroup_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Unmounts(monkeypatch)
    records = ContainerRecords(tmp_path / "sandboxer")
    left = subprocess.Popen(["sleep", "30"])  # an exec that was still starting, say
    try:
        busy = cgroup(cgroup_root / POD_CGROUP / "c2", left.pid)
        records.write("c2", ContainerLeftovers(f"{POD_CGROUP}/c2"))
        records.write("nothing", ContainerLeftovers())  # nothing to record: no file
        (records.directory / ".c3.json.tmp").write_text('{"cgrou')  # its writer died before the rename
        assert records.sweep() == 1
        assert not (records.directory / ".c3.json.tmp").exists()
        assert left.wait(timeout=5) == -9
        assert busy.exists() and (records.directory / "c2.json").exists()
        empty(busy)
        assert records.sweep() == 1  # the next task server's
        assert not busy.exists() and list(records.directory.iterdir()) == []
    finally:
        left.kill()
        left.wait()


def test_a_cgroup_that_existed_before_the_container_is_not_swept(
        tmp_path: Path, cgroup_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A cgroupsPath naming a cgroup that was there already (`ctr run --cgroup`, a service's): it was
    # recorded all the same, and the next task server killed whatever ran in it.
    Unmounts(monkeypatch)
    theirs = subprocess.Popen(["sleep", "30"])
    try:
        cgroup(cgroup_root / POD_CGROUP / "c1", theirs.pid)
        dead = wasm_tasks_in(tmp_path / "sandboxer")

        async def killed_before_it_undoes_anything(container: wasm_tasks.Container) -> None:
            pass

        dead._release = killed_before_it_undoes_anything  # type: ignore[method-assign]
        create_until_the_launch(dead, create_request(tmp_path, "c1"))
        asyncio.run(wasm_tasks_in(tmp_path / "sandboxer").sweep_leftovers())
        assert theirs.poll() is None, "a process of a cgroup the container did not make was killed"
        assert (cgroup_root / POD_CGROUP / "c1").is_dir()
    finally:
        theirs.kill()
        theirs.wait()
