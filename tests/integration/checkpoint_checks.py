"""A CRI checkpoint of a running Linux container (runc-sandboxer's, or one in a wasm-sandboxer pod: both
served by the same runc Task API), with real CRIU."""

from __future__ import annotations

import asyncio
import json
import shutil
import tarfile
import time
from pathlib import Path

import grpc
import psutil
import pytest

from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient
from kuasar.common.runc_checkpoint import EXTERNAL_STDIO_RECORD

from .conftest import Stack
from .cri_helpers import HANDLER, log_text, remove_pod, run_pod, runc_containers, start_container, wait_log, wait_state

NEEDS_CRIU = pytest.mark.skipif(shutil.which("criu") is None,
                                reason="criu not on PATH (`make setup` builds it into .prefix/bin)")
COUNTER = ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done"]
# What CRIU 4.2.1 left where /run is not a tmpfs (setup's build fixes that).
CRIU_KDAT_TMP = Path("/run/criu.kdat.tmp")


async def ticks_grow(pod: cri.PodSandboxConfig, name: str, timeout: float = 10.0) -> None:
    before = log_text(pod, name).count("tick")
    deadline = time.monotonic() + timeout
    while log_text(pod, name).count("tick") < before + 3:
        assert time.monotonic() < deadline, f"{name} stopped writing after the checkpoint"
        await asyncio.sleep(0.1)


def check_checkpoint_through_cri(stack: Stack, tmp_path: Path, handler: str = HANDLER,
                                 host_network: bool = True) -> None:
    """A counting container checkpointed twice through CRI: the archive holds CRIU's images, the
    container keeps counting; an exited one is refused; nothing of runc or CRIU is left."""
    kdat_tmp_before = CRIU_KDAT_TMP.exists()

    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "checkpoint", stack.log_dir, handler, host_network=host_network)
            cid = await start_container(client, pod_id, pod, "counter", COUNTER)
            await wait_log(pod, "counter", "tick 3")
            archive = tmp_path / "counter.tar"
            await client.checkpoint_container(cid, str(archive))
            with tarfile.open(archive) as tar:
                names = set(tar.getnames())
            # CRIU's images (its inventory and the processes' cores: sh and sleep), as containerd lays out
            # the archive for checkpointctl and a restore: with the container's spec and config.
            assert "checkpoint/inventory.img" in names, sorted(names)
            # With what a restore needs to hand CRIU the new container's stdio (containerd's FIFOs).
            assert f"checkpoint/{EXTERNAL_STDIO_RECORD}" in names, sorted(names)
            with tarfile.open(archive) as tar:
                record = json.loads(tar.extractfile(f"checkpoint/{EXTERNAL_STDIO_RECORD}").read())
            assert {"1", "2"} <= set(record), record
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
