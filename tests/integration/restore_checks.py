"""Restore of a runc container's checkpoint straight through the Task API (runc-sandboxer's task server,
and wasm-sandboxer's for a Linux container), with real runc and CRIU."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from kuasar.common.api.containerd.runc.options import oci_pb2 as runc_options
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types import mount_pb2
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.errors import InvalidArgument, KuasarError, NotFound
from kuasar.common.runc_checkpoint import CHECKPOINT_OPTIONS_TYPE_URL

from .checkpoint_checks import COUNTER
from .conftest import Stack
from .cri_helpers import mounts_containing
from .test_runc_task_api import CID, call, direct_pod


def _read_available(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


async def _read_until(fd: int, seen: bytearray, needle: bytes, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in seen:
        assert time.monotonic() < deadline, f"{needle!r} not in {bytes(seen)!r}"
        seen += _read_available(fd)
        await asyncio.sleep(0.05)


def check_restore_through_task_api(stack: Stack, tmp_path: Path) -> None:
    """What containerd's task service sends a runtime for a restore: a Create naming the checkpoint's
    images, then a Start. A counter checkpointed with `exit` and restored into a new container of its pod
    goes on from where the checkpoint left it, writing to the new container's stdout; what is no
    checkpoint, or one CRIU cannot read, fails clearly and leaves nothing."""
    images_dir = tmp_path / "images"
    exit_options = any_pb2.Any(type_url=CHECKPOINT_OPTIONS_TYPE_URL, value=runc_options.CheckpointOptions(
        exit=True, image_path=str(images_dir)).SerializeToString())
    restored_id = f"{CID}-restored"

    async def scenario() -> None:
        async with direct_pod(stack, tmp_path, "restore", args=COUNTER) as pod:
            client = pod.client
            bind = mount_pb2.Mount(type="bind", source=str(pod.rootfs), options=["rbind", "ro"])
            first, second = tmp_path / "first.out", tmp_path / "second.out"
            for fifo in (first, second):
                os.mkfifo(fifo)
            readers = [os.open(fifo, os.O_RDONLY | os.O_NONBLOCK) for fifo in (first, second)]
            try:
                await call(client, "Create", task.CreateTaskRequest(id=CID, bundle=str(pod.bundle), rootfs=[bind],
                                                                    stdout=str(first)), task.CreateTaskResponse)
                await call(client, "Start", task.StartRequest(id=CID), task.StartResponse)
                before = bytearray()
                await _read_until(readers[0], before, b"tick 5\n")
                await call(client, "Checkpoint", task.CheckpointTaskRequest(id=CID, path="/ignored",
                                                                            options=exit_options))
                before += _read_available(readers[0])
                await call(client, "Delete", task.DeleteRequest(id=CID), task.DeleteResponse)
                last = max(int(n) for n in re.findall(rb"tick (\d+)", bytes(before)))

                # A restore into a new container of the same pod, from a bundle of its own.
                bundle = tmp_path / "restored-bundle"
                (bundle / "rootfs").mkdir(parents=True)
                shutil.copy(pod.bundle / "config.json", bundle / "config.json")
                # What is no checkpoint is refused before anything is mounted; images CRIU cannot
                # restore fail the Start with CRIU's own words, and the container can be deleted.
                with pytest.raises(InvalidArgument, match="no CRIU checkpoint"):
                    await call(client, "Create", task.CreateTaskRequest(
                        id=restored_id, bundle=str(bundle), rootfs=[bind], checkpoint=str(tmp_path)))
                assert not mounts_containing(str(bundle))
                broken = tmp_path / "broken-images"
                shutil.copytree(images_dir, broken)
                (broken / "inventory.img").write_bytes(b"\0" * 8)
                await call(client, "Create", task.CreateTaskRequest(
                    id=restored_id, bundle=str(bundle), rootfs=[bind], checkpoint=str(broken)))
                with pytest.raises(NotFound, match="no process yet"):  # nothing runs before Start
                    await call(client, "Kill", task.KillRequest(id=restored_id, signal=15))
                with pytest.raises(KuasarError, match="(?s)runc restore failed.*criu: .*Magic doesn.t match"):
                    await call(client, "Start", task.StartRequest(id=restored_id))
                await call(client, "Delete", task.DeleteRequest(id=restored_id), task.DeleteResponse)
                assert not mounts_containing(str(bundle)) and not (bundle / "criu.conf").exists()
                created = await call(client, "Create", task.CreateTaskRequest(
                    id=restored_id, bundle=str(bundle), rootfs=[bind], stdout=str(second),
                    checkpoint=str(images_dir)), task.CreateTaskResponse)
                assert created.pid == 0  # nothing runs before Start
                started = await call(client, "Start", task.StartRequest(id=restored_id), task.StartResponse)
                assert started.pid > 0
                after = bytearray()
                await _read_until(readers[1], after, b"tick %d\n" % (last + 3))
                numbers = [int(n) for n in re.findall(rb"tick (\d+)", bytes(after))]
                assert numbers[0] == last + 1 and numbers == list(range(last + 1, last + 1 + len(numbers))), \
                    (last, numbers)
                state = await call(client, "State", task.StateRequest(id=restored_id), task.StateResponse)
                assert state.status == types.RUNNING and state.pid == started.pid
                await call(client, "Kill", task.KillRequest(id=restored_id, signal=9, all=True))
                await call(client, "Wait", task.WaitRequest(id=restored_id), task.WaitResponse)
                await call(client, "Delete", task.DeleteRequest(id=restored_id), task.DeleteResponse)
                assert not mounts_containing(str(bundle))
                assert not (bundle / "criu.conf").exists()
            finally:
                for fd in readers:
                    os.close(fd)

    stack.run(scenario())
