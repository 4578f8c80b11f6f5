"""The gVisor Task API against a fake runsc: Pause/Resume racing an exit, ids that pods and containers
share in runsc, removing a pod's never-started containers, and an exec's pid inside the sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from kuasar.common import spawn
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.api.kuasar.pods.v1 import pods_pb2 as pods
from kuasar.common.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, NotFound, RuntimeFailure
from kuasar.common.fifo_stdio import ProcessIO
from kuasar.common.reaper import Exit, Reaper
from kuasar.quark import gvisor_pod
from kuasar.quark import gvisor_tasks as gt
from kuasar.quark.config import QuarkConfig
from kuasar.quark.runsc import RUNSC_FAILURE, Runsc, SandboxUnresponsive, Stdio
from tests.support.events import RecordedEvents


class Ctx:
    namespace = "k8s.io"


class FakeRunsc(Runsc):
    """runsc's command line, recorded instead of run (`has` is the real one, over a real root)."""

    def __init__(self, root: Path) -> None:
        super().__init__(Reaper(), root)
        self.calls: list[tuple[str, str]] = []

    async def create(self, container_id: str, bundle: Path, pid_file: Path, network: str, stdio: Any,
                     console_socket: Path | None = None, control: bool = False) -> None:
        self.calls.append(("create", container_id))
        pid_file.write_text("4242")

    async def start(self, container_id: str, bundle: Path, network: str, stdio: Any = None) -> None:
        self.calls.append(("start", container_id))

    async def delete(self, container_id: str, network: str) -> None:
        self.calls.append(("delete", container_id))

    async def kill(self, container_id: str, signal: int, network: str, *, all_processes: bool = False,
                   pid: int = 0) -> None:
        self.calls.append(("kill", f"{container_id}:{pid}" if pid else container_id))

    async def pause(self, container_id: str, network: str) -> None:
        self.calls.append(("pause", container_id))

    async def resume(self, container_id: str, network: str) -> None:
        self.calls.append(("resume", container_id))


def make_tasks(tmp_path: Path, runsc_class: type[FakeRunsc] = FakeRunsc) -> tuple[gt.GvisorTasks, FakeRunsc,
                                                                                    RecordedEvents]:
    events = RecordedEvents()
    tasks = gt.GvisorTasks(Reaper(), events, tmp_path, QuarkConfig(backend="runsc"))  # type: ignore[arg-type]
    runsc = runsc_class(tmp_path / "runsc")
    tasks.runsc = runsc
    return tasks, runsc, events


def add_pod(tasks: gt.GvisorTasks, tmp_path: Path, pod_id: str = "pod") -> gt.GvisorPod:
    pod = gt.GvisorPod(pod_id, tmp_path / pod_id, "none", pid=1)
    tasks.pods[pod_id] = pod
    return pod


def add_container(tasks: gt.GvisorTasks, tmp_path: Path, cid: str = "c1", pod_id: str = "pod",
                  status: int = types.RUNNING) -> gt.Container:
    pod = tasks.pods.get(pod_id) or add_pod(tasks, tmp_path, pod_id)
    bundle = tmp_path / cid
    bundle.mkdir(exist_ok=True)
    container = gt.Container(cid, bundle, pod=pod, namespace="k8s.io", init=gt.Process("", ProcessIO()))
    container.init.status, container.init.pid = status, 42
    tasks.containers[cid] = container
    return container


def container_bundle(tmp_path: Path, pod_id: str) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"annotations": {gvisor_pod.SANDBOX_ID: pod_id,
                                                                    gvisor_pod.CONTAINER_TYPE: "container"}}))
    return bundle


# -- Pause / Resume ----------------------------------------------------------------------------------
def test_an_exit_seen_while_runsc_pauses_leaves_the_container_stopped_and_deletable(tmp_path: Path) -> None:
    # Pause set PAUSED after `runsc pause` returned, over the exit `runsc wait` had reported meanwhile:
    # State said paused for a dead init and Delete refused it for ever as still running.
    class ExitingRunsc(FakeRunsc):
        async def pause(self, container_id: str, network: str) -> None:
            tasks._exited(container, container.init, 137)

    tasks, runsc, events = make_tasks(tmp_path, ExitingRunsc)
    container = add_container(tasks, tmp_path)

    async def scenario() -> None:
        with pytest.raises(FailedPrecondition, match="stopped"):
            await tasks.pause(task.PauseRequest(id="c1"), Ctx())  # type: ignore[arg-type]
        assert (container.init.status, container.init.exit_status) == (types.STOPPED, 137)
        deleted = await tasks.delete(task.DeleteRequest(id="c1"), Ctx())  # type: ignore[arg-type]
        assert deleted.exit_status == 137 and "c1" not in tasks.containers

    asyncio.run(scenario())
    assert "/tasks/paused" not in events.topics


