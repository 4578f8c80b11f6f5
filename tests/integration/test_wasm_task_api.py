"""The wasm task server's Task API driven directly (what CRI never calls): created-but-not-started
processes, pause/resume through the freezer, pids, connect, exec lifecycle, update, unimplemented
methods, ResizePty ignored without a terminal, and the events published for all of it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from google.protobuf import any_pb2

from kuasar.common import cgroups
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2 as sb
from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2_grpc as sb_grpc
from kuasar.common.api.containerd.types import mount_pb2
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from kuasar.common.ttrpc import TtrpcClient

from .conftest import Stack
from .cri_helpers import mounts_containing, start_sandbox
from .wasm_stack import assemble_modules, stack_fixture

pytestmark = pytest.mark.integration

TASK = "containerd.task.v3.Task"
NS = {"containerd-namespace-ttrpc": "k8s.io"}
POD = "d" * 64
CID = "direct-wasm"
MiB = 1 << 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_fixture(tmp_path_factory, "kuasar-wa1", "10.253.128.0/17")


def mounted(path: Path) -> bool:
    return str(path) in mounts_containing(str(path))


def make_bundle(base: Path, name: str, pod_pid: int, args: list[str], cgroup: str) -> tuple[Path, Path]:
    """A CRI-shaped bundle: the pod's namespaces, a cgroup, a memory limit, and an image rootfs to bind."""
    rootfs = base / "image-rootfs"
    if not rootfs.exists():
        rootfs.mkdir(parents=True)
        for module, data in assemble_modules().items():
            (rootfs / f"{module}.wasm").write_bytes(data)
    bundle = base / name
    (bundle / "rootfs").mkdir(parents=True)
    spec = {
        "ociVersion": "1.1.0",
        "process": {"args": args, "env": ["PATH=/"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs", "readonly": True},
        "annotations": {"io.kubernetes.cri.sandbox-id": POD},
        "linux": {
            "cgroupsPath": cgroup,
            "resources": {"memory": {"limit": 64 * MiB}, "cpu": {"shares": 256}},
            "namespaces": [{"type": "pid"}, {"type": "mount"}] + [
                {"type": kind, "path": f"/proc/{pod_pid}/ns/{ns}"}
                for kind, ns in (("ipc", "ipc"), ("uts", "uts"), ("network", "net"))],
        },
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle, rootfs


async def call(client: TtrpcClient, method: str, request, response_type=None):
    return await client.call(TASK, method, request, response_type, timeout=30, metadata=NS)


def process_spec(args: list[str]) -> any_pb2.Any:
    return any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                       value=json.dumps({"args": args, "cwd": "/", "env": ["PATH=/"]}).encode())


def test_task_api_beyond_cri(stack: Stack, tmp_path: Path) -> None:
    events_out = tmp_path / "events.txt"
    with open(events_out, "wb") as sink:
        watcher = subprocess.Popen([str(stack.containerd.ctr_bin), "--address", stack.address, "events"],
                                   stdout=sink, stderr=subprocess.STDOUT)
    time.sleep(0.3)
    cgroup = f"kuasar-wasm-direct-{os.getpid()}"

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(f"unix://{stack.sandboxer_socket}") as channel:
            controller = sb_grpc.ControllerStub(channel)
            started = await start_sandbox(controller, POD, "wasm", "direct")
            assert started.address.startswith("ttrpc+unix://") and started.pid > 0
            client = await TtrpcClient.connect_unix(started.address.removeprefix("ttrpc+unix://"))
            try:
                await exercise(client, tmp_path, started.pid, cgroup)
                metrics = await controller.Metrics(sb.ControllerMetricsRequest(sandbox_id=POD))
                assert metrics.metrics.data.type_url.startswith("io.containerd.cgroups.v")
            finally:
                await client.close()
                await controller.Stop(sb.ControllerStopRequest(sandbox_id=POD))
                await controller.Shutdown(sb.ControllerShutdownRequest(sandbox_id=POD))

    try:
        asyncio.run(scenario())
        time.sleep(0.5)
    finally:
        watcher.terminate()
        watcher.wait(5)
    # The containers' own cgroups are gone; like runc, the sandboxer leaves parents it did not own.
    parents = [d / cgroup for d in cgroups.hierarchy_roots() if (d / cgroup).is_dir()]
    assert all(not any(p.is_dir() for p in d.iterdir()) for d in parents)
    for directory in parents:
        directory.rmdir()
    seen = events_out.read_text()
    for topic in ("/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started",
                  "/tasks/paused", "/tasks/resumed", "/tasks/exit", "/tasks/delete"):
        assert topic in seen, f"{topic} not published:\n{seen}"


async def exercise(client: TtrpcClient, base: Path, pod_pid: int, cgroup: str) -> None:
    bundle, rootfs = make_bundle(base, "bundle", pod_pid, ["/loop.wasm"], f"{cgroup}/{CID}")
    bind = mount_pb2.Mount(type="bind", source=str(rootfs), options=["rbind", "ro"])
    created = await call(client, "Create", task.CreateTaskRequest(id=CID, bundle=str(bundle), rootfs=[bind]),
                         task.CreateTaskResponse)
    assert mounted(bundle / "rootfs")
    # Created, not started: the process exists (joined its cgroup and the pod's namespaces), the module waits.
    state = await call(client, "State", task.StateRequest(id=CID), task.StateResponse)
    assert state.status == types.CREATED and state.pid == created.pid
    assert psutil.Process(created.pid).name().startswith("wasm-")
    assert os.readlink(f"/proc/{created.pid}/ns/net") == os.readlink(f"/proc/{pod_pid}/ns/net")
    v2 = cgroups.is_unified()
    memory_dir = cgroups.CGROUP_ROOT / ("" if v2 else "memory") / cgroup / CID
    memory_limit = memory_dir / ("memory.max" if v2 else "memory.limit_in_bytes")
    assert str(created.pid) in (memory_dir / "cgroup.procs").read_text().split()
    assert int(memory_limit.read_text()) == 64 * MiB
    if v2:
        assert (memory_dir / "cpu.weight").read_text().strip() == "10"  # 256 shares, converted as runc does
    else:
        assert (cgroups.CGROUP_ROOT / "cpu" / cgroup / CID / "cpu.shares").read_text().strip() == "256"

    await call(client, "Exec", task.ExecProcessRequest(id=CID, exec_id="early", spec=process_spec(["/hello.wasm"])))
    with pytest.raises(FailedPrecondition):  # an exec cannot start before its container runs
        await call(client, "Start", task.StartRequest(id=CID, exec_id="early"))
    with pytest.raises(FailedPrecondition, match="not running"):  # nor be signalled: as containerd's shim
        await call(client, "Kill", task.KillRequest(id=CID, exec_id="early", signal=9))
    await call(client, "Delete", task.DeleteRequest(id=CID, exec_id="early"), task.DeleteResponse)
    with pytest.raises(InvalidArgument, match="not found in the container's rootfs"):
        await call(client, "Exec", task.ExecProcessRequest(id=CID, exec_id="bad", spec=process_spec(["/no.wasm"])))

    await call(client, "Start", task.StartRequest(id=CID), task.StartResponse)
    connected = await call(client, "Connect", task.ConnectRequest(id=CID), task.ConnectResponse)
    assert connected.task_pid == created.pid and connected.shim_pid > 0
    assert (await call(client, "State", task.StateRequest(id=CID), task.StateResponse)).status == types.RUNNING

    await call(client, "Pause", task.PauseRequest(id=CID))
    assert (await call(client, "State", task.StateRequest(id=CID), task.StateResponse)).status == types.PAUSED
    if v2:
        assert (memory_dir / "cgroup.freeze").read_text().strip() == "1"
    else:
        assert (cgroups.CGROUP_ROOT / "freezer" / cgroup / CID / "freezer.state").read_text().strip() == "FROZEN"
    cpu_before = psutil.Process(created.pid).cpu_times().user
    await asyncio.sleep(0.3)
    assert psutil.Process(created.pid).cpu_times().user - cpu_before < 0.05  # the spinning module is frozen
    # An exec of a paused container is refused at once (as containerd's shim refuses it): its process
    # would freeze before it reported, and Start would hold the container's lock until someone resumed it.
    with pytest.raises(FailedPrecondition, match="paused"):
        await call(client, "Exec", task.ExecProcessRequest(id=CID, exec_id="frozen",
                                                           spec=process_spec(["/hello.wasm"])))
    await call(client, "Resume", task.ResumeRequest(id=CID))
    assert (await call(client, "State", task.StateRequest(id=CID), task.StateResponse)).status == types.RUNNING

    await call(client, "Update", task.UpdateTaskRequest(
        id=CID, resources=any_pb2.Any(value=json.dumps({"memory": {"limit": 80 * MiB}}).encode())))
    assert int(memory_limit.read_text()) == 80 * MiB

    await call(client, "Exec", task.ExecProcessRequest(id=CID, exec_id="spinner", spec=process_spec(["/loop.wasm"])))
    exec_pid = (await call(client, "Start", task.StartRequest(id=CID, exec_id="spinner"), task.StartResponse)).pid
    pids = await call(client, "Pids", task.PidsRequest(id=CID), task.PidsResponse)
    assert {p.pid for p in pids.processes} == {created.pid, exec_pid}
    assert str(exec_pid) in (memory_dir / "cgroup.procs").read_text().split()
    await call(client, "CloseIO", task.CloseIORequest(id=CID, exec_id="spinner", stdin=True))
    stats = await call(client, "Stats", task.StatsRequest(id=CID), task.StatsResponse)
    assert stats.stats.type_url.startswith("io.containerd.cgroups.v")
    with pytest.raises(Unimplemented):
        await call(client, "Checkpoint", task.CheckpointTaskRequest(id=CID, path="/tmp/x"))
    # without a terminal: accepted and ignored, as containerd's shims answer it
    await call(client, "ResizePty", task.ResizePtyRequest(id=CID, width=80, height=24))
    with pytest.raises(NotFound):
        await call(client, "State", task.StateRequest(id="no-such-container"))

    waiter = asyncio.ensure_future(call(client, "Wait", task.WaitRequest(id=CID, exec_id="spinner"),
                                        task.WaitResponse))
    await call(client, "Kill", task.KillRequest(id=CID, exec_id="spinner", signal=15))
    assert (await waiter).exit_status == 143
    await call(client, "Delete", task.DeleteRequest(id=CID, exec_id="spinner"), task.DeleteResponse)
    with pytest.raises(FailedPrecondition):  # the init process still runs
        await call(client, "Delete", task.DeleteRequest(id=CID), task.DeleteResponse)
    waiter = asyncio.ensure_future(call(client, "Wait", task.WaitRequest(id=CID), task.WaitResponse))
    await call(client, "Kill", task.KillRequest(id=CID, signal=9, all=True))
    assert (await waiter).exit_status == 137
    with pytest.raises(NotFound):  # nothing left to signal
        await call(client, "Kill", task.KillRequest(id=CID, signal=9))
    deleted = await call(client, "Delete", task.DeleteRequest(id=CID), task.DeleteResponse)
    assert deleted.exit_status == 137 and deleted.pid == created.pid
    assert not mounted(bundle / "rootfs")
    assert not memory_dir.exists()

    # Deleting a container that was created but never started kills its waiting process.
    bundle2, _ = make_bundle(base, "bundle2", pod_pid, ["/hello.wasm"], f"{cgroup}/never-started")
    never = await call(client, "Create", task.CreateTaskRequest(id="never-started", bundle=str(bundle2),
                                                                rootfs=[bind]), task.CreateTaskResponse)
    await call(client, "Delete", task.DeleteRequest(id="never-started"), task.DeleteResponse)
    assert not psutil.pid_exists(never.pid) or psutil.Process(never.pid).status() == psutil.STATUS_ZOMBIE
    assert not mounted(bundle2 / "rootfs")
