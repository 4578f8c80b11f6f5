"""Pause, Resume, Kill and State of wasm containers against a stand-in cgroup v2 freezer (no real cgroups):
a Pause that fails or is cancelled thaws again, an exit while freezing stays an exit, SIGKILL of one exec
does not resume its container, an exec of a paused container reads paused, and Pause waits for an exec
Start in progress."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from kuasar.common import cgroups
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.errors import FailedPrecondition, RuntimeFailure
from kuasar.common.fifo_stdio import ProcessIO
from kuasar.common.reaper import Exit
from kuasar.wasm import resources
from kuasar.wasm import tasks as wasm_tasks
from kuasar.wasm.launch import Launch, LaunchPlan
from kuasar.wasm.runner import RunSpec

# How often the stand-in kernel brings cgroup.events in line with cgroup.freeze.
KERNEL_TICK = 0.002


class Events:
    def __init__(self) -> None:
        self.topics: list[str] = []

    def publish(self, topic: str, message: object, namespace: str) -> None:
        self.topics.append(topic)


class Freezer:
    """The container's cgroup v2 directory; `follow()` plays the kernel, which reports in cgroup.events
    the state cgroup.freeze asks for, except while `stuck` (a process that will not freeze)."""

    def __init__(self, directory: Path) -> None:
        self.knob, self.events = directory / "cgroup.freeze", directory / "cgroup.events"
        self.knob.write_text("0\n")
        self.events.write_text("populated 1\nfrozen 0\n")
        self.stuck = False

    @property
    def frozen(self) -> str:
        return self.knob.read_text().strip()

    async def follow(self) -> None:
        while True:
            if not self.stuck:
                self.events.write_text(f"populated 1\nfrozen {self.frozen}\n")
            await asyncio.sleep(KERNEL_TICK)


@pytest.fixture
def freezer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Freezer:
    root = tmp_path / "cgroup"
    (root / "pod" / "c1").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("memory pids\n")  # a unified (v2) hierarchy
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", root)
    return Freezer(root / "pod" / "c1")


@pytest.fixture
def sleepers() -> Iterator[list[int]]:
    """Two real processes (the init and an exec) that signals can reach."""
    procs = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    yield [p.pid for p in procs]
    for p in procs:
        p.kill()
        p.wait()


def make_tasks(tmp_path: Path, events: Events, init_pid: int = 999999) -> tuple[wasm_tasks.WasmTasks,
                                                                                 wasm_tasks.Container]:
    tasks = wasm_tasks.WasmTasks(reaper=None, events=events, directory=tmp_path / "dir",  # type: ignore[arg-type]
                                 settings=wasm_tasks.WasmSettings(cache=False))
    init = wasm_tasks.Process("", io=ProcessIO(), spec={}, pid=init_pid, status=types.RUNNING)
    container = wasm_tasks.Container("c1", tmp_path, "pod", "k8s.io", {}, tmp_path, "wasmtime", "", init,
                                     cgroup=cgroups.PodCgroup("pod/c1"))
    tasks.containers["c1"] = container
    return tasks, container


def run_with_kernel(freezer: Freezer, scenario: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        kernel = asyncio.create_task(freezer.follow())
        try:
            await scenario()
        finally:
            kernel.cancel()
    asyncio.run(main())


async def status_of(tasks: wasm_tasks.WasmTasks, exec_id: str = "") -> int:
    return (await tasks.state(task.StateRequest(id="c1", exec_id=exec_id), None)).status  # type: ignore[arg-type]


def test_a_pause_that_times_out_thaws_the_cgroup_again(tmp_path: Path, freezer: Freezer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A Pause that timed out used to leave cgroup.freeze at 1 while State said RUNNING (and Resume then
    # refused, the container not being paused): frozen for good.
    monkeypatch.setattr(resources, "FREEZE_TIMEOUT", 0.1)
    freezer.stuck = True
    events = Events()

    async def scenario() -> None:
        tasks, _ = make_tasks(tmp_path, events)
        with pytest.raises(RuntimeFailure, match="did not reach 1"):
            await tasks.pause(task.PauseRequest(id="c1"), None)  # type: ignore[arg-type]
        assert freezer.frozen == "0"
        assert await status_of(tasks) == types.RUNNING
        assert "/tasks/paused" not in events.topics
    run_with_kernel(freezer, scenario)


def test_a_cancelled_pause_thaws_the_cgroup_again(tmp_path: Path, freezer: Freezer) -> None:
    # The same with a Pause cancelled (containerd gave up on the request) while the freezer settled.
    freezer.stuck = True

    async def scenario() -> None:
        tasks, _ = make_tasks(tmp_path, Events())
        pause = asyncio.create_task(tasks.pause(task.PauseRequest(id="c1"), None))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        assert freezer.frozen == "1"  # freezing meanwhile
        pause.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pause
        assert freezer.frozen == "0"
        assert await status_of(tasks) == types.RUNNING
    run_with_kernel(freezer, scenario)


def test_an_init_that_exits_while_pause_waits_stays_stopped(tmp_path: Path, freezer: Freezer) -> None:
    # The reaper recorded STOPPED while Pause waited for the freezer, and Pause then overwrote it with
    # PAUSED: State hid the exit and Delete refused the dead container as still running.
    freezer.stuck = True
    events = Events()

    async def scenario() -> None:
        tasks, container = make_tasks(tmp_path, events)
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[Exit] = loop.create_future()
        exited.set_result(Exit(container.init.pid, 1, 0))
        loop.call_later(0.02, tasks._on_exit, container, container.init, exited)
        loop.call_later(0.05, setattr, freezer, "stuck", False)
        with pytest.raises(FailedPrecondition, match="stopped while it was being paused"):
            await tasks.pause(task.PauseRequest(id="c1"), None)  # type: ignore[arg-type]
        assert await status_of(tasks) == types.STOPPED
        assert freezer.frozen == "0"
        assert "/tasks/paused" not in events.topics
    run_with_kernel(freezer, scenario)


def test_sigkill_of_one_exec_leaves_a_paused_container_paused(tmp_path: Path, freezer: Freezer,
                                                              sleepers: list[int]) -> None:
    # Kill(SIGKILL) of a single exec used to thaw the whole container and mark it RUNNING.
    events = Events()

    async def scenario() -> None:
        tasks, container = make_tasks(tmp_path, events, init_pid=sleepers[0])
        container.execs["e1"] = wasm_tasks.Process("e1", io=ProcessIO(), spec={}, pid=sleepers[1],
                                                   status=types.RUNNING)
        await tasks.pause(task.PauseRequest(id="c1"), None)  # type: ignore[arg-type]
        await tasks.kill(task.KillRequest(id="c1", exec_id="e1", signal=signal.SIGKILL), None)  # type: ignore[arg-type]
        assert freezer.frozen == "1"
        assert container.init.status == types.PAUSED
        # ... while SIGKILL of the init still thaws, or it would never die.
        await tasks.kill(task.KillRequest(id="c1", signal=signal.SIGKILL), None)  # type: ignore[arg-type]
        assert freezer.frozen == "0"
    run_with_kernel(freezer, scenario)


def test_a_running_exec_of_a_paused_container_is_paused(tmp_path: Path, freezer: Freezer) -> None:
    # State of an exec used to say RUNNING while its whole cgroup was frozen (runc's shim says PAUSED).
    async def scenario() -> None:
        tasks, container = make_tasks(tmp_path, Events())
        container.execs["e1"] = wasm_tasks.Process("e1", io=ProcessIO(), spec={}, pid=999998, status=types.RUNNING)
        container.execs["done"] = wasm_tasks.Process("done", io=ProcessIO(), spec={}, pid=999997,
                                                     status=types.STOPPED)
        await tasks.pause(task.PauseRequest(id="c1"), None)  # type: ignore[arg-type]
        assert await status_of(tasks, "e1") == types.PAUSED
        assert await status_of(tasks, "done") == types.STOPPED
        await tasks.resume(task.ResumeRequest(id="c1"), None)  # type: ignore[arg-type]
        assert await status_of(tasks, "e1") == types.RUNNING
    run_with_kernel(freezer, scenario)


def test_pause_waits_for_an_exec_start_in_progress(tmp_path: Path, freezer: Freezer, sleepers: list[int],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Pause did not take the container's lock, so it froze the cgroup while an exec Start (which holds it)
    # had a process in the cgroup that had not reported yet: Start then waited for a frozen process.
    async def scenario() -> None:
        tasks, container = make_tasks(tmp_path, Events(), init_pid=sleepers[0])
        report_r, report_w = os.pipe()

        def fake_launch(plan: LaunchPlan, stdio: object, reaper: object, wait_for_go: bool) -> Launch:
            return Launch(sleepers[1], asyncio.get_running_loop().create_future(), report_r)

        monkeypatch.setattr(wasm_tasks, "launch", fake_launch)
        monkeypatch.setattr(tasks, "plan", lambda c, p, n, *_: LaunchPlan(n, "wasmtime", RunSpec("m", ["m"], [])))
        container.execs["e1"] = wasm_tasks.Process("e1", io=ProcessIO(), spec={"args": ["/m.wasm"]})
        start = asyncio.create_task(tasks.start(task.StartRequest(id="c1", exec_id="e1"), None))  # type: ignore[arg-type]
        await asyncio.sleep(0.02)
        pause = asyncio.create_task(tasks.pause(task.PauseRequest(id="c1"), None))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        frozen_during_start, paused_during_start = freezer.frozen, pause.done()
        os.write(report_w, b"ok")  # the exec's process is ready (before any assert: Start must not hang)
        os.close(report_w)
        assert (await start).pid == sleepers[1]
        await pause
        assert (frozen_during_start, paused_during_start) == ("0", False)
        assert freezer.frozen == "1" and container.init.status == types.PAUSED
    run_with_kernel(freezer, scenario)
