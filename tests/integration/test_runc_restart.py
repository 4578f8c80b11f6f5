"""runc-sandboxer killed with SIGKILL and restarted: pods and containers live on and stay manageable."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient

from .conftest import Stack, start_sandboxer
from .cri_helpers import (
    remove_pod,
    run_pod,
    start_container,
    task_server_pid,
    wait_pod_not_ready,
    wait_state,
    while_unavailable,
)

pytestmark = pytest.mark.integration


def test_sandboxer_sigkill_and_restart_keeps_pods_and_reports_exits_seen_while_down(stack: Stack) -> None:
    async def before() -> dict[str, str]:
        async with CriClient(stack.address) as client:
            keep_id, keep = await run_pod(client, "keep", stack.log_dir)
            long_cid = await start_container(client, keep_id, keep, "long", ["sleep", "3600"])
            short_cid = await start_container(client, keep_id, keep, "short", ["sh", "-c", "sleep 2; exit 5"])
            doomed_id, _ = await run_pod(client, "doomed", stack.log_dir)
            cut_id, _ = await run_pod(client, "cut", stack.log_dir)
            await wait_state(client, long_cid, cri.CONTAINER_RUNNING)
            doomed_pid = (await client.pod_sandbox_status(doomed_id, verbose=True)).info
            return {"keep": keep_id, "long": long_cid, "short": short_cid, "doomed": doomed_id,
                    "doomed_info": str(doomed_pid), "cut": cut_id}

    ids = stack.run(before())
    server = task_server_pid(stack.sandboxer_dir)
    pods_before = sorted(os.listdir(stack.sandboxer_dir / "sandboxes"))

    stack.sandboxer.send_signal(signal.SIGKILL)
    stack.sandboxer.wait(10)
    # While the sandboxer is down: a container exits, and one pod's process is killed from outside.
    doomed_record = (stack.sandboxer_dir / "sandboxes" / ids["doomed"] / "sandbox.json").read_text()
    os.kill(json.loads(doomed_record)["pid"], signal.SIGKILL)
    # One pod's record as a kill between its Start's reply and the save of READY leaves it: created.
    # containerd has it running; the restart must end it, and containerd then learn that it exited.
    cut_path = stack.sandboxer_dir / "sandboxes" / ids["cut"] / "sandbox.json"
    cut_record = json.loads(cut_path.read_text())
    cut_pid = cut_record["pid"]
    cut_record.update(state="created", pid=0, address="", version=0)
    cut_path.write_text(json.dumps(cut_record))
    time.sleep(2.5)
    stack.sandboxer = start_sandboxer(stack.sandboxer_socket, stack.sandboxer_dir, stack.sandboxer_log,
                                      stack.containerd.ttrpc_address)

    async def after() -> None:
        async with CriClient(stack.address) as client:
            # containerd's gRPC channel to us backs off while we were down; it reconnects by itself.
            status = await while_unavailable(lambda: client.pod_sandbox_status(ids["keep"]))
            assert status.status.state == cri.SANDBOX_READY
            assert (await client.container_status(ids["long"])).status.state == cri.CONTAINER_RUNNING
            short = await wait_state(client, ids["short"], cri.CONTAINER_EXITED)
            assert short.exit_code == 5
            # containerd's Controller.Wait retried through the outage and now sees the real exit.
            await wait_pod_not_ready(client, ids["doomed"], "doomed pod never became NOTREADY", timeout=20)
            await wait_pod_not_ready(client, ids["cut"], "the pod whose Start was cut short stayed READY",
                                     timeout=20)
            assert not psutil.pid_exists(cut_pid) or psutil.Process(cut_pid).status() == psutil.STATUS_ZOMBIE
            assert not (stack.sandboxer_dir / "pods" / ids["cut"]).exists()
            result = await client.exec_sync(ids["long"], ["echo", "still-here"], timeout=20)
            assert result.stdout == b"still-here\n"
            await remove_pod(client, ids["keep"])
            await remove_pod(client, ids["doomed"])
            await remove_pod(client, ids["cut"])

    stack.run(after())
    assert task_server_pid(stack.sandboxer_dir) == server, "a second task server was started"
    assert len(pods_before) == 3
    assert os.listdir(stack.sandboxer_dir / "sandboxes") == []

