"""runc-sandboxer's two resident processes: the CLI execs the daemon proper, which forks the task
server before its event loop (pages shared); both keep out what they never use (TLS, grpcio, click),
and a task server that is gone is started again by exec."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from kuasar.common import cgroup_attach
from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient
from tests.support.procs import thread_names

from .conftest import Stack
from .cri_helpers import remove_pod, run_pod, start_container, task_server_pid, wait_state

pytestmark = pytest.mark.integration

# Libraries whose mapping would mean a resident process loaded what it never uses: ssl (asyncio imports
# it when it can), hashlib's libcrypto, and grpcio's core (the Sandbox API is served on h2 by grpc_h2).
UNWANTED_LIBRARIES = ("libssl.so", "libcrypto.so", "cygrpc")


def mapped_unwanted(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [lib for lib in UNWANTED_LIBRARIES if lib in maps]


async def run_one_container(stack: Stack) -> None:
    async with CriClient(stack.address) as client:
        pod_id, pod = await run_pod(client, "resident", stack.log_dir)
        cid = await start_container(client, pod_id, pod, "sleeper", ["sleep", "3600"])
        await wait_state(client, cid, cri.CONTAINER_RUNNING)
        await remove_pod(client, pod_id)


def test_task_server_is_forked_into_its_own_session_and_keeps_tls_and_grpcio_out(stack: Stack) -> None:
    stack.run(run_one_container(stack))  # the whole pod path has run in both processes
    sandboxer = psutil.Process(stack.sandboxer.pid)
    server = psutil.Process(task_server_pid(stack.sandboxer_dir))
    assert server.name() == "task-server"  # comm, set after the fork
    assert server.ppid() != sandboxer.pid  # double fork: never a zombie of the sandboxer
    assert os.getsid(server.pid) != os.getsid(sandboxer.pid)  # signals to the sandboxer's session spare it
    assert mapped_unwanted(sandboxer.pid) == []
    assert mapped_unwanted(server.pid) == []
    assert sandboxer.num_threads() == 1  # h2 on the asyncio loop: no gRPC core threads
    assert set(thread_names(server.pid, but_main=True)) == {cgroup_attach.THREAD_NAME}  # nothing else beside the loop
    # The CLI exec'd the daemon proper (same pid): click and the TOML parser are not resident.
    assert sandboxer.cmdline()[1:3] == ["-m", "kuasar.common.daemon_main"]


def test_a_task_server_that_is_gone_is_started_again_by_exec(stack: Stack) -> None:
    old = psutil.Process(task_server_pid(stack.sandboxer_dir))
    assert not [p for p in old.children() if p.name().startswith("pod-")]  # nothing of ours dies with it
    old.send_signal(signal.SIGKILL)
    old.wait(10)
    stack.run(run_one_container(stack))
    new = psutil.Process(task_server_pid(stack.sandboxer_dir))
    assert new.pid != old.pid
    assert "kuasar.runc.task_server_main" in new.cmdline()
    assert mapped_unwanted(new.pid) == []
