"""CRI CheckpointContainer (Kubernetes' forensic container checkpoints) of runc-sandboxer's containers:
containerd pauses the container, our task server runs `runc checkpoint` (CRIU) into the directory
containerd gives it, and containerd archives that with the container's spec and rootfs changes."""

from __future__ import annotations

import asyncio
import shutil
import tarfile
import time
from pathlib import Path

import grpc
import psutil
import pytest
from google.protobuf import any_pb2

from kuasar.common.api.containerd.runc.options import oci_pb2 as runc_options
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types import mount_pb2
from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient
from kuasar.common.runc_checkpoint import CHECKPOINT_OPTIONS_TYPE_URL

from .conftest import Stack
from .cri_helpers import (
    log_text,
    mounts_containing,
    remove_pod,
    run_pod,
    runc_containers,
    start_container,
    wait_log,
    wait_state,
)
from .test_runc_task_api import CID, call, direct_pod

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("criu") is None,
                       reason="criu not on PATH (`make setup` builds it into .prefix/bin)"),
]

COUNTER = ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done"]
# What CRIU 4.2.1 left where /run is not a tmpfs (setup's build fixes that).
CRIU_KDAT_TMP = Path("/run/criu.kdat.tmp")


async def ticks_grow(pod: cri.PodSandboxConfig, name: str, timeout: float = 10.0) -> None:
    before = log_text(pod, name).count("tick")
    deadline = time.monotonic() + timeout
    while log_text(pod, name).count("tick") < before + 3:
        assert time.monotonic() < deadline, f"{name} stopped writing after the checkpoint"
        await asyncio.sleep(0.1)


def test_a_running_container_is_checkpointed_through_cri_and_keeps_running(stack: Stack, tmp_path: Path) -> None:
    kdat_tmp_before = CRIU_KDAT_TMP.exists()

    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "checkpoint", stack.log_dir)
            cid = await start_container(client, pod_id, pod, "counter", COUNTER)
            await wait_log(pod, "counter", "tick 3")
            archive = tmp_path / "counter.tar"
            await client.checkpoint_container(cid, str(archive))
            with tarfile.open(archive) as tar:
                names = set(tar.getnames())
            # CRIU's images (its inventory and the processes' cores: sh and sleep), as containerd lays out
            # the archive for checkpointctl and a restore: with the container's spec and config.
            assert "checkpoint/inventory.img" in names, sorted(names)
            assert sum(name.startswith("checkpoint/core-") for name in names) >= 1, sorted(names)
            assert {"spec.dump", "config.dump", "status.dump"} <= names, sorted(names)
            # Left running (the forensic checkpoint's point), and resumed after containerd's pause.
            assert (await wait_state(client, cid, cri.CONTAINER_RUNNING)).state == cri.CONTAINER_RUNNING
            await ticks_grow(pod, "counter")
            # Twice in a row: nothing the first left behind is in the way.
            again = tmp_path / "again.tar"
            await client.checkpoint_container(cid, str(again))
            assert again.stat().st_size > 0
            await ticks_grow(pod, "counter")
            # What is not running cannot be checkpointed (containerd's own check, before ours).
            stopped = await start_container(client, pod_id, pod, "done", ["true"])
            await wait_state(client, stopped, cri.CONTAINER_EXITED)
            with pytest.raises(grpc.aio.AioRpcError, match="only CONTAINER_RUNNING containers"):
                await client.checkpoint_container(stopped, str(tmp_path / "done.tar"))
            await remove_pod(client, pod_id)
        assert not runc_containers(stack.sandboxer_dir)
        assert not [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "criu"]

    asyncio.run(scenario())
    assert kdat_tmp_before or not CRIU_KDAT_TMP.exists()


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
