"""runc-sandboxer's task server killed with SIGKILL: the one the sandboxer starts in its place ends what
the dead one left (containers, pod processes, cgroups, /dev/shm), the pods are reported exited, and
removing them through CRI leaves nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import grpc
import psutil
import pytest

from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2 as sb
from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2_grpc as sb_grpc
from kuasar.common.api.containerd.types import mount_pb2
from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient
from kuasar.common.ttrpc import TtrpcClient

from .conftest import Stack
from .cri_helpers import (
    cgroups_named,
    mounts_containing,
    pod_processes,
    remove_pod,
    run_pod,
    runc_containers,
    start_container,
    start_sandbox,
    task_server_pid,
    wait_ended_with_task_server,
    wait_leftovers_recorded,
    wait_state,
)
from .test_runc_task_api import make_bundle

pytestmark = pytest.mark.integration


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_killed_task_server_leaves_nothing_behind(stack: Stack) -> None:
    cgroup_parent = f"kuasar-it-crash-{os.getpid()}/pod-a"

    async def before() -> tuple[str, str, int, int]:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "crash", stack.log_dir, cgroup_parent=cgroup_parent)
            cid = await start_container(client, pod_id, pod, "main", ["sleep", "3600"])
            status = await wait_state(client, cid, cri.CONTAINER_RUNNING)
            assert status.state == cri.CONTAINER_RUNNING
            record = json.loads((stack.sandboxer_dir / "sandboxes" / pod_id / "sandbox.json").read_text())
            state = json.loads((stack.sandboxer_dir / "runc" / cid / "state.json").read_text())
            return pod_id, cid, record["pid"], state["init_process_pid"]

    pod_id, cid, pod_pid, container_pid = stack.run(before())
    shm = stack.sandboxer_dir / "pods" / pod_id / "shm"
    old_server = task_server_pid(stack.sandboxer_dir)
    assert alive(pod_pid) and alive(container_pid) and str(shm) in mounts_containing(str(shm))
    wait_leftovers_recorded(stack.sandboxer_dir, pod_id)  # written just after Create

    os.kill(old_server, signal.SIGKILL)

    async def after() -> None:
        async with CriClient(stack.address) as client:
            await wait_ended_with_task_server(client, pod_id, [cid])
            assert task_server_pid(stack.sandboxer_dir) != old_server
            # Ended before the new task server served: nothing of the dead one's runs on.
            assert not alive(container_pid) and not alive(pod_pid)
            assert runc_containers(stack.sandboxer_dir) == []
            assert mounts_containing(str(shm)) == []
            assert cgroups_named(cgroup_parent) == []
            await remove_pod(client, pod_id)

    stack.run(after())
    assert not alive(old_server)  # a zombie only waits for this machine's PID 1 to reap it
    assert list((stack.sandboxer_dir / "sandboxes").iterdir()) == []
    assert [p for p in pod_processes() if p.pid == pod_pid] == []
    assert cgroups_named(cgroup_parent.split("/")[0]) == []
    assert mounts_containing(str(stack.containerd.state_dir)) == []
    assert list(Path(stack.sandboxer_dir / "pods").glob("*/pod.json")) == []


NS = {"containerd-namespace-ttrpc": "k8s.io"}
HOOK_SECONDS = "417"  # a duration nothing else sleeps for, so that the hook's process is found by it


def test_a_runc_create_still_running_when_its_task_server_dies_is_ended_by_the_next(
        stack: Stack, tmp_path: Path) -> None:
    """A `runc create` outlives its task server (here, waiting on a createRuntime hook): the next task
    server ends it before it sweeps, and removes what it had made before runc saved any state (the
    rootfs mount, the container's cgroup, runc's directory). Left running, it would finish after the
    sweep and leave a created container that nobody knows of."""
    pod_id, cid = "d" * 64, "hung-create"
    cgroup = f"kuasar-it-hung-create-{os.getpid()}"
    runc_root = stack.sandboxer_dir / "runc"

    def on_our_root() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if str(runc_root) in (p.info["cmdline"] or [])]

    def hook_processes() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [])[1:] == [HOOK_SECONDS]]

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(f"unix://{stack.sandboxer_socket}") as channel:
            controller = sb_grpc.ControllerStub(channel)
            started = await start_sandbox(controller, pod_id, "runc", "hung")
            try:
                made, rootfs = make_bundle(tmp_path, started.pid)
                bundle = made.rename(made.with_name(cid))  # named after its task, as containerd does
                spec = json.loads((bundle / "config.json").read_text())
                spec["linux"]["cgroupsPath"] = f"/{cgroup}/{cid}"
                spec["annotations"] = {"io.kubernetes.cri.sandbox-id": pod_id}
                # A hook that forks (its sleep's background twin is runc's grandchild), then waits.
                hook = f"sleep {HOOK_SECONDS} & exec sleep {HOOK_SECONDS}"
                spec["hooks"] = {"createRuntime": [{"path": shutil.which("sh"), "args": ["sh", "-c", hook]}]}
                (bundle / "config.json").write_text(json.dumps(spec))
                client = await TtrpcClient.connect_unix(started.address.removeprefix("ttrpc+unix://"))
                bind = mount_pb2.Mount(type="bind", source=str(rootfs), options=["rbind", "ro"])
                request = task.CreateTaskRequest(id=cid, bundle=str(bundle), rootfs=[bind])
                creating = asyncio.ensure_future(client.call("containerd.task.v3.Task", "Create", request,
                                                             task.CreateTaskResponse, timeout=60, metadata=NS))
                for _ in range(200):  # runc has made the cgroup and waits on the hook
                    if cgroups_named(f"{cgroup}/{cid}") and len(hook_processes()) == 2:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("runc create never reached its hook")
                assert on_our_root() and mounts_containing(str(bundle / "rootfs"))
                old_server = task_server_pid(stack.sandboxer_dir)
                os.kill(old_server, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    await creating  # the connection is gone with the task server
                await client.close()
                for _ in range(200):  # the sandboxer sees its pod's watch fail and starts another
                    if task_server_pid(stack.sandboxer_dir) != old_server and not on_our_root():
                        break
                    await asyncio.sleep(0.1)
                assert task_server_pid(stack.sandboxer_dir) != old_server
                assert on_our_root() == []  # the hung create was ended, not left to finish
                assert hook_processes() == []  # and what it ran, however deep
                assert mounts_containing(str(bundle / "rootfs")) == []
                assert cgroups_named(f"{cgroup}/{cid}") == []
                assert not (runc_root / cid).exists()
                assert runc_containers(stack.sandboxer_dir) == []
            finally:
                await controller.Stop(sb.ControllerStopRequest(sandbox_id=pod_id))
                await controller.Shutdown(sb.ControllerShutdownRequest(sandbox_id=pod_id))

    try:
        stack.run(scenario())
    finally:
        for hook in hook_processes():  # left only if the test failed
            hook.kill()
        for directory in cgroups_named(f"{cgroup}/{cid}") + cgroups_named(cgroup):  # runc makes the parent
            with contextlib.suppress(OSError):
                directory.rmdir()