def test_an_exit_seen_while_runsc_resumes_leaves_the_container_stopped(tmp_path: Path) -> None:
    # Resume set RUNNING after `runsc resume` returned, over the exit of a kill pending while paused.
    class ExitingRunsc(FakeRunsc):
        async def resume(self, container_id: str, network: str) -> None:
            tasks._exited(container, container.init, 137)

    tasks, runsc, events = make_tasks(tmp_path, ExitingRunsc)
    container = add_container(tasks, tmp_path, status=types.PAUSED)
    asyncio.run(tasks.resume(task.ResumeRequest(id="c1"), Ctx()))  # type: ignore[arg-type]
    assert container.init.status == types.STOPPED
    assert "/tasks/resumed" not in events.topics


def test_pause_of_a_container_not_running_is_refused_without_runsc(tmp_path: Path) -> None:
    # A created container was paused by runsc and marked PAUSED: a Resume then made it RUNNING without
    # it ever being started.
    tasks, runsc, events = make_tasks(tmp_path)
    add_container(tasks, tmp_path, status=types.CREATED)
    with pytest.raises(FailedPrecondition, match="created"):
        asyncio.run(tasks.pause(task.PauseRequest(id="c1"), Ctx()))  # type: ignore[arg-type]
    assert runsc.calls == [] and events.topics == []


def test_pause_and_resume_of_a_container_take_turns(tmp_path: Path) -> None:
    # Without the container's lock a Resume ran `runsc resume` while `runsc pause` was still at work,
    # and the two set the status in whatever order they returned.
    class SlowRunsc(FakeRunsc):
        async def pause(self, container_id: str, network: str) -> None:
            self.calls.append(("pause", container_id))
            await asyncio.sleep(0.05)
            self.calls.append(("paused", container_id))

    tasks, runsc, events = make_tasks(tmp_path, SlowRunsc)
    container = add_container(tasks, tmp_path)

    async def scenario() -> None:
        pausing = asyncio.create_task(tasks.pause(task.PauseRequest(id="c1"), Ctx()))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        await tasks.resume(task.ResumeRequest(id="c1"), Ctx())  # type: ignore[arg-type]
        await pausing

    asyncio.run(scenario())
    assert [call for call, _ in runsc.calls] == ["pause", "paused", "resume"]
    assert container.init.status == types.RUNNING
    assert events.topics == ["/tasks/paused", "/tasks/resumed"]


def test_pause_is_refused_while_another_container_of_the_pod_runs(tmp_path: Path) -> None:
    # runsc pauses the whole sandbox: the pod's other containers froze while State said RUNNING.
    tasks, runsc, events = make_tasks(tmp_path)
    add_container(tasks, tmp_path, "c1")
    add_container(tasks, tmp_path, "c2")
    add_container(tasks, tmp_path, "other-pods", pod_id="pod2")
    with pytest.raises(FailedPrecondition, match="gVisor pauses its whole pod, where c2 run"):
        asyncio.run(tasks.pause(task.PauseRequest(id="c1"), Ctx()))  # type: ignore[arg-type]
    assert runsc.calls == [] and events.topics == []
    tasks.containers["c2"].init.status = types.STOPPED  # alone in its pod now (another pod's does not count)
    asyncio.run(tasks.pause(task.PauseRequest(id="c1"), Ctx()))  # type: ignore[arg-type]
    assert runsc.calls == [("pause", "c1")]


def test_a_paused_container_is_resumed_for_a_sigkill_and_for_its_pods_removal(tmp_path: Path) -> None:
    # runsc refuses to signal anything in a paused sandbox ("in state paused": Kill failed after 1 s)
    # and its delete --force waits until something resumes it (RemovePodSandbox hung).
    tasks, runsc, events = make_tasks(tmp_path)
    container = add_container(tasks, tmp_path, "c1", status=types.PAUSED)
    container.execs["e1"] = gt.Process("e1", ProcessIO())
    container.execs["e1"].status, container.execs["e1"].internal_pid = types.RUNNING, 7

    async def scenario() -> None:
        with pytest.raises(FailedPrecondition, match="paused"):  # not lost without a word
            await tasks.kill(task.KillRequest(id="c1", exec_id="e1", signal=9), Ctx())  # type: ignore[arg-type]
        with pytest.raises(FailedPrecondition, match="resume it first"):  # at once, not runsc's refusal
            await tasks.kill(task.KillRequest(id="c1", signal=15), Ctx())  # type: ignore[arg-type]
        assert runsc.calls == []
        await tasks.kill(task.KillRequest(id="c1", signal=9), Ctx())  # type: ignore[arg-type]
        assert runsc.calls == [("resume", "c1"), ("kill", "c1")] and container.init.status == types.RUNNING

        container.init.status = types.PAUSED
        runsc.calls.clear()
        await tasks.remove_pod_containers("pod")
        assert runsc.calls == [("resume", "c1"), ("delete", "c1")]

    asyncio.run(scenario())


