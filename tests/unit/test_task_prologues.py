"""What every Task backend answers alike before its runtime is involved: a Create of a taken or invalid id
is refused and changes nothing; a Kill of an exec goes to its pid, or is refused while it has none."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from kuasar.common.fifo_stdio import ProcessIO
from kuasar.common.host_runc_tasks import RuncTasks
from kuasar.common.reaper import Reaper
from kuasar.common.runc_tasks import RuncContainer, RuncProcess
from kuasar.common.streaming_io import StreamHub
from kuasar.vmagent.events import EventQueue
from kuasar.vmagent.tasks import GuestTasks
from kuasar.wasm import tasks as wasm_tasks
from tests.support.events import RecordedEvents

CTX = SimpleNamespace(namespace="k8s.io")


def host_runc(root: Path) -> tuple[Any, Any]:
    tasks = RuncTasks(Reaper(), RecordedEvents(), root)  # type: ignore[arg-type]
    container = RuncContainer("c1", root, files=root, namespace="k8s.io",
                              init=RuncProcess("", ProcessIO(), pid=os.getpid(), status=types.RUNNING))
    return tasks, container


def guest(root: Path) -> tuple[Any, Any]:
    tasks = GuestTasks(Reaper(), StreamHub(), EventQueue(), root / "state", str(root / "share"),
                       runc_binary="/nonexistent/runc")
    container = RuncContainer("c1", root, files=root, namespace="k8s.io",
                              init=RuncProcess("", ProcessIO(), pid=os.getpid(), status=types.RUNNING))
    return tasks, container


def wasm(root: Path) -> tuple[Any, Any]:
    tasks = wasm_tasks.WasmTasks(reaper=None, events=RecordedEvents(), directory=root / "dir",  # type: ignore
                                 settings=wasm_tasks.WasmSettings(cache=False))
    init = wasm_tasks.Process("", io=ProcessIO(), spec={}, pid=os.getpid(), status=types.RUNNING)
    return tasks, wasm_tasks.Container("c1", root, "pod", "k8s.io", {}, root, "wasmtime", "", init)


BACKENDS = {"runc": host_runc, "vm-agent": guest, "wasm": wasm}


def with_container(kind: str, root: Path) -> tuple[Any, Any]:
    bundle = root / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"process": {"args": ["/m.wasm"]}}))
    tasks, container = BACKENDS[kind](root)
    tasks.containers["c1"] = container
    return tasks, container


@pytest.mark.parametrize("kind", BACKENDS)
def test_create_of_a_taken_or_invalid_id_is_refused_and_changes_nothing(kind: str, tmp_path: Path) -> None:
    tasks, container = with_container(kind, tmp_path)
    bundle = str(tmp_path / "bundle")

    async def scenario() -> None:
        with pytest.raises(AlreadyExists, match="c1 already exists"):
            await tasks.create(task.CreateTaskRequest(id="c1", bundle=bundle), CTX)
        for bad in ("../c2", "", "a" * 200):
            with pytest.raises(InvalidArgument):
                await tasks.create(task.CreateTaskRequest(id=bad, bundle=bundle), CTX)
    asyncio.run(scenario())
    assert tasks.containers == {"c1": container}


@pytest.mark.parametrize("kind", ["runc", "vm-agent"])
def test_kill_of_an_exec_signals_its_pid_and_one_not_started_is_refused(kind: str, tmp_path: Path) -> None:
    tasks, container = with_container(kind, tmp_path)
    container.execs["e1"] = RuncProcess("e1", ProcessIO())  # created, not started: no pid yet
    child = subprocess.Popen(["sleep", "30"])
    container.execs["e2"] = RuncProcess("e2", ProcessIO(), pid=child.pid, status=types.RUNNING)

    async def scenario() -> None:
        with pytest.raises(FailedPrecondition, match="exec e1 of c1 is not running"):
            await tasks.kill(task.KillRequest(id="c1", exec_id="e1", signal=signal.SIGKILL), CTX)
        # The exec's pid, not `runc kill` (which would signal the container's init; runc is absent here).
        await tasks.kill(task.KillRequest(id="c1", exec_id="e2", signal=signal.SIGTERM), CTX)
    try:
        asyncio.run(scenario())
        assert child.wait(timeout=5) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()
