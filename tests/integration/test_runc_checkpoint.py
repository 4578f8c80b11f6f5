"""CRI CheckpointContainer (Kubernetes' forensic container checkpoints) of runc-sandboxer's containers:
containerd pauses the container, our task server runs `runc checkpoint` (CRIU) into the directory
containerd gives it, and containerd archives that with the container's spec and rootfs changes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from kuasar.common.api.containerd.runc.options import oci_pb2 as runc_options
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types import mount_pb2
from kuasar.common.runc_checkpoint import CHECKPOINT_OPTIONS_TYPE_URL

from .checkpoint_checks import NEEDS_CRIU, check_checkpoint_through_cri
from .conftest import Stack
from .cri_helpers import mounts_containing
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
