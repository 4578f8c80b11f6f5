"""runc-sandboxer's task server killed with SIGKILL: the one the sandboxer starts in its place ends what
the dead one left (containers, pod processes, cgroups, /dev/shm), the pods are reported exited, and
removing them through CRI leaves nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient

from .conftest import Stack
from .cri_helpers import (
    cgroups_named,
    mounts_containing,
    pod_processes,
    remove_pod,
    run_pod,
    start_container,
    task_server_pid,
    wait_leftovers_recorded,
    wait_pod_not_ready,
    wait_state,
)

pytestmark = pytest.mark.integration


def runc_containers(stack: Stack) -> list[str]:
    listed = subprocess.run(["runc", "--root", str(stack.sandboxer_dir / "runc"), "list", "-q"],
                            capture_output=True, text=True, check=True)
    return listed.stdout.split()


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
            # The sandboxer's watch of the pod fails, starts a task server again, and learns the pod is gone.
            await wait_pod_not_ready(client, pod_id, "the pod was never reported exited")
            await wait_state(client, cid, cri.CONTAINER_EXITED)  # containerd lost its task connection
            assert task_server_pid(stack.sandboxer_dir) != old_server
            # Ended before the new task server served: nothing of the dead one's runs on.
            assert not alive(container_pid) and not alive(pod_pid)
            assert runc_containers(stack) == []
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