# -- ids pods and containers share in runsc ----------------------------------------------------------------
class CreateFailsIfTaken(FakeRunsc):
    """runsc refuses an id it already has; the fake knows the pods given to it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.taken: set[str] = set()

    async def create(self, container_id: str, bundle: Path, pid_file: Path, network: str, stdio: Any,
                     console_socket: Path | None = None, control: bool = False) -> None:
        self.calls.append(("create", container_id))
        await asyncio.sleep(0.05)
        if container_id in self.taken:
            raise RuntimeFailure(f"runsc create failed (128): container with id {container_id} already exists")
        self.taken.add(container_id)
        pid_file.write_text("4242")


def test_create_of_a_container_with_a_pods_id_is_refused_and_leaves_the_pod_alone(tmp_path: Path) -> None:
    # Only container ids were checked: `runsc create podB` failed and its cleanup ran
    # `runsc delete --force podB`, destroying that other pod's sandbox.
    tasks, runsc, events = make_tasks(tmp_path, CreateFailsIfTaken)
    add_pod(tasks, tmp_path, "podA")
    add_pod(tasks, tmp_path, "podB")
    runsc.taken.add("podB")
    bundle = container_bundle(tmp_path, "podA")
    with pytest.raises(AlreadyExists):
        asyncio.run(tasks.create(task.CreateTaskRequest(id="podB", bundle=str(bundle)), Ctx()))  # type: ignore[arg-type]
    assert runsc.calls == []
    assert "podB" in tasks.pods and "podB" not in tasks.containers


def test_create_of_an_id_runsc_already_has_is_refused_without_deleting_it(tmp_path: Path) -> None:
    # A container runsc has (a dead task server's, that the sweep missed) but we do not know: the failed
    # create's cleanup force-deleted it although this call never made it.
    tasks, runsc, events = make_tasks(tmp_path, CreateFailsIfTaken)
    add_pod(tasks, tmp_path, "podA")
    runsc.taken.add("old")
    (runsc.root / "old_sandbox:old.state").write_text("{}")  # runsc's state file for it
    bundle = container_bundle(tmp_path, "podA")
    with pytest.raises(AlreadyExists, match="runsc already has"):
        asyncio.run(tasks.create(task.CreateTaskRequest(id="old", bundle=str(bundle)), Ctx()))  # type: ignore[arg-type]
    assert runsc.calls == []


def test_a_create_that_fails_before_runsc_create_deletes_nothing(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The cleanup ran `runsc delete --force <id>` even when runsc had not been asked to make anything.
    tasks, runsc, events = make_tasks(tmp_path)
    add_pod(tasks, tmp_path, "podA")

    def broken_spec(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gt, "rewrite_container_spec", broken_spec)
    bundle = container_bundle(tmp_path, "podA")
    with pytest.raises(OSError, match="disk full"):
        asyncio.run(tasks.create(task.CreateTaskRequest(id="c1", bundle=str(bundle)), Ctx()))  # type: ignore[arg-type]
    assert runsc.calls == []


def test_launch_pod_refuses_a_containers_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A pod launched under a container's id failed in runsc, and its cleanup force-deleted that container.
    monkeypatch.setattr(gvisor_pod, "ensure_pause_rootfs", lambda directory, pause=None: tmp_path / "pause-rootfs")
    tasks, runsc, events = make_tasks(tmp_path)
    add_container(tasks, tmp_path, "c1")
    with pytest.raises(AlreadyExists):
        asyncio.run(tasks.launch_pod(pods.CreatePodRequest(id="c1"), None))
    assert runsc.calls == [] and "c1" in tasks.containers


def test_a_container_created_under_the_id_of_a_pod_being_launched_waits_and_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The pod is known only once launched: a Create of its id meanwhile went to runsc, failed there,
    # and its cleanup deleted the pod's new sandbox.
    monkeypatch.setattr(gvisor_pod, "ensure_pause_rootfs", lambda directory, pause=None: tmp_path / "pause-rootfs")
    tasks, runsc, events = make_tasks(tmp_path, CreateFailsIfTaken)
    add_pod(tasks, tmp_path, "podA")
    bundle = container_bundle(tmp_path, "podA")

    async def scenario() -> None:
        launching = asyncio.create_task(tasks.launch_pod(pods.CreatePodRequest(id="podB"), None))
        await asyncio.sleep(0.01)  # in `runsc create podB`
        with pytest.raises(AlreadyExists):
            await tasks.create(task.CreateTaskRequest(id="podB", bundle=str(bundle)), Ctx())  # type: ignore[arg-type]
        assert await launching == 4242

    asyncio.run(scenario())
    assert ("delete", "podB") not in runsc.calls and "podB" in tasks.pods


# -- removing a pod's containers --------------------------------------------------------------------
def test_removing_a_pod_does_not_wait_for_its_created_containers(tmp_path: Path) -> None:
    # A created container's init has no `runsc wait`, so nothing ever reported its exit: removing the pod
    # waited the full 10 s for each one (and StopPodSandbox its whole timeout).
    class KillExits(FakeRunsc):
        async def kill(self, container_id: str, signal: int, network: str, *, all_processes: bool = False,
                       pid: int = 0) -> None:
            self.calls.append(("kill", container_id))
            if container_id == "running":  # its `runsc wait` answers
                tasks._exited(running, running.init, 137)

    tasks, runsc, events = make_tasks(tmp_path, KillExits)
    add_container(tasks, tmp_path, "created", status=types.CREATED)
    running = add_container(tasks, tmp_path, "running")

    async def scenario() -> float:
        running.waiter = asyncio.get_running_loop().create_future()  # its `runsc wait`, as Start makes it
        started = time.monotonic()
        await tasks.remove_pod_containers("pod")
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 2.0
    assert ("kill", "running") in runsc.calls
    assert ("delete", "created") in runsc.calls and ("delete", "running") in runsc.calls
    assert tasks.containers == {}


def test_waiting_for_a_pods_containers_skips_those_never_started(tmp_path: Path) -> None:
    # wait_pod_containers waited for a created container's exit, which no `runsc wait` reports.
    tasks, runsc, events = make_tasks(tmp_path)
    add_container(tasks, tmp_path, "created", status=types.CREATED)

    async def scenario() -> bool:
        return await tasks.wait_pod_containers("pod", 0.5)

    assert asyncio.run(scenario()) is True


# -- an exec's pid inside the sandbox ------------------------------------------------------------------
class ExecRunsc(FakeRunsc):
    """`runsc exec` as a runner that `pid_text` steps write the internal pid file with, and `exit` ends."""

    steps: list[tuple[float, str]] = []
    exit: Exit | None = None

    def spawn_exec(self, container_id: str, network: str, process_json: Path, internal_pid_file: Path,
                   log_path: Path, stdio: Any, terminal: bool = False) -> tuple[int, asyncio.Future[Exit]]:
        loop = asyncio.get_running_loop()
        for delay, text in self.steps:
            loop.call_later(delay, internal_pid_file.write_text, text)
        exited: asyncio.Future[Exit] = loop.create_future()
        if self.exit is not None:
            exited.set_result(self.exit)
        return 999_999, exited  # no process of ours: nothing may signal it


def test_an_exec_pid_file_found_empty_is_read_once_runsc_has_written_it(tmp_path: Path) -> None:
    # runsc creates --internal-pid-file and then writes it: a poll that saw the file empty took pid 0,
    # and every Kill of the exec then did nothing, silently.
    class HalfWritten(ExecRunsc):
        steps = [(0.0, ""), (0.05, "7")]

    tasks, runsc, events = make_tasks(tmp_path, HalfWritten)
    container = add_container(tasks, tmp_path)
    proc = container.execs["e1"] = gt.Process("e1", ProcessIO(), spec=b"{}")

    async def scenario() -> None:
        await tasks._run_exec(container, proc)
        await tasks.kill(task.KillRequest(id="c1", exec_id="e1", signal=9), Ctx())  # type: ignore[arg-type]

    asyncio.run(scenario())
    assert proc.internal_pid == 7 and ("kill", "c1:7") in runsc.calls


def test_kill_of_a_running_exec_whose_pid_is_unknown_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Kill answered OK without signalling anything.
    monkeypatch.setattr(gt, "KILL_RACE_GRACE", 0.05)
    tasks, runsc, events = make_tasks(tmp_path)
    container = add_container(tasks, tmp_path)
    running = container.execs["e1"] = gt.Process("e1", ProcessIO(), status=types.RUNNING)
    created = container.execs["e2"] = gt.Process("e2", ProcessIO())
    ending = container.execs["e3"] = gt.Process("e3", ProcessIO(), status=types.RUNNING)

    async def scenario() -> None:
        with pytest.raises(FailedPrecondition, match="unknown"):
            await tasks.kill(task.KillRequest(id="c1", exec_id="e1", signal=9), Ctx())  # type: ignore[arg-type]
        with pytest.raises(FailedPrecondition, match="not started"):
            await tasks.kill(task.KillRequest(id="c1", exec_id="e2", signal=9), Ctx())  # type: ignore[arg-type]
        # one whose runner exited before runsc wrote the pid: its exit is being recorded
        asyncio.get_running_loop().call_later(0.01, tasks._exited, container, ending, 0)
        with pytest.raises(NotFound, match="already finished"):
            await tasks.kill(task.KillRequest(id="c1", exec_id="e3", signal=9), Ctx())  # type: ignore[arg-type]

    asyncio.run(scenario())
    assert runsc.calls == [] and running.status == types.RUNNING and created.status == types.CREATED


def test_a_failed_exec_start_does_not_signal_a_runner_already_reaped(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The cleanup SIGKILLed the runner's pid even after the reaper had reaped it: by then the pid may be
    # another process's.
    class FailedRunner(ExecRunsc):
        exit = Exit(999_999, RUNSC_FAILURE, 1)

    signalled: list[tuple[int, int]] = []
    monkeypatch.setattr(gt, "signal_quietly", lambda pid, sig: signalled.append((pid, sig)))
    tasks, runsc, events = make_tasks(tmp_path, FailedRunner)
    container = add_container(tasks, tmp_path)
    proc = container.execs["e1"] = gt.Process("e1", ProcessIO(), spec=b"{}")
    with pytest.raises(RuntimeFailure, match="failed"):
        asyncio.run(tasks._run_exec(container, proc))
    assert signalled == [] and proc.pid == 0 and proc.status == types.CREATED


def test_the_sweep_removes_console_sockets_a_dead_task_server_left(tmp_path: Path) -> None:
    tasks, runsc, _ = make_tasks(tmp_path)

    async def nothing_left() -> list:
        return []

    runsc.leftovers = nothing_left  # type: ignore[method-assign]
    (tmp_path / "console-0123456789abcdef.sock").write_bytes(b"")
    asyncio.run(tasks.sweep_leftovers())
    assert list(tmp_path.glob("console-*")) == []


def test_a_container_whose_runsc_start_failed_is_stopped_so_it_can_be_deleted(tmp_path: Path) -> None:
    # runsc leaves it Created, where `runsc kill` refuses it, and containerd deletes no created task with
    # a pid: CRI's cleanup, RemoveContainer and then RemovePodSandbox failed for ever.
    class FailingStart(FakeRunsc):
        async def start(self, container_id: str, bundle: Path, network: str, stdio: Any = None) -> None:
            raise RuntimeFailure("runsc start failed (128): starting container: no such file or directory")

    tasks, runsc, events = make_tasks(tmp_path, FailingStart)
    container = add_container(tasks, tmp_path, status=types.CREATED)

    async def scenario() -> None:
        waiting = asyncio.ensure_future(tasks.wait(task.WaitRequest(id="c1"), Ctx()))  # type: ignore[arg-type]
        with pytest.raises(RuntimeFailure, match="no such file"):
            await tasks.start(task.StartRequest(id="c1"), Ctx())  # type: ignore[arg-type]
        assert (await asyncio.wait_for(waiting, 5)).exit_status == gt.NEVER_RAN_EXIT_STATUS
        deleted = await tasks.delete(task.DeleteRequest(id="c1"), Ctx())  # type: ignore[arg-type]
        assert deleted.exit_status == gt.NEVER_RAN_EXIT_STATUS

    asyncio.run(scenario())
    assert container.init.status == types.STOPPED and "c1" not in tasks.containers
    assert ("delete", "c1") in runsc.calls and ("kill", "c1") not in runsc.calls


def test_a_failed_exec_start_ends_its_wait(tmp_path: Path) -> None:
    # CRI's ExecSync waits before it starts and never cancels that Wait: each failed exec (a probe naming
    # a missing binary, every 10 s) left one waiting in the task server for ever.
    class FailedRunner(ExecRunsc):
        exit = Exit(999_999, RUNSC_FAILURE, 1)

    tasks, runsc, events = make_tasks(tmp_path, FailedRunner)
    container = add_container(tasks, tmp_path)
    container.execs["e1"] = gt.Process("e1", ProcessIO(), spec=b"{}")

    async def scenario() -> None:
        waiting = asyncio.ensure_future(tasks.wait(task.WaitRequest(id="c1", exec_id="e1"), Ctx()))  # type: ignore[arg-type]
        with pytest.raises(RuntimeFailure, match="failed"):
            await tasks.start(task.StartRequest(id="c1", exec_id="e1"), Ctx())  # type: ignore[arg-type]
        assert (await asyncio.wait_for(waiting, 5)).exit_status == gt.NEVER_RAN_EXIT_STATUS

    asyncio.run(scenario())


@pytest.mark.parametrize(("runsc_says", "running"), [("running", True), ("created", False), ("", False)])
def test_a_cancelled_start_watches_a_container_runsc_did_start(tmp_path: Path, runsc_says: str,
                                                                running: bool) -> None:
    # A Start cancelled once `runsc start` had ended (a deadline, containerd gone) was taken for a failed
    # one: the running container was reported exited (255) and nothing watched its real exit.
    class CancelledStart(FakeRunsc):
        async def start(self, container_id: str, bundle: Path, network: str, stdio: Any = None) -> None:
            raise asyncio.CancelledError

        async def status(self, container_id: str, network: str) -> str:
            if not runsc_says:  # a sandbox that does not answer: what it did is unknown
                raise SandboxUnresponsive("runsc state c1: no answer from the sandbox within 30s (killed)")
            return runsc_says

        async def wait(self, container_id: str, network: str) -> int:
            await asyncio.Event().wait()  # runs on
            return 0

    tasks, runsc, events = make_tasks(tmp_path, CancelledStart)
    container = add_container(tasks, tmp_path, status=types.CREATED)

    async def scenario() -> None:
        with pytest.raises(asyncio.CancelledError):
            await tasks.start(task.StartRequest(id="c1"), Ctx())  # type: ignore[arg-type]
        if running:
            assert container.init.status == types.RUNNING and container.waiter is not None
            container.waiter.cancel()
        else:
            assert container.init.status == types.STOPPED and container.waiter is None
            assert container.init.exit_status == gt.NEVER_RAN_EXIT_STATUS

    asyncio.run(scenario())


# -- OOM ------------------------------------------------------------------------------------------------
def test_a_sandbox_oom_counts_for_running_containers_and_those_it_just_ended_only(tmp_path: Path) -> None:
    # The watch is on the pod's cgroup, shared by its containers: a later OOM in the pod turned an init
    # container that had completed long before into "OOMKilled" (CRI takes the event at any time).
    tasks, _, events = make_tasks(tmp_path)
    running = add_container(tasks, tmp_path, "running")
    just_ended = add_container(tasks, tmp_path, "just-ended")
    just_ended.init.record_exit(1, time.time_ns())
    long_done = add_container(tasks, tmp_path, "long-done")
    long_done.init.record_exit(0, time.time_ns() - 60 * 10**9)
    for container in (running, just_ended, long_done):
        tasks._on_sandbox_oom(container)
    assert events.topics == ["/tasks/oom", "/tasks/oom"]


@pytest.mark.parametrize("sandbox_exited", [False, True], ids=["running", "exited"])
def test_an_oom_kill_in_the_pod_ends_its_sandbox_once_whichever_process_the_kernel_chose(
        tmp_path: Path, sandbox_exited: bool) -> None:
    # The kernel killed a systrap stub (the most pages: it maps the sentry's memory), not the sandbox, and
    # the sentry stopped answering: the container ran on and the pod's stop hung. Now the sandbox ends,
    # once; a sandbox whose exit was seen (its pid maybe another's by now) is not signalled.
    sandbox = subprocess.Popen(["sleep", "60"])
    try:
        async def scenario() -> None:
            tasks, _, events = make_tasks(tmp_path)
            pod = add_pod(tasks, tmp_path)
            pod.pid, pod.exited = sandbox.pid, asyncio.get_running_loop().create_future()
            if sandbox_exited:
                pod.exited.set_result(Exit(sandbox.pid, 137, time.time_ns()))
            for cid in ("c1", "c2"):  # the same kill, seen by each container's watch
                tasks._on_sandbox_oom(add_container(tasks, tmp_path, cid))
            assert events.topics == ["/tasks/oom", "/tasks/oom"]
            assert pod.ended_after_oom is not sandbox_exited
        asyncio.run(scenario())
        if sandbox_exited:
            assert sandbox.poll() is None
        else:
            assert sandbox.wait(5) == -signal.SIGKILL
    finally:
        sandbox.kill()
        sandbox.wait()


# -- exit order ---------------------------------------------------------------------------------------
def test_an_inits_exit_is_reported_after_its_execs_which_end_with_it(tmp_path: Path) -> None:
    # As containerd's shim: `runsc wait` of the init returned first, and its exit went out at once, its
    # execs' (their runners end as the sandbox ends the container's processes) after it.
    class InitExits(FakeRunsc):
        def __init__(self, root: Path) -> None:
            super().__init__(root)
            self.init_exits = asyncio.Event()

        async def wait(self, container_id: str, network: str) -> int:
            await self.init_exits.wait()
            return 3

    tasks, runsc, _ = make_tasks(tmp_path, InitExits)
    container = add_container(tasks, tmp_path)
    seen: list[tuple[str, int]] = []
    tasks.events.publish = lambda topic, event, namespace="": seen.append((event.id, event.exit_status))
    exec_proc = gt.Process("e1", ProcessIO(), pid=4343, status=types.RUNNING)
    exec_proc.internal_pid = 7
    container.execs["e1"] = exec_proc

    async def scenario() -> None:
        tasks._started(container)
        runsc.init_exits.set()
        for _ in range(500):
            if container.init.reaped:
                break
            await asyncio.sleep(0.01)
        assert container.init.reaped and container.init.status == types.RUNNING and seen == []
        with pytest.raises(FailedPrecondition, match="not running"):
            container.execs["e2"] = gt.Process("e2", ProcessIO())
            await tasks.start(task.StartRequest(id="c1", exec_id="e2"), Ctx())  # type: ignore[arg-type]
        tasks._exited(container, exec_proc, 137)  # its runner's exit
        await asyncio.wait_for(container.init.exited.wait(), 5)
        assert seen == [("e1", 137), ("c1", 3)]

    asyncio.run(scenario())


# -- a sandbox that stops answering ----------------------------------------------------------------------
class WedgedRunsc(FakeRunsc):
    """A sentry that answers nothing (its control socket accepts, nobody replies): every kill, delete or
    resume times out while the sandbox process lives; once it is dead, runsc deletes without asking it."""

    exited: asyncio.Future[Exit]  # the sandbox's

    def _unanswered(self, name: str, container_id: str) -> None:
        self.calls.append((name, container_id))
        if not self.exited.done():
            raise SandboxUnresponsive(f"runsc {name} {container_id}: no answer from the sandbox within 30s")

    async def kill(self, container_id: str, signal: int, network: str, *, all_processes: bool = False,
                   pid: int = 0) -> None:
        self._unanswered("kill", container_id)

    async def delete(self, container_id: str, network: str) -> None:
        self._unanswered("delete", container_id)

    async def resume(self, container_id: str, network: str) -> None:
        self._unanswered("resume", container_id)


@contextlib.contextmanager
def wedged_pod(tmp_path: Path) -> Iterator[tuple[gt.GvisorTasks, WedgedRunsc, gt.GvisorPod]]:
    """A pod whose sandbox is a live process of ours (`sleep`), watched by the tasks' Reaper as a task
    server watches its sandboxes; killed at the end if it is still there."""
    tasks, runsc, _ = make_tasks(tmp_path, WedgedRunsc)
    tasks.reaper.install()
    pod = add_pod(tasks, tmp_path)
    pod.pid = spawn.start_program(spawn.resolve("sleep"), ["sleep", "60"], os.environ, 0, 1, 2)
    pod.exited = runsc.exited = tasks.reaper.watch(pod.pid)
    try:
        yield tasks, runsc, pod
    finally:
        if not pod.exited.done():
            os.kill(pod.pid, signal.SIGKILL)


def killed(pod: gt.GvisorPod) -> bool:
    return pod.exited is not None and pod.exited.done() and pod.exited.result().status == 128 + signal.SIGKILL


@pytest.mark.parametrize("status", [types.RUNNING, types.PAUSED])
def test_a_sigkill_the_sandbox_does_not_answer_ends_the_sandbox(tmp_path: Path, status: int) -> None:
    # runsc waits for ever on a wedged sentry: CRI's StopContainer and StopPodSandbox hung (DEADLINE_EXCEEDED
    # at the client, for ever after). A SIGKILL it cannot deliver ends the sandbox, and the container with it.
    async def scenario() -> None:
        with wedged_pod(tmp_path) as (tasks, runsc, pod):
            add_container(tasks, tmp_path, "c1", status=status)
            await tasks.kill(task.KillRequest(id="c1", signal=9), Ctx())  # type: ignore[arg-type]
            assert runsc.calls == [("resume" if status == types.PAUSED else "kill", "c1")]
            assert killed(pod) and pod.stopping  # its `runsc wait` failing now means killed

    asyncio.run(scenario())


def test_another_signal_the_sandbox_does_not_answer_fails_and_leaves_it(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gt, "KILL_RACE_GRACE", 0.05)

    async def scenario() -> None:
        with wedged_pod(tmp_path) as (tasks, runsc, pod):
            add_container(tasks, tmp_path, "c1")
            with pytest.raises(DeadlineExceeded, match="no answer from the sandbox"):
                await tasks.kill(task.KillRequest(id="c1", signal=15), Ctx())  # type: ignore[arg-type]
            await asyncio.sleep(0.1)
            assert not pod.stopping and not pod.exited.done()

    asyncio.run(scenario())


def test_a_pods_stop_and_removal_end_a_sandbox_that_does_not_answer(tmp_path: Path) -> None:
    # The pod's stop kills its containers (SIGTERM first: no answer ends the sandbox, and the other
    # container is not asked as long again); the removal deletes them and the sandbox once it is dead.
    async def scenario() -> None:
        with wedged_pod(tmp_path) as (tasks, runsc, pod):
            for cid in ("c1", "c2"):
                add_container(tasks, tmp_path, cid)
            await tasks.kill_pod_containers("pod", signal.SIGTERM)
            assert runsc.calls == [("kill", "c1")] and killed(pod) and pod.stopping
            for container in tasks.containers.values():  # what each one's `runsc wait` reports now
                tasks._exited(container, container.init, gt.KILLED_EXIT_STATUS)
            runsc.calls.clear()
            await tasks.remove_pod_containers("pod")
            await tasks.release_pod("pod")
            assert runsc.calls == [("delete", "c1"), ("delete", "c2"), ("delete", "pod")]
            assert tasks.containers == {} and tasks.pods == {}

    asyncio.run(scenario())


def test_a_delete_the_sandbox_does_not_answer_ends_it_and_is_made_again(tmp_path: Path) -> None:
    async def scenario() -> None:
        with wedged_pod(tmp_path) as (tasks, runsc, pod):
            container = add_container(tasks, tmp_path, "c1", status=types.CREATED)  # no exit awaited
            await tasks.remove_pod_containers("pod")
            assert runsc.calls == [("delete", "c1"), ("delete", "c1")] and "c1" not in tasks.containers
            assert container.init.status == types.STOPPED and killed(pod)

    asyncio.run(scenario())


UNANSWERED = r"^runsc \w+ .*c1.*: no answer from the sandbox within 0.2s \(killed\)"


def unanswering_runsc(tmp_path: Path) -> Path:
    """A runsc binary that does what runsc does against a wedged sentry: wait."""
    path = tmp_path / "unanswering-runsc"
    path.write_text("#!/bin/sh\nexec sleep 60\n")
    path.chmod(0o755)
    return path


def test_a_runsc_command_that_gets_no_answer_is_killed_after_the_control_timeout(tmp_path: Path) -> None:
    async def scenario() -> None:
        reaper = Reaper()
        reaper.install()
        runsc = Runsc(reaper, tmp_path / "root", binary=str(unanswering_runsc(tmp_path)), control_timeout=0.2)
        started = time.monotonic()
        for command in (runsc.kill("c1", 9, "none"), runsc.delete("c1", "none"), runsc.status("c1", "none"),
                        runsc.pause("c1", "none"), runsc.resume("c1", "none"), runsc.ps("c1", "none"),
                        runsc.stats("c1", "none"), runsc.ps("c1", "none", timeout=10),
                        runsc.start("c1", tmp_path, "none"),
                        runsc.create("c1", tmp_path, tmp_path / "pid", "none", Stdio(), control=True)):
            with pytest.raises(SandboxUnresponsive, match=UNANSWERED):
                await command
        assert time.monotonic() - started < 10
        with pytest.raises(SandboxUnresponsive, match=r"^runsc ps .*c1: no answer from the sandbox within 0.05s"):
            await runsc.ps("c1", "none", timeout=0.05)

    asyncio.run(scenario())


def test_pids_of_a_sandbox_that_does_not_answer_is_its_init_within_the_pids_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The listing's caller gave up at PIDS_TIMEOUT, but its cancel waited for `runsc ps` (30 s).
    monkeypatch.setattr(gt, "PIDS_TIMEOUT", 0.3)

    async def scenario() -> None:
        tasks, _, _ = make_tasks(tmp_path)
        tasks.reaper.install()
        tasks.runsc = Runsc(tasks.reaper, tmp_path / "root", binary=str(unanswering_runsc(tmp_path)))
        add_container(tasks, tmp_path, "c1")
        started = time.monotonic()
        answer = await tasks.pids(task.PidsRequest(id="c1"), Ctx())  # type: ignore[arg-type]
        assert [p.pid for p in answer.processes] == [42] and time.monotonic() - started < 5
        assert not [p for p in psutil.Process().children() if p.name() == "sleep"]

    asyncio.run(scenario())


def test_a_pod_whose_sandbox_does_not_answer_its_start_is_ended(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # `runsc start` asks the new sandbox: one that never answered it hung the pod's launch, and its
    # sandbox (pid known only after the start) could not have been ended.
    monkeypatch.setattr(gvisor_pod, "ensure_pause_rootfs", lambda directory, pause=None: tmp_path / "pause-rootfs")

    class UnansweredStart(WedgedRunsc):
        async def create(self, container_id: str, bundle: Path, pid_file: Path, network: str, stdio: Any,
                         console_socket: Path | None = None, control: bool = False) -> None:
            self.calls.append(("create", container_id))
            self.pid = spawn.start_program(spawn.resolve("sleep"), ["sleep", "60"], os.environ, 0, 1, 2)
            self.exited = self.reaper.watch(self.pid)
            pid_file.write_text(str(self.pid))

        async def start(self, container_id: str, bundle: Path, network: str, stdio: Any = None) -> None:
            self._unanswered("start", container_id)

    async def scenario() -> None:
        tasks, runsc, _ = make_tasks(tmp_path, UnansweredStart)
        tasks.reaper.install()
        runsc.reaper = tasks.reaper
        try:
            with pytest.raises(DeadlineExceeded, match="no answer from the sandbox"):
                await tasks.launch_pod(pods.CreatePodRequest(id="podA"), None)
            assert runsc.calls == [("create", "podA"), ("start", "podA"), ("delete", "podA"), ("delete", "podA")]
            assert runsc.exited.done() and runsc.exited.result().status == 128 + signal.SIGKILL
            assert "podA" not in tasks.pods
        finally:
            if not runsc.exited.done():
                os.kill(runsc.pid, signal.SIGKILL)

    asyncio.run(scenario())


def test_a_container_create_the_sandbox_does_not_answer_ends_the_sandbox(tmp_path: Path) -> None:
    class UnansweredCreate(WedgedRunsc):
        async def create(self, container_id: str, bundle: Path, pid_file: Path, network: str, stdio: Any,
                         console_socket: Path | None = None, control: bool = False) -> None:
            assert control  # a sub-container's create asks its sandbox
            self._unanswered("create", container_id)

    async def scenario() -> None:
        with wedged_pod(tmp_path) as (tasks, runsc, pod):
            tasks.runsc = unanswered = UnansweredCreate(runsc.root)
            unanswered.exited = runsc.exited
            bundle = container_bundle(tmp_path, "pod")
            with pytest.raises(DeadlineExceeded, match="no answer from the sandbox"):
                await tasks.create(task.CreateTaskRequest(id="c1", bundle=str(bundle)), Ctx())  # type: ignore[arg-type]
            assert unanswered.calls == [("create", "c1"), ("delete", "c1"), ("delete", "c1")]
            assert killed(pod) and "c1" not in tasks.containers

    asyncio.run(scenario())
