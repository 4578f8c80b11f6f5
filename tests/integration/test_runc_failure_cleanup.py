"""What a Create that fails or is cancelled half way leaves behind: nothing. Real runc, real mounts and
cgroups, the task server's classes driven in-process (no containerd: only these paths are exercised).

A ttrpc handler is cancelled when its deadline passes or its connection drops; runc, once started, goes
on regardless, so what it made must be undone after it finishes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import psutil
import pytest

from kuasar.common import cgroups, mounts, pod_service
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types import mount_pb2
from kuasar.common.api.kuasar.pods.v1 import pods_pb2
from kuasar.common.errors import InvalidArgument, RuntimeFailure
from kuasar.common.events import EventPublisher
from kuasar.common.fifo_stdio import ProcessIO
from kuasar.common.host_runc_tasks import RuncTasks
from kuasar.common.reaper import Reaper
from kuasar.common.ttrpc import Context
from tests.support import images

from .cri_helpers import mounts_containing

pytestmark = pytest.mark.integration

CID = "failure-cleanup"
CONTEXT = Context("containerd.task.v3.Task", "Create", MappingProxyType({}), None, None, 0)


@pytest.fixture(scope="module")
def image_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rootfs = tmp_path_factory.mktemp("image") / "rootfs"
    rootfs.mkdir()
    images.extract_busybox_rootfs(rootfs)
    return rootfs


def make_bundle(base: Path, terminal: bool = False) -> Path:
    bundle = base / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = terminal
    spec["process"]["args"] = ["sleep", "3600"]
    spec["root"] = {"path": "rootfs", "readonly": True}
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def create_request(bundle: Path, rootfs: Path, terminal: bool = False) -> task.CreateTaskRequest:
    bind = mount_pb2.Mount(type="bind", source=str(rootfs), options=["rbind", "ro"])
    return task.CreateTaskRequest(id=CID, bundle=str(bundle), rootfs=[bind], terminal=terminal)


def runc_containers(tasks: RuncTasks) -> list[str]:
    out = subprocess.run(["runc", "--root", str(tasks.runc.root), "list", "-q"], capture_output=True, text=True)
    return out.stdout.split()


def pod_processes(comm: str) -> list[int]:
    return [proc.pid for proc in psutil.process_iter(["name", "status"])
            if proc.info["name"] == comm and proc.info["status"] != psutil.STATUS_ZOMBIE]


def mounted(path: Path) -> bool:
    return str(path) in mounts_containing(str(path))


async def cancel_once_started(work: Awaitable[Any], started: asyncio.Event, delay: float = 0.0) -> None:
    """Cancel `work` `delay` seconds after `started` is set (what a passing deadline or a dropped
    connection does to a ttrpc handler), and let it unwind."""
    running = asyncio.ensure_future(work)
    await started.wait()
    await asyncio.sleep(delay)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


def signalling(method: Callable[..., Awaitable[Any]], started: asyncio.Event) -> Callable[..., Awaitable[Any]]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started.set()
        return await method(*args, **kwargs)
    return wrapper


def run_with_tasks(tmp_path: Path, body: Callable[[RuncTasks], Awaitable[None]]) -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.install()
        tasks = RuncTasks(reaper, EventPublisher(""), tmp_path / "task-server")
        try:
            await body(tasks)
        finally:
            for container_id in list(tasks.containers):
                tasks.containers[container_id].init.status = 3  # stopped, so that Delete goes ahead
                await tasks.runc.kill(container_id, 9)
                await tasks.delete(task.DeleteRequest(id=container_id), CONTEXT)

    asyncio.run(main())


def test_a_task_create_cancelled_while_runc_runs_leaves_nothing_and_the_id_free(tmp_path: Path,
                                                                                image_rootfs: Path) -> None:
    bundle = make_bundle(tmp_path)

    async def body(tasks: RuncTasks) -> None:
        started = asyncio.Event()
        real_create = tasks.runc.create
        tasks.runc.create = signalling(real_create, started)  # type: ignore[method-assign]
        # runc create takes ~20 ms here: 2 ms in, it is under way
        await cancel_once_started(tasks.create(create_request(bundle, image_rootfs), CONTEXT), started, 0.002)
        assert CID not in tasks.containers
        assert runc_containers(tasks) == []  # runc finished its create, then it was deleted
        assert not mounted(bundle / "rootfs")
        tasks.runc.create = real_create  # type: ignore[method-assign]
        created = await tasks.create(create_request(bundle, image_rootfs), CONTEXT)
        assert created.pid > 0 and runc_containers(tasks) == [CID]

    run_with_tasks(tmp_path, body)


def test_a_task_create_failing_after_runc_created_the_container_deletes_it(tmp_path: Path, image_rootfs: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = make_bundle(tmp_path, terminal=True)
    real_receive = ProcessIO.receive_console

    async def console_then_failure(io: ProcessIO) -> None:
        await real_receive(io)  # runc made the container and handed over its console
        raise RuntimeFailure("the console could not be used")

    monkeypatch.setattr(ProcessIO, "receive_console", console_then_failure)

    async def body(tasks: RuncTasks) -> None:
        with pytest.raises(RuntimeFailure, match="console could not be used"):
            await tasks.create(create_request(bundle, image_rootfs, terminal=True), CONTEXT)
        assert CID not in tasks.containers
        assert runc_containers(tasks) == []
        assert not mounted(bundle / "rootfs")

    run_with_tasks(tmp_path, body)


@pytest.mark.parametrize("config", [
    "[]", "{not json", '{"linux": "x"}', '{"mounts": {}}',
    '{"annotations": {"io.kubernetes.cri.sandbox-id": 5}}',
])
def test_a_malformed_spec_is_invalid_argument_before_anything_is_mounted(tmp_path: Path, image_rootfs: Path,
                                                                         config: str) -> None:
    bundle = make_bundle(tmp_path)
    (bundle / "config.json").write_text(config)

    async def body(tasks: RuncTasks) -> None:
        with pytest.raises(InvalidArgument):
            await tasks.create(create_request(bundle, image_rootfs), CONTEXT)
        assert not mounted(bundle / "rootfs")
        assert runc_containers(tasks) == []

    run_with_tasks(tmp_path, body)


def test_a_pod_create_cancelled_while_its_process_starts_leaves_no_cgroup_or_shm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parent, pod = f"kuasar-test-cancel-{os.getpid()}", f"c{os.getpid()}"
    shm = tmp_path / "dir" / "pods" / pod / "shm"
    started = asyncio.Event()
    monkeypatch.setattr(pod_service, "start_pod_holder", signalling(pod_service.start_pod_holder, started))

    class NoContainers:
        async def remove_pod_containers(self, pod_id: str) -> None:
            pass

        def pod_container_ids(self, pod_id: str) -> list[str]:
            return []

    async def main() -> None:
        reaper = Reaper()
        reaper.install()
        service = pod_service.PodService(reaper, NoContainers(), directory=tmp_path / "dir")
        request = pods_pb2.CreatePodRequest(id=pod, new_ipc=True, cgroup_parent=f"{parent}/{pod}",
                                            shm_size=1 << 20)
        try:
            await cancel_once_started(service.create(request, CONTEXT), started)
        finally:
            for left in service.pods.values():  # only if the test fails
                os.kill(left.pid, 9)
        assert service.pods == {}
        async with asyncio.timeout(10):  # the pod process is killed once it has reported in
            while pod_processes(f"pod-{pod}"):  # noqa: ASYNC110 - no event tells of another process
                await asyncio.sleep(0.01)
        assert not mounted(shm)
        assert [root for root in cgroups.hierarchy_roots() if (root / parent).exists()] == []

    try:
        asyncio.run(main())
    finally:
        mounts.unmount_all(shm)
        for root in cgroups.hierarchy_roots():
            for leftover in (root / parent / pod, root / parent):
                if leftover.exists():
                    leftover.rmdir()


def test_every_layer_of_a_tall_rootfs_is_unmounted(tmp_path: Path) -> None:
    target = tmp_path / "rootfs"
    layers = [mount_pb2.Mount(type="tmpfs", source="layer", options=["size=64k"]) for _ in range(40)]
    try:
        with pytest.raises(RuntimeFailure):  # the 41st fails: the 40 below it come off again
            mounts.mount_rootfs([*layers, mount_pb2.Mount(type="no-such-fs", source="x")], target)
        assert not mounted(target)
        mounts.mount_rootfs(layers, target)
        mounts.unmount_all(target)  # what removing a container does
        assert not mounted(target)
    finally:
        while mounted(target):
            subprocess.run(["umount", str(target)], check=True)
