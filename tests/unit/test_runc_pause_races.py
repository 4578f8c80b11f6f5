"""Pause and Resume of a runc container whose init exits while runc is at work."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.errors import FailedPrecondition
from kuasar.common.host_runc_tasks import RuncTasks
from kuasar.common.reaper import Reaper
from kuasar.common.runc_tasks import RuncContainer, RuncProcess
from tests.support.events import RecordedEvents


class ExitingRunc:
    """`runc pause` / `runc resume` during which the reaper records the init's exit (on resume: the
    SIGTERM that was pending while it was frozen)."""

    def __init__(self, init: RuncProcess) -> None:
        self.init = init

    async def pause(self, container_id: str) -> None:
        self.init.record_exit(137, 1)

    async def resume(self, container_id: str) -> None:
        self.init.record_exit(143, 1)


def _tasks(tmp_path: Path, status: int) -> tuple[RuncTasks, RecordedEvents]:
    events = RecordedEvents()
    tasks = RuncTasks(Reaper(), events, tmp_path)  # type: ignore[arg-type]
    io = SimpleNamespace(stdin="", stdout="", stderr="", terminal=False)
    init = RuncProcess("", io, pid=4242, status=status)
    tasks.containers["c1"] = RuncContainer("c1", tmp_path, files=tmp_path, namespace="k8s.io", init=init)
    tasks.runc = ExitingRunc(init)  # type: ignore[assignment]
    return tasks, events


@pytest.mark.parametrize("paused", [False, True])
def test_an_exit_seen_while_runc_pauses_or_resumes_is_kept(tmp_path: Path, paused: bool) -> None:
    # The status was set after runc returned, over the exit: State said RUNNING (or PAUSED) for a dead
    # init, and Delete refused it for ever as still running.
    tasks, events = _tasks(tmp_path, types.PAUSED if paused else types.RUNNING)

    async def scenario() -> None:
        if paused:
            await tasks.resume(task.ResumeRequest(id="c1"), None)  # type: ignore[arg-type]
        else:
            with pytest.raises(FailedPrecondition, match="stopped"):
                await tasks.pause(task.PauseRequest(id="c1"), None)  # type: ignore[arg-type]
        state = await tasks.state(task.StateRequest(id="c1"), None)  # type: ignore[arg-type]
        assert (state.status, state.exit_status) == (types.STOPPED, 143 if paused else 137)

    asyncio.run(scenario())
    assert events.topics == []


class CountingRunc:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def pause(self, container_id: str) -> None:
        self.calls.append("pause")

    async def resume(self, container_id: str) -> None:
        self.calls.append("resume")


@pytest.mark.parametrize(("status", "method"), [(types.CREATED, "pause"), (types.RUNNING, "resume"),
                                                (types.STOPPED, "pause"), (types.CREATED, "resume")])
def test_pause_and_resume_in_the_wrong_state_are_refused_before_runc_runs(tmp_path: Path, status: int,
                                                                          method: str) -> None:
    # runc pauses a created container too, and then refuses to start it: Pause froze it and then
    # refused, leaving a container that could never start.
    tasks, events = _tasks(tmp_path, status)
    runc = CountingRunc()
    tasks.runc = runc  # type: ignore[assignment]
    request = task.PauseRequest(id="c1") if method == "pause" else task.ResumeRequest(id="c1")

    async def scenario() -> None:
        with pytest.raises(FailedPrecondition, match=f"cannot {method}"):
            await getattr(tasks, method)(request, None)

    asyncio.run(scenario())
    assert runc.calls == [] and events.topics == []
    assert tasks.containers["c1"].init.status == status
