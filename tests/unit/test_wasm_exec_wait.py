"""Task.Wait on a wasm exec that never runs: containerd calls Wait before Start, so Wait must return when
Start fails or the exec is deleted unstarted, not only when the reaper reports an exit."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.errors import InvalidArgument
from kuasar.common.fifo_stdio import ProcessIO
from kuasar.common.reaper import Exit
from kuasar.common.task_table import NEVER_RAN_EXIT_STATUS
from kuasar.wasm import tasks as wasm_tasks
from kuasar.wasm.launch import Launch, LaunchPlan
from kuasar.wasm.runner import RunSpec

# Long enough for a Wait that is going to return; a hung one fails the test instead of the run.
WAIT_TIMEOUT = 1.0


class FakeEvents:
    def publish(self, *args: object, **kwargs: object) -> None:
        pass


def make_tasks(tmp_path: Path) -> tuple[wasm_tasks.WasmTasks, wasm_tasks.Container]:
    tasks = wasm_tasks.WasmTasks(reaper=None, events=FakeEvents(), directory=tmp_path / "dir",  # type: ignore[arg-type]
                                 settings=wasm_tasks.WasmSettings(cache=False))
    init = wasm_tasks.Process("", io=ProcessIO(), spec={}, pid=os.getpid(), status=types.RUNNING)
    container = wasm_tasks.Container("c1", tmp_path, "pod", "k8s.io", {}, tmp_path, "wasmtime", "", init)
    tasks.containers["c1"] = container
    container.execs["e1"] = wasm_tasks.Process("e1", io=ProcessIO(), spec={"args": ["/bad.wasm"]})
    return tasks, container


def launch_that_cannot_instantiate(plan: LaunchPlan, stdio: object, reaper: object, wait_for_go: bool) -> Launch:
    """A child that reports its module cannot run, then exits (what a bad import does)."""
    report_r, report_w = os.pipe()
    os.write(report_w, b"!Minstantiating /bad.wasm: unknown import")
    os.close(report_w)
    child = subprocess.Popen(["true"])
    exited = asyncio.get_running_loop().create_future()
    exited.set_result(Exit(child.pid, child.wait(), 0))
    return Launch(child.pid, exited, report_r)


def wait_for(tasks: wasm_tasks.WasmTasks) -> asyncio.Task[task.WaitResponse]:
    return asyncio.create_task(tasks.wait(task.WaitRequest(id="c1", exec_id="e1"), None))  # type: ignore[arg-type]


def test_wait_on_an_exec_whose_start_failed_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The failed launch never set the exec's `exited`, so its Wait hung forever (even after Delete).
    async def main() -> None:
        tasks, _ = make_tasks(tmp_path)
        monkeypatch.setattr(wasm_tasks, "launch", launch_that_cannot_instantiate)
        monkeypatch.setattr(tasks, "plan", lambda c, p, n: LaunchPlan(n, "wasmtime", RunSpec("m", ["m"], [])))
        waiter = wait_for(tasks)
        with pytest.raises(InvalidArgument, match="unknown import"):
            await tasks.start(task.StartRequest(id="c1", exec_id="e1"), None)  # type: ignore[arg-type]
        response = await asyncio.wait_for(waiter, WAIT_TIMEOUT)
        assert response.exit_status == NEVER_RAN_EXIT_STATUS
        state = await tasks.state(task.StateRequest(id="c1", exec_id="e1"), None)  # type: ignore[arg-type]
        assert state.status == types.STOPPED
        await tasks.delete(task.DeleteRequest(id="c1", exec_id="e1"), None)  # type: ignore[arg-type]
    asyncio.run(main())


def test_wait_on_an_exec_deleted_before_start_returns(tmp_path: Path) -> None:
    # Deleting an exec that was never started left its Wait hanging the same way.
    async def main() -> None:
        tasks, container = make_tasks(tmp_path)
        waiter = wait_for(tasks)
        await asyncio.sleep(0)
        await tasks.delete(task.DeleteRequest(id="c1", exec_id="e1"), None)  # type: ignore[arg-type]
        response = await asyncio.wait_for(waiter, WAIT_TIMEOUT)
        assert response.exit_status == NEVER_RAN_EXIT_STATUS
        assert "e1" not in container.execs
    asyncio.run(main())
