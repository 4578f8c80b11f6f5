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
from kuasar.common.errors import InvalidArgument, NotFound
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
        monkeypatch.setattr(tasks, "plan", lambda c, p, n, *_: LaunchPlan(n, "wasmtime", RunSpec("m", ["m"], [])))
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


def test_an_inits_exit_is_reported_after_its_execs_which_end_with_it(tmp_path: Path) -> None:
    # As containerd's shim (and the runc backend): the init's exit came first, then its execs' (killed
    # with it) after; CRI had already taken the container for exited and deleted it.
    async def main() -> None:
        tasks, container = make_tasks(tmp_path)
        seen: list[tuple[str, int]] = []
        tasks.events.publish = lambda topic, event, namespace="": (  # type: ignore[method-assign]
            seen.append((event.id, event.exit_status)))
        exec_child = subprocess.Popen(["sleep", "30"])
        exec_proc = container.execs["e1"]
        exec_proc.pid, exec_proc.status = exec_child.pid, types.RUNNING
        loop = asyncio.get_running_loop()
        init_exit = loop.create_future()
        init_exit.set_result(Exit(container.init.pid, 3, 1))
        tasks._on_exit(container, container.init, init_exit)
        assert exec_child.wait(timeout=5) == -9  # ended with its init
        assert container.init.reaped and container.init.status == types.RUNNING and seen == []
        with pytest.raises(NotFound, match="already finished"):  # the init's pid may be another's now
            await tasks.kill(task.KillRequest(id="c1", signal=9), None)  # type: ignore[arg-type]
        exec_exit = loop.create_future()
        exec_exit.set_result(Exit(exec_child.pid, 137, 2))
        tasks._on_exit(container, exec_proc, exec_exit)
        await asyncio.wait_for(container.init.exited.wait(), WAIT_TIMEOUT)
        assert seen == [("e1", 137), ("c1", 3)]
    asyncio.run(main())
