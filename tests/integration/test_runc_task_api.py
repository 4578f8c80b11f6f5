"""The task server's Task API and the Sandbox API driven directly (what CRI never calls):
pause/resume, pids, connect, close-io, stats, metrics, unimplemented methods, published events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2

from kuasar.common.api.containerd.runc.options import oci_pb2 as runc_options
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2 as sb
from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2_grpc as sb_grpc
from kuasar.common.api.containerd.types import mount_pb2
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.errors import FailedPrecondition, InvalidArgument, KuasarError, NotFound
from kuasar.common.ttrpc import TtrpcClient
from tests.support import images

from .conftest import Stack
from .cri_helpers import mounts_containing, start_sandbox

pytestmark = pytest.mark.integration

TASK = "containerd.task.v3.Task"
NS = {"containerd-namespace-ttrpc": "k8s.io"}
POD = "c" * 64
CID = "direct-task-api"


def mounted(path: Path) -> bool:
    # Path.is_mount compares devices, which a bind mount of the same filesystem does not change.
    return str(path) in mounts_containing(str(path))


def make_bundle(base: Path, pod_pid: int, args: list[str] | None = None) -> tuple[Path, Path]:
    """A bundle whose container joins the pod's namespaces, like CRI's spec, plus a rootfs to bind."""
    rootfs = base / "image-rootfs"
    rootfs.mkdir(parents=True)
    images.extract_busybox_rootfs(rootfs)
    bundle = base / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = args or ["sh", "-c", "echo started; sleep 3600"]
    spec["root"] = {"path": "rootfs", "readonly": True}
    spec["annotations"] = {"io.kubernetes.cri.sandbox-id": POD}
    spaces = []
    for ns in spec["linux"]["namespaces"]:
        if ns["type"] in ("ipc", "uts", "network"):
            kind = {"network": "net"}.get(ns["type"], ns["type"])
            ns = {"type": ns["type"], "path": f"/proc/{pod_pid}/ns/{kind}"}
        spaces.append(ns)
    spec["linux"]["namespaces"] = spaces
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle, rootfs


@dataclass
class DirectPod:
    controller: sb_grpc.ControllerStub
    client: TtrpcClient
    pid: int
    bundle: Path
    rootfs: Path


@contextlib.asynccontextmanager
async def direct_pod(stack: Stack, base: Path, hostname: str,
                     args: list[str] | None = None) -> AsyncIterator[DirectPod]:
    """Pod POD made and started straight through the Sandbox API, a bundle for a container CID in it
    (make_bundle), and a Task API client of its task server; the pod stopped and shut down at the end."""
    async with grpc.aio.insecure_channel(f"unix://{stack.sandboxer_socket}") as channel:
        controller = sb_grpc.ControllerStub(channel)
        started = await start_sandbox(controller, POD, "runc", hostname)
        bundle, rootfs = make_bundle(base, started.pid, args)
        client = await TtrpcClient.connect_unix(started.address.removeprefix("ttrpc+unix://"))
        try:
            yield DirectPod(controller, client, started.pid, bundle, rootfs)
        finally:
            await client.close()
            await controller.Stop(sb.ControllerStopRequest(sandbox_id=POD))
            await controller.Shutdown(sb.ControllerShutdownRequest(sandbox_id=POD))


def test_task_api_beyond_cri_and_sandbox_metrics(stack: Stack, tmp_path: Path) -> None:
    events_out = tmp_path / "events.txt"
    with open(events_out, "wb") as sink:
        watcher = subprocess.Popen([str(stack.containerd.ctr_bin), "--address", stack.address, "events"],
                                   stdout=sink, stderr=subprocess.STDOUT)
    time.sleep(0.3)

    async def scenario() -> None:
        async with direct_pod(stack, tmp_path, "direct") as pod:
            await exercise_tasks(pod.client, pod.bundle, pod.rootfs, pod.pid)
            metrics = await pod.controller.Metrics(sb.ControllerMetricsRequest(sandbox_id=POD))
            assert metrics.metrics.data.type_url.startswith("io.containerd.cgroups.v")
            assert metrics.metrics.data.value
        assert not mounted(pod.bundle / "rootfs")

    try:
        stack.run(scenario())
        time.sleep(0.5)
    finally:
        watcher.terminate()
        watcher.wait(5)
    seen = events_out.read_text()
    for topic in ("/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started",
                  "/tasks/paused", "/tasks/resumed", "/tasks/exit", "/tasks/delete"):
        assert topic in seen, f"{topic} not published:\n{seen}"


async def call(client: TtrpcClient, method: str, request, response_type=None):
    return await client.call(TASK, method, request, response_type, timeout=30, metadata=NS)


async def exercise_tasks(client: TtrpcClient, bundle: Path, rootfs: Path, pod_pid: int) -> None:
    bind = mount_pb2.Mount(type="bind", source=str(rootfs), options=["rbind", "ro"])
    created = await call(client, "Create", task.CreateTaskRequest(id=CID, bundle=str(bundle), rootfs=[bind]),
                         task.CreateTaskResponse)
    assert mounted(bundle / "rootfs")
    spec = process_spec("sleep", "30")
    await call(client, "Exec", task.ExecProcessRequest(id=CID, exec_id="early", spec=spec))
    with pytest.raises(FailedPrecondition):  # an exec cannot start before its container runs
        await call(client, "Start", task.StartRequest(id=CID, exec_id="early"))
    await call(client, "Delete", task.DeleteRequest(id=CID, exec_id="early"), task.DeleteResponse)
    await call(client, "Start", task.StartRequest(id=CID), task.StartResponse)
    connected = await call(client, "Connect", task.ConnectRequest(id=CID), task.ConnectResponse)
    assert connected.task_pid == created.pid and connected.shim_pid > 0
    state = await call(client, "State", task.StateRequest(id=CID), task.StateResponse)
    assert state.status == types.RUNNING and state.pid == created.pid

    await call(client, "Pause", task.PauseRequest(id=CID))
    assert (await call(client, "State", task.StateRequest(id=CID), task.StateResponse)).status == types.PAUSED
    with pytest.raises(FailedPrecondition, match="paused"):  # refused there, not published and never started
        await call(client, "Exec", task.ExecProcessRequest(id=CID, exec_id="frozen", spec=spec))
    await call(client, "Resume", task.ResumeRequest(id=CID))
    assert (await call(client, "State", task.StateRequest(id=CID), task.StateResponse)).status == types.RUNNING

    await execs_started_side_by_side(client)
    await call(client, "Exec", task.ExecProcessRequest(id=CID, exec_id="sleeper", spec=spec))
    exec_pid = (await call(client, "Start", task.StartRequest(id=CID, exec_id="sleeper"), task.StartResponse)).pid
    pids = await call(client, "Pids", task.PidsRequest(id=CID), task.PidsResponse)
    assert {created.pid, exec_pid} <= {p.pid for p in pids.processes}
    # the exec's entry names it, as containerd's shim does (`ctr task ps`'s INFO column)
    [details] = [p.info for p in pids.processes if p.pid == exec_pid]
    assert details.type_url == "containerd.runc.v1.ProcessDetails"
    assert runc_options.ProcessDetails.FromString(details.value).exec_id == "sleeper"
    assert not [p.info for p in pids.processes if p.pid == created.pid][0].value
    await call(client, "CloseIO", task.CloseIORequest(id=CID, exec_id="sleeper", stdin=True))
    stats = await call(client, "Stats", task.StatsRequest(id=CID), task.StatsResponse)
    assert stats.stats.type_url.startswith("io.containerd.cgroups.v")
    # Checkpoint's own refusals (a real checkpoint: test_runc_checkpoint.py, through CRI)
    with pytest.raises(InvalidArgument, match="not absolute"):
        await call(client, "Checkpoint", task.CheckpointTaskRequest(id=CID, path="relative/dir"))
    with pytest.raises(NotFound):
        await call(client, "Checkpoint", task.CheckpointTaskRequest(id="no-such-container", path="/tmp/x"))
    with pytest.raises(NotFound):
        await call(client, "State", task.StateRequest(id="no-such-container"))

    waiter = asyncio.ensure_future(call(client, "Wait", task.WaitRequest(id=CID, exec_id="sleeper"),
                                        task.WaitResponse))
    await call(client, "Kill", task.KillRequest(id=CID, exec_id="sleeper", signal=9))
    assert (await waiter).exit_status == 137
    await call(client, "Delete", task.DeleteRequest(id=CID, exec_id="sleeper"), task.DeleteResponse)
    await terminal_exec_leaving_a_child(client, bundle.parent / "tty-stdout")
    with pytest.raises(FailedPrecondition):  # the init process still runs
        await call(client, "Delete", task.DeleteRequest(id=CID), task.DeleteResponse)
    waiter = asyncio.ensure_future(call(client, "Wait", task.WaitRequest(id=CID), task.WaitResponse))
    await call(client, "Kill", task.KillRequest(id=CID, signal=9, all=True))
    assert (await waiter).exit_status == 137
    # Exited, not deleted: no statistics, quietly (containerd's metrics collection logs any error but
    # NotFound on every CRI stats poll), and the dead init for Pids (an empty list reads as a leaked task).
    with pytest.raises(NotFound, match="exited"):
        await call(client, "Stats", task.StatsRequest(id=CID), task.StatsResponse)
    assert [p.pid for p in (await call(client, "Pids", task.PidsRequest(id=CID), task.PidsResponse)).processes] == [
        created.pid]
    deleted = await call(client, "Delete", task.DeleteRequest(id=CID), task.DeleteResponse)
    assert deleted.exit_status == 137 and deleted.pid == created.pid
    assert not mounted(bundle / "rootfs")
    await call(client, "Shutdown", task.ShutdownRequest(id=CID))  # v3 callers never send it; harmless


def process_spec(*args: str) -> any_pb2.Any:
    return any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                       value=json.dumps({"args": list(args), "cwd": "/", "env": ["PATH=/bin"],
                                         "user": {"uid": 0, "gid": 0}}).encode())


async def execs_started_side_by_side(client: TtrpcClient) -> None:
    """Probes due together: execs of the container started at once, one of them a binary the image
    lacks. Each that runs gets a pid of its own, the failing one reports its own runc error (each
    `runc exec` logs to a file of its own), and all of them then go as usual."""
    names = [f"probe-{n}" for n in range(4)]
    for name in names:
        await call(client, "Exec", task.ExecProcessRequest(id=CID, exec_id=name, spec=process_spec("sleep", "30")))
    await call(client, "Exec", task.ExecProcessRequest(id=CID, exec_id="missing",
                                                       spec=process_spec("no-such-binary")))
    results = await asyncio.gather(*(call(client, "Start", task.StartRequest(id=CID, exec_id=name),
                                          task.StartResponse) for name in [*names, "missing"]),
                                   return_exceptions=True)
    started, missing = results[:-1], results[-1]
    assert isinstance(missing, KuasarError) and "no-such-binary" in missing.message, missing
    assert all(isinstance(s, task.StartResponse) for s in started), started
    assert len({s.pid for s in started}) == len(names)
    for name in names:
        waiter = asyncio.ensure_future(call(client, "Wait", task.WaitRequest(id=CID, exec_id=name),
                                            task.WaitResponse))
        await call(client, "Kill", task.KillRequest(id=CID, exec_id=name, signal=9))
        assert (await waiter).exit_status == 137
    for name in [*names, "missing"]:
        await call(client, "Delete", task.DeleteRequest(id=CID, exec_id=name), task.DeleteResponse)


# The child a terminal exec leaves behind lives this long; its output must end well before.
CHILD_LIFE_S = 30


async def terminal_exec_leaving_a_child(client: TtrpcClient, stdout: Path) -> None:
    """`kubectl exec -it`, `sleep 30 &`, `exit 3`: the exec's output ends at its exit, with all it wrote,
    though the child still holds the pty (kubectl's session waits for that end: it hung for 30 s)."""
    os.mkfifo(stdout)
    reader = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)  # containerd opens its end first
    try:
        # The child ignores the SIGHUP the pty's hang-up sends (an interactive shell's background job is
        # not in the foreground group that gets it).
        spec = {"args": ["sh", "-c", f"trap '' HUP; sleep {CHILD_LIFE_S} & echo left a child; exit 3"], "cwd": "/",
                "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}, "terminal": True}
        await call(client, "Exec", task.ExecProcessRequest(id=CID, exec_id="tty", terminal=True, stdout=str(stdout),
                                                           spec=any_pb2.Any(value=json.dumps(spec).encode())))
        started = time.monotonic()
        await call(client, "Start", task.StartRequest(id=CID, exec_id="tty"), task.StartResponse)
        waited = await call(client, "Wait", task.WaitRequest(id=CID, exec_id="tty"), task.WaitResponse)
        assert waited.exit_status == 3
        output = await read_to_end(reader, timeout=CHILD_LIFE_S / 2)
        assert output.replace(b"\r\n", b"\n") == b"left a child\n"
        assert time.monotonic() - started < CHILD_LIFE_S / 2
        await call(client, "Delete", task.DeleteRequest(id=CID, exec_id="tty"), task.DeleteResponse)
    finally:
        os.close(reader)


async def read_to_end(fd: int, timeout: float) -> bytes:  # noqa: ASYNC109
    """What a FIFO gives until every writer closed it (containerd's read of a process's output)."""
    loop = asyncio.get_running_loop()
    out = bytearray()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            await asyncio.sleep(0.02)
            continue
        if not chunk:
            return bytes(out)
        out += chunk
    raise AssertionError(f"the output did not end within {timeout:g}s; read so far: {bytes(out)!r}")
