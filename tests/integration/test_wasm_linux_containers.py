"""Linux containers in wasm-sandboxer's pods (a sidecar beside WebAssembly modules), run with runc,
under a real containerd 2.x through CRI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient, container_config

from .checkpoint_checks import NEEDS_CRIU, check_checkpoint_through_cri
from .conftest import Stack
from .cri_helpers import (
    BUSYBOX,
    cgroups_named,
    check_exit_codes,
    check_failed_start_leaves_a_removable_container,
    check_pod_files,
    check_stop_sends_sigterm_then_sigkill,
    children_of,
    mounts_containing,
    remove_pod,
    run_pod,
    runc_containers,
    start_container,
    start_shm_writer_and_reader,
    task_server_pid,
    wait_ended_with_task_server,
    wait_log,
    wait_state,
)
from .restore_checks import check_restore_through_task_api
from .wasm_stack import WASM_HANDLER, WASM_IMAGE, stack_fixture

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_fixture(tmp_path_factory, "kuasar-wl0", "10.243.0.0/16")


async def start_module(client: CriClient, pod_id: str, pod: cri.PodSandboxConfig, name: str,
                       command: list[str]) -> str:
    config = container_config(name, WASM_IMAGE, command, log_path=f"{name}.log")
    cid = (await client.create_container(pod_id, config, pod)).container_id
    await client.start_container(cid)
    return cid


def namespace(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def test_a_linux_sidecar_runs_with_runc_beside_a_module_in_the_pods_namespaces(stack: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "mixed", stack.log_dir, WASM_HANDLER, host_network=False,
                                        hostname="mixed")
            module = await start_module(client, pod_id, pod, "module", ["/loop.wasm"])
            sidecar = await start_container(client, pod_id, pod, "sidecar",
                                            ["sh", "-c", "echo sidecar-up; exec sleep 3600"])
            pids = {}
            for cid in (module, sidecar):
                await wait_state(client, cid, cri.CONTAINER_RUNNING)
                pids[cid] = (await client.container_status(cid, verbose=True)).info["info"]
            module_pid = json.loads(pids[module])["pid"]
            sidecar_pid = json.loads(pids[sidecar])["pid"]
            # The sidecar is a runc container of the wasm task server; the module is its own child.
            assert runc_containers(stack.sandboxer_dir) == [sidecar]
            assert psutil.Process(module_pid).name().startswith("wasm-")
            # RUNNING once runc started `sh`, which then execs sleep: on a slow machine not yet.
            deadline = time.monotonic() + 10
            while (name := psutil.Process(sidecar_pid).name()) != "sleep":
                assert time.monotonic() < deadline, f"the sidecar's process is still {name!r}"
                await asyncio.sleep(0.05)
            for kind in ("net", "uts", "ipc"):
                assert namespace(module_pid, kind) == namespace(sidecar_pid, kind), kind
            assert namespace(sidecar_pid, "net") != namespace(os.getpid(), "net")
            assert namespace(sidecar_pid, "mnt") != namespace(module_pid, "mnt")  # its own rootfs
            assert "sidecar-up" in await wait_log(pod, "sidecar", "sidecar-up")
            hostname = await client.exec_sync(sidecar, ["hostname"], timeout=20)
            assert (hostname.exit_code, hostname.stdout) == (0, b"mixed\n")
            hello = await client.exec_sync(module, ["/hello.wasm"], timeout=20)
            assert hello.stdout == b"hello from wasm\n"
            stats = (await client.container_stats(sidecar)).stats
            assert stats.memory.working_set_bytes.value > 0 or stats.memory.usage_bytes.value > 0
            cgroup = json.loads(pids[sidecar])["runtimeSpec"]["linux"]["cgroupsPath"].lstrip("/")
            assert cgroups_named(cgroup)
            # Stopping the pod takes both kinds down; removing it leaves nothing of either.
            await client.stop_pod_sandbox(pod_id)
            for cid in (module, sidecar):
                assert (await client.container_status(cid)).status.state == cri.CONTAINER_EXITED
            await client.remove_pod_sandbox(pod_id)
            assert runc_containers(stack.sandboxer_dir) == []
            assert cgroups_named(cgroup) == []

    asyncio.run(scenario())
    assert_nothing_left(stack)


def test_linux_containers_see_the_pods_files_and_share_its_dev_shm(stack: Stack) -> None:
    async def scenario() -> None:
        await check_pod_files(stack.address, WASM_HANDLER, stack.log_dir, stack.sandboxer_dir / "pods")
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "shm", stack.log_dir, WASM_HANDLER)
            _, mount = await start_shm_writer_and_reader(client, pod_id, pod)
            assert mount[2] == "tmpfs" and "size=65536k" in mount[3]
            await remove_pod(client, pod_id)
            assert not mounts_containing(str(stack.sandboxer_dir / "pods"))

    asyncio.run(scenario())


def test_linux_containers_exit_codes_stop_and_a_failed_start(stack: Stack) -> None:
    asyncio.run(check_exit_codes(stack.address, WASM_HANDLER, stack.log_dir))
    asyncio.run(check_stop_sends_sigterm_then_sigkill(stack.address, WASM_HANDLER, stack.log_dir))
    # Its error names both readings of the image: no module, and no such program.
    asyncio.run(check_failed_start_leaves_a_removable_container(stack.address, WASM_HANDLER, stack.log_dir))
    assert_nothing_left(stack)


@NEEDS_CRIU
def test_a_linux_container_is_checkpointed_through_cri_as_in_runc_sandboxer(stack: Stack, tmp_path: Path) -> None:
    check_checkpoint_through_cri(stack, tmp_path, WASM_HANDLER)


@NEEDS_CRIU
def test_a_linux_container_is_restored_through_the_task_api_as_in_runc_sandboxer(stack: Stack,
                                                                                 tmp_path: Path) -> None:
    # A restore goes to runc straight away: only a Linux container can have been checkpointed.
    check_restore_through_task_api(stack, tmp_path)


def test_a_misnamed_module_is_not_handed_to_runc(stack: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "misnamed", stack.log_dir, WASM_HANDLER)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await start_module(client, pod_id, pod, "missing", ["/nope.wasm"])
            assert "wasm module '/nope.wasm' not found" in missing.value.details()
            assert "Linux container" not in missing.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as text:
                await start_module(client, pod_id, pod, "text", ["/etc/greeting.txt"])
            details = text.value.details()
            assert "not a WebAssembly module" in details and "as a Linux container" in details, details
            assert runc_containers(stack.sandboxer_dir) == []
            await remove_pod(client, pod_id)

    asyncio.run(scenario())
    assert_nothing_left(stack)


def test_kubectl_debug_targets_a_linux_container_but_not_a_module_whose_pid_namespace_is_the_hosts(
        stack: Stack) -> None:
    async def debug(client: CriClient, pod_id: str, pod: cri.PodSandboxConfig, name: str, target: str) -> str:
        config = container_config(name, BUSYBOX, ["sleep", "3600"], log_path=f"{name}.log")
        config.linux.security_context.namespace_options.pid = cri.TARGET
        config.linux.security_context.namespace_options.target_id = target
        cid = (await client.create_container(pod_id, config, pod)).container_id
        await client.start_container(cid)
        return cid

    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "debugged", stack.log_dir, WASM_HANDLER)
            module = await start_module(client, pod_id, pod, "module", ["/loop.wasm"])
            app = await start_container(client, pod_id, pod, "app", ["sleep", "4242"])
            await wait_state(client, module, cri.CONTAINER_RUNNING)
            await wait_state(client, app, cri.CONTAINER_RUNNING)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await debug(client, pod_id, pod, "debug-module", module)
            assert "is the host's" in refused.value.details(), refused.value.details()
            debugger = await debug(client, pod_id, pod, "debug-app", app)
            seen = await client.exec_sync(debugger, ["ps", "-o", "args"], timeout=20)
            assert b"sleep 4242" in seen.stdout and b"loop.wasm" not in seen.stdout, seen.stdout
            assert sorted(runc_containers(stack.sandboxer_dir)) == sorted([app, debugger])
            await remove_pod(client, pod_id)

    asyncio.run(scenario())
    assert_nothing_left(stack)


def test_a_killed_task_server_takes_its_linux_containers_along_and_the_next_one_sweeps_them(
        stack: Stack) -> None:
    async def before() -> tuple[str, str, str]:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "crash", stack.log_dir, WASM_HANDLER)
            cid = await start_container(client, pod_id, pod, "sleeper", ["sleep", "3600"])
            status = await client.container_status(cid, verbose=True)
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            return pod_id, cid, json.loads(status.info["info"])["runtimeSpec"]["linux"]["cgroupsPath"]

    pod_id, cid, cgroup = asyncio.run(before())
    old_server = task_server_pid(stack.sandboxer_dir)
    os.kill(old_server, signal.SIGKILL)

    async def after() -> None:
        async with CriClient(stack.address) as client:
            await wait_ended_with_task_server(client, pod_id, [cid])
            assert runc_containers(stack.sandboxer_dir) == []  # swept by the task server started next
            assert cgroups_named(cgroup.lstrip("/")) == []
            await remove_pod(client, pod_id)

    asyncio.run(after())
    assert task_server_pid(stack.sandboxer_dir) != old_server
    assert_nothing_left(stack)


def assert_nothing_left(stack: Stack) -> None:
    assert children_of(task_server_pid(stack.sandboxer_dir)) == []
    assert runc_containers(stack.sandboxer_dir) == []
    assert list((stack.sandboxer_dir / "sandboxes").iterdir()) == []
    assert mounts_containing(str(stack.containerd.state_dir)) == []
    assert mounts_containing(str(stack.sandboxer_dir)) == []
    assert not any(Path(stack.sandboxer_dir / "console").glob("*.sock"))
