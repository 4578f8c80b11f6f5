"""CRI CheckpointContainer (Kubernetes' forensic container checkpoints) of runc-sandboxer's containers:
containerd pauses the container, our task server runs `runc checkpoint` (CRIU) into the directory
containerd gives it, and containerd archives that with the container's spec and rootfs changes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2

from kuasar.common.api.containerd.runc.options import oci_pb2 as runc_options
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types import mount_pb2
from kuasar.common.cri_client import CriClient, container_config
from kuasar.common.runc_checkpoint import CHECKPOINT_OPTIONS_TYPE_URL
from tests.support.images import DEFAULT_ENV, busybox_layer
from tests.support.oci_registry import registry_image, serve_registry

from .checkpoint_checks import COUNTER, NEEDS_CRIU, check_checkpoint_through_cri
from .conftest import Stack
from .cri_helpers import mounts_containing, remove_pod, run_pod, runc_containers, wait_log
from .restore_checks import check_restore_through_task_api
from .test_runc_task_api import CID, call, direct_pod

pytestmark = [pytest.mark.integration, NEEDS_CRIU]


# A pod of its own network namespace too: the container joins it by path, which runc has CRIU treat as
# external (and the pod's CNI interfaces are not the container's to dump).
@pytest.mark.parametrize("host_network", [True, False], ids=["host-network", "pod-network"])
def test_a_running_container_is_checkpointed_through_cri_and_keeps_running(stack: Stack, tmp_path: Path,
                                                                          host_network: bool) -> None:
    check_checkpoint_through_cri(stack, tmp_path, host_network=host_network)


def test_runc_options_can_stop_the_container_after_its_checkpoint(stack: Stack, tmp_path: Path) -> None:
    # What `ctr task checkpoint --exit` asks of containerd's runc shim, straight through the Task API: the
    # images where the options say, then the container ended (by CRIU) and reported exited.
    images_dir = tmp_path / "images"
    options = any_pb2.Any(type_url=CHECKPOINT_OPTIONS_TYPE_URL, value=runc_options.CheckpointOptions(
        exit=True, image_path=str(images_dir)).SerializeToString())

    async def scenario() -> None:
        async with direct_pod(stack, tmp_path, "checkpoint-exit") as pod:
            client = pod.client
            bind = mount_pb2.Mount(type="bind", source=str(pod.rootfs), options=["rbind", "ro"])
            await call(client, "Create", task.CreateTaskRequest(id=CID, bundle=str(pod.bundle), rootfs=[bind]),
                       task.CreateTaskResponse)
            await call(client, "Start", task.StartRequest(id=CID), task.StartResponse)
            waiter = asyncio.ensure_future(call(client, "Wait", task.WaitRequest(id=CID), task.WaitResponse))
            await call(client, "Checkpoint", task.CheckpointTaskRequest(id=CID, path="/ignored", options=options))
            assert (images_dir / "inventory.img").is_file() and (images_dir / "dump.log").is_file()
            assert (await asyncio.wait_for(waiter, 10)).exit_status == 137
            await call(client, "Delete", task.DeleteRequest(id=CID), task.DeleteResponse)
        assert not mounts_containing(str(pod.bundle))
        assert not (pod.bundle / "criu.conf").exists()

    stack.run(scenario())


def test_containerd_2_1_cri_restore_does_not_reach_a_sandboxer(stack: Stack, tmp_path: Path) -> None:
    # CRI's restore (CreateContainer of a checkpoint archive, then StartContainer) in containerd 2.1: the
    # archive is imported and the base image pulled again by its digest (from a registry: here a local
    # one), but the restore's task Create carries no task API address, so containerd looks for a shim
    # registered under the pod's id, which only its own podsandbox pods have, and fails before it asks
    # us. (containerd's main branch dropped CRI restore.) What this checks: that this is still so, as
    # the README says, and that the failed restore leaves nothing.
    image = registry_image("kuasar/busybox-restore", "latest", [busybox_layer()],
                           {"Env": DEFAULT_ENV, "Cmd": ["sh"], "Labels": {"kuasar.test": "restore"}})

    async def scenario() -> None:
        with serve_registry(image) as registry:
            async with CriClient(stack.address) as client:
                await client.pull_image(registry.reference)
                pod_id, pod = await run_pod(client, "cri-restore", stack.log_dir)
                config = container_config("counter", registry.reference, COUNTER, log_path="counter.log")
                cid = (await client.create_container(pod_id, config, pod)).container_id
                await client.start_container(cid)
                await wait_log(pod, "counter", "tick 3")
                archive = tmp_path / "counter.tar"
                await client.checkpoint_container(cid, str(archive))
                registry.requests.clear()
                restored_config = container_config("restored", str(archive), [], log_path="restored.log")
                restored = (await client.create_container(pod_id, restored_config, pod)).container_id
                assert any(request.endswith(f"/v2/{image.name}/manifests/{image.manifest_digest}")
                           for request in registry.requests), registry.requests
                with pytest.raises(grpc.aio.AioRpcError, match="can't find shim for sandbox"):
                    await client.start_container(restored)
                await client.remove_container(restored)
                await remove_pod(client, pod_id)
                await client.remove_image(registry.reference)
        assert not runc_containers(stack.sandboxer_dir)

    stack.run(scenario())


def test_a_checkpoint_is_restored_through_the_task_api(stack: Stack, tmp_path: Path) -> None:
    check_restore_through_task_api(stack, tmp_path)
