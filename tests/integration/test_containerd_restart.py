"""containerd restarted under running pods: it re-attaches to the sandboxer's tasks through the
`containerd-shim-kuasar-runc-v1` helper on its PATH (reference: containerd-sandbox-protocol.md 11, 13.3)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient

from .conftest import Stack, integration_skip_reason
from .cri_helpers import (
    children_of,
    mounts_containing,
    pod_processes,
    run_pod,
    start_container,
    task_server_pid,
    wait_state,
)
from .private_stack import private_stack

pytestmark = pytest.mark.integration

SHIM = "containerd-shim-kuasar-runc-v1"
# How long containerd stays down: long enough for a short container to exit meanwhile.
DOWNTIME = 3.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = integration_skip_reason()
    if reason:
        pytest.skip(reason)
    helper = Path(sys.executable).parent / SHIM
    if not os.access(helper, os.X_OK):
        pytest.skip(f"{helper} missing (run `make setup`)")
    base = tmp_path_factory.mktemp("restart")
    shim_dir = base / "shim-bin"
    shim_dir.mkdir()
    (shim_dir / SHIM).symlink_to(helper)
    # debug: containerd then passes -debug to the helper and logs what it says on stderr.
    with private_stack(base, bridge="kuasar-rl0", subnet="10.252.0.0/16", extra_path=[shim_dir],
                       log_level="debug") as stack:
        yield stack


async def until_serving(call, timeout: float = 60.0):
    """Retry `call` while containerd's CRI is still coming back up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


def task_bundles(stack: Stack) -> list[str]:
    root = stack.containerd.state_dir / "io.containerd.runtime.v2.task" / "k8s.io"
    return sorted(os.listdir(root)) if root.is_dir() else []


def test_containerd_restart_keeps_pods_and_containers_manageable(stack: Stack) -> None:
    async def before() -> dict[str, str]:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "survivor", stack.log_dir)
            long_cid = await start_container(client, pod_id, pod, "long", ["sleep", "3600"])
            short_cid = await start_container(client, pod_id, pod, "short", ["sh", "-c", "sleep 1; exit 7"])
            await wait_state(client, long_cid, cri.CONTAINER_RUNNING)
            return {"pod": pod_id, "long": long_cid, "short": short_cid}

    ids = stack.run(before())
    server = task_server_pid(stack.sandboxer_dir)
    long_pid = next(p.pid for p in children_of_named(server, "sleep"))
    assert sorted(task_bundles(stack)) == sorted([ids["long"], ids["short"]])

    stack.containerd.terminate()
    time.sleep(DOWNTIME)  # the short container exits while nobody listens
    stack.containerd.restart()

    async def after() -> None:
        async with CriClient(stack.address) as client:
            pod = await until_serving(lambda: client.pod_sandbox_status(ids["pod"]))
            assert pod.status.state == cri.SANDBOX_READY
            long = (await client.container_status(ids["long"])).status
            assert long.state == cri.CONTAINER_RUNNING, cri.ContainerState.Name(long.state)
            short = await wait_state(client, ids["short"], cri.CONTAINER_EXITED)
            assert short.exit_code == 7, "the exit seen while containerd was down was lost"
            result = await client.exec_sync(ids["long"], ["sh", "-c", "echo after-restart-$((6*7))"], timeout=20)
            assert (result.exit_code, result.stdout) == (0, b"after-restart-42\n")
            await client.stop_container(ids["long"], timeout=2)
            stopped = (await client.container_status(ids["long"])).status
            assert stopped.state == cri.CONTAINER_EXITED and stopped.exit_code in (137, 143)
            await client.remove_container(ids["long"])
            await client.remove_container(ids["short"])
            await client.stop_pod_sandbox(ids["pod"])
            await client.remove_pod_sandbox(ids["pod"])
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await client.pod_sandbox_status(ids["pod"])
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    stack.run(after())
    assert task_server_pid(stack.sandboxer_dir) == server, "the task server was replaced"
    assert not exists(long_pid)
    log = stack.containerd.log_text()
    assert "binary not installed" not in log, "containerd did not find the shim helper"
    # The tasks were re-attached, so their deletion ran the helper (`... -debug delete`), which found
    # the task server had already forgotten them.
    assert "failed to clean up after shim disconnected" not in log
    assert f"kuasar.shim: INFO: task server no longer knows container {ids['long']}" in log
    assert_nothing_left(stack, [ids["pod"]])


def children_of_named(pid: int, name: str) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if p.name() == name]


def exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_nothing_left(stack: Stack, pod_ids: list[str]) -> None:
    deadline = time.monotonic() + 10
    while task_bundles(stack) and time.monotonic() < deadline:  # containerd removes bundles after delete
        time.sleep(0.1)
    assert task_bundles(stack) == []
    names = {f"pod-{pod_id[:11]}" for pod_id in pod_ids}  # other stacks on this machine have pods too
    assert [p for p in pod_processes() if p.info["name"] in names] == []
    assert mounts_containing(str(stack.containerd.state_dir / "io.containerd.runtime.v2.task")) == []
    assert os.listdir(stack.sandboxer_dir / "sandboxes") == []
    assert os.listdir(stack.sandboxer_dir / "console") == []
    assert os.listdir(stack.sandboxer_dir / "runc") == []
    assert children_of(task_server_pid(stack.sandboxer_dir)) == []
