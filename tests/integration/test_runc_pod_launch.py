"""The pod process is launched at Create and collected at Start: Shutdown without Start, and a restart
of the sandboxer between the two, leave no pod process and nothing behind."""

from __future__ import annotations

import asyncio
import signal

import grpc
import psutil
import pytest

from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2 as sb
from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2_grpc as sb_grpc
from tests.support.procs import live_children

from .conftest import Stack, start_sandboxer
from .cri_helpers import sandbox_create_request, task_server_pid

pytestmark = pytest.mark.integration


def pod_processes(stack: Stack, name: str = "pod-") -> list[psutil.Process]:
    return live_children(task_server_pid(stack.sandboxer_dir), name)


def create_request(sandbox_id: str) -> sb.ControllerCreateRequest:
    return sandbox_create_request(sandbox_id, "runc", "launch")


async def wait_for_pod_processes(stack: Stack, count: int) -> list[psutil.Process]:
    for _ in range(100):
        found = pod_processes(stack)
        if len(found) == count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} pod processes, found {pod_processes(stack)}")


def test_create_then_shutdown_without_start_leaves_no_pod_process(stack: Stack) -> None:
    sandbox_id = "a" * 64

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(f"unix://{stack.sandboxer_socket}") as channel:
            controller = sb_grpc.ControllerStub(channel)
            before = len(pod_processes(stack))
            await controller.Create(create_request(sandbox_id))
            await wait_for_pod_processes(stack, before + 1)  # launched by Create already
            await controller.Stop(sb.ControllerStopRequest(sandbox_id=sandbox_id))
            await controller.Shutdown(sb.ControllerShutdownRequest(sandbox_id=sandbox_id))
            await wait_for_pod_processes(stack, before)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await controller.Status(sb.ControllerStatusRequest(sandbox_id=sandbox_id))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

    stack.run(scenario())
    assert not (stack.sandboxer_dir / "pods" / sandbox_id).exists()
    assert not (stack.sandboxer_dir / "sandboxes" / sandbox_id).exists()


def test_a_restart_between_create_and_start_removes_the_launched_pod(stack: Stack) -> None:
    """containerd sends Start right after Create: one that met the sandboxer down has failed, and
    containerd forgets that sandbox without a Shutdown. The restarted sandboxer removes it, with the pod
    process its Create launched; a late Start of it is NOT_FOUND."""
    sandbox_id = "b" * 64

    async def create() -> psutil.Process:
        async with grpc.aio.insecure_channel(f"unix://{stack.sandboxer_socket}") as channel:
            await sb_grpc.ControllerStub(channel).Create(create_request(sandbox_id))
            # With a pod PID namespace kuasar-pause forks its namespace holder and the first process
            # exits: the pod process is the one left.
            seen: list[int] = []
            for _ in range(200):
                live = pod_processes(stack, f"pod-{sandbox_id[:11]}")
                seen.append(live[0].pid if len(live) == 1 else 0)
                if len(seen) >= 3 and seen[-1] and len(set(seen[-3:])) == 1:
                    return psutil.Process(seen[-1])
                await asyncio.sleep(0.05)
            raise AssertionError(f"no single pod process settled: {seen[-10:]}")

    launched = stack.run(create())
    stack.sandboxer.send_signal(signal.SIGKILL)
    stack.sandboxer.wait(10)
    stack.sandboxer = start_sandboxer(stack.sandboxer_socket, stack.sandboxer_dir, stack.sandboxer_log,
                                      stack.containerd.ttrpc_address)

    async def start_late() -> None:
        async with grpc.aio.insecure_channel(f"unix://{stack.sandboxer_socket}") as channel:
            controller = sb_grpc.ControllerStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await controller.Start(sb.ControllerStartRequest(sandbox_id=sandbox_id))
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            await controller.Shutdown(sb.ControllerShutdownRequest(sandbox_id=sandbox_id))  # nothing to do

    stack.run(start_late())
    launched.wait(10)
    assert not (stack.sandboxer_dir / "sandboxes" / sandbox_id).exists()
    assert not (stack.sandboxer_dir / "pods" / sandbox_id).exists()
