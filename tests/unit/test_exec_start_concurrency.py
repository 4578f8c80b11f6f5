"""Execs of one container start side by side, as containerd's shim starts them (exec probes due together
queued ~20 ms each behind one container lock), while what changes the whole container still waits for
every exec being started, and one exec's Start and Delete still take turns."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from google.protobuf import any_pb2

from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.errors import FailedPrecondition, RuntimeFailure
from kuasar.common.fifo_stdio import ProcessIO
from kuasar.common.host_runc_tasks import RuncTasks
from kuasar.common.reaper import Reaper
from kuasar.common.runc_tasks import RuncContainer, RuncProcess
from kuasar.common.task_table import NEVER_RAN_EXIT_STATUS
from kuasar.quark import gvisor_tasks as gt
from kuasar.wasm import tasks as wasm_tasks
from tests.support.events import RecordedEvents
from tests.unit import test_gvisor_tasks, test_wasm_exec_wait
from tests.unit.test_runc_exec_paths import _killed, _sleepers

CTX = SimpleNamespace(namespace="k8s.io", deadline=None)
# Long enough for what is going to happen; on the old code (one container lock) it never does.
TIMEOUT = 2.0


def spec(*args: str) -> any_pb2.Any:
    return any_pb2.Any(value=json.dumps({"args": list(args) or ["true"], "cwd": "/"}).encode())


class GatedRunc:
    """runc whose `exec` stays in flight until the test opens `gate`; `all_in` is set once `together`
    of them are in flight at once. It writes an exec's pid file when the gate opens, as runc does once
    the process runs, or at once for an exec given a pid in `early_pids` (so a cancel has one to end)."""

    def __init__(self, together: int = 2) -> None:
        self.together = together
        self.gate, self.all_in = asyncio.Event(), asyncio.Event()
        self.in_flight: set[str] = set()
        self.steps: list[str] = []
        self.early_pids: dict[str, int] = {}

    async def exec(self, container_id: str, process_json: Path, pid_file: Path, *args: object) -> None:
        name = process_json.name.removesuffix(".process.json")
        self.steps.append(f"exec {name}")
        if name in self.early_pids:
            pid_file.write_text(str(self.early_pids[name]))
        self.in_flight.add(name)
        if len(self.in_flight) >= self.together:
            self.all_in.set()
        try:
            await self.gate.wait()
        finally:
            self.in_flight.discard(name)
        pid_file.write_text(str(os.getpid()))
        self.steps.append(f"exec {name} done")

    async def pause(self, container_id: str) -> None:
        self.steps.append("pause")

    async def delete(self, container_id: str) -> None:
        self.steps.append("runc delete")


def runc_tasks(tmp_path: Path, runc: Any = None, binary: str = "runc") -> RuncTasks:
    tasks = RuncTasks(Reaper(), RecordedEvents(), tmp_path, binary)  # type: ignore[arg-type]
    init = RuncProcess("", ProcessIO(), pid=os.getpid(), status=types.RUNNING)
    tasks.containers["c1"] = RuncContainer("c1", tmp_path, files=tmp_path, namespace="k8s.io", init=init)
    if runc is not None:
        tasks.runc = runc
    return tasks


async def add_execs(tasks: Any, *exec_ids: str) -> None:
    for exec_id in exec_ids:
        await tasks.exec(task.ExecProcessRequest(id="c1", exec_id=exec_id, spec=spec()), CTX)


def start(tasks: Any, exec_id: str) -> asyncio.Future[task.StartResponse]:
    return asyncio.ensure_future(tasks.start(task.StartRequest(id="c1", exec_id=exec_id), CTX))


async def settle() -> None:
    await asyncio.sleep(0.05)


async def all_in(runc: GatedRunc) -> None:
    try:
        await asyncio.wait_for(runc.all_in.wait(), TIMEOUT)
    except TimeoutError:
        raise AssertionError(f"runc execs in flight at once: {sorted(runc.in_flight)}") from None


def gated(tmp_path: Path) -> tuple[RuncTasks, GatedRunc]:
    runc = GatedRunc()
    return runc_tasks(tmp_path, runc), runc


async def two_starting(tasks: RuncTasks, runc: GatedRunc, *others: str) -> list[asyncio.Future[task.StartResponse]]:
    """Execs e1 and e2 (and `others`, left created) added, and both in `runc exec` at once."""
    await add_execs(tasks, "e1", "e2", *others)
    starts = [start(tasks, "e1"), start(tasks, "e2")]
    await all_in(runc)
    return starts


def test_two_execs_start_side_by_side_and_one_exec_started_twice_starts_once(tmp_path: Path) -> None:
    tasks, runc = gated(tmp_path)

    async def scenario() -> None:
        await add_execs(tasks, "e1", "e2")
        starts = [start(tasks, "e1"), start(tasks, "e2"), start(tasks, "e1")]
        await all_in(runc)
        assert runc.in_flight == {"e1", "e2"}
        # Nor does adding another exec wait for them (Exec, then Start, is every probe's sequence).
        await asyncio.wait_for(add_execs(tasks, "e3"), TIMEOUT)
        runc.gate.set()
        first, second, again = await asyncio.gather(*starts, return_exceptions=True)
        assert first.pid == second.pid == os.getpid()
        assert isinstance(again, FailedPrecondition) and "not in created state" in again.message
        assert runc.steps.count("exec e1") == 1
        assert tasks.events.topics.count("/tasks/exec-started") == 2

    asyncio.run(scenario())


def test_pause_waits_for_the_exec_starts_in_flight_and_a_start_after_it_is_refused(tmp_path: Path) -> None:
    # runc refuses an exec into a frozen container, and a freeze under one being started leaves it
    # waiting on a frozen process: Pause still waits until no exec is being started.
    tasks, runc = gated(tmp_path)

    async def scenario() -> None:
        starts = await two_starting(tasks, runc, "e3")
        pausing = asyncio.ensure_future(tasks.pause(task.PauseRequest(id="c1"), CTX))
        await settle()
        late = start(tasks, "e3")  # after the Pause: it goes after it too, not beside the others
        await settle()
        assert not pausing.done() and not late.done() and "pause" not in runc.steps
        runc.gate.set()
        await asyncio.gather(*starts, pausing)
        with pytest.raises(FailedPrecondition, match="not running"):
            await late
        assert runc.steps[-1] == "pause" and "exec e3" not in runc.steps
        assert tasks.containers["c1"].init.status == types.PAUSED

    asyncio.run(scenario())


def test_delete_of_the_container_waits_for_the_exec_starts_its_init_exited_under(tmp_path: Path) -> None:
    tasks, runc = gated(tmp_path)

    async def scenario() -> None:
        starts = await two_starting(tasks, runc)
        tasks.containers["c1"].init.record_exit(137, 1)  # the init exits while its execs start
        deleting = asyncio.ensure_future(tasks.delete(task.DeleteRequest(id="c1"), CTX))
        await settle()
        assert not deleting.done() and "runc delete" not in runc.steps
        runc.gate.set()
        await asyncio.gather(*starts)
        assert (await deleting).exit_status == 137
        assert runc.steps[-1] == "runc delete" and "c1" not in tasks.containers

    asyncio.run(scenario())


def test_delete_of_an_exec_being_started_waits_for_its_start_only(tmp_path: Path) -> None:
    tasks, runc = gated(tmp_path)

    async def scenario() -> None:
        starts = await two_starting(tasks, runc, "done")
        tasks.containers["c1"].execs["done"].record_exit(0, 1)
        deleting = asyncio.ensure_future(tasks.delete(task.DeleteRequest(id="c1", exec_id="e1"), CTX))
        # Another exec's Delete goes through meanwhile.
        await asyncio.wait_for(tasks.delete(task.DeleteRequest(id="c1", exec_id="done"), CTX), TIMEOUT)
        await settle()
        assert not deleting.done()
        runc.gate.set()
        await asyncio.gather(*starts)
        with pytest.raises(FailedPrecondition, match="still running"):
            await deleting
        assert set(tasks.containers["c1"].execs) == {"e1", "e2"}

    asyncio.run(scenario())


def test_a_cancelled_exec_start_ends_its_own_process_and_leaves_the_others(tmp_path: Path) -> None:
    tasks, runc = gated(tmp_path)

    async def scenario(e1_pid: int, e2_pid: int) -> None:
        runc.early_pids = {"e1": e1_pid, "e2": e2_pid}
        first, second = await two_starting(tasks, runc)
        first.cancel()  # containerd's deadline
        with pytest.raises(asyncio.CancelledError):
            await first
        runc.gate.set()
        await second
        e1 = tasks.containers["c1"].execs["e1"]
        assert (e1.status, e1.exit_status) == (types.STOPPED, NEVER_RAN_EXIT_STATUS)
        await tasks.delete(task.DeleteRequest(id="c1", exec_id="e1"), CTX)
        tasks.reaper.forget(os.getpid())

    with _sleepers(2) as (e1_pid, e2_pid):
        asyncio.run(scenario(e1_pid, e2_pid))
        assert _killed(e1_pid)
        assert os.waitpid(e2_pid, os.WNOHANG) == (0, 0)  # the exec still starting beside it lives on


FAKE_RUNC = """#!{python}
import json, os, sys, time
args = sys.argv
log = args[args.index("--log") + 1]
name = json.load(open(args[args.index("--process") + 1]))["args"][0]
marks = {marks!r}
open(os.path.join(marks, name), "w").close()
deadline = time.monotonic() + 2
while len(os.listdir(marks)) < 2 and time.monotonic() < deadline:
    time.sleep(0.005)
together = len(os.listdir(marks)) == 2
if name == "second":
    time.sleep(0.1)  # logs after "first" logged, and exits before it
with open(log, "a") as f:
    f.write(json.dumps({{"level": "error", "msg": f"{{name}}: not found (together: {{together}})"}}) + "\\n")
if name == "first":
    time.sleep(0.3)
sys.exit(1)
"""


def test_execs_failing_side_by_side_each_report_their_own_runc_error(tmp_path: Path) -> None:
    # runc's error is read back from its log: one log for the container's execs gave "first" the
    # error "second" logged last.
    marks = tmp_path / "marks"
    marks.mkdir()
    binary = tmp_path / "runc"
    binary.write_text(FAKE_RUNC.format(python=sys.executable, marks=str(marks)))
    binary.chmod(0o755)
    files = tmp_path / "files"
    files.mkdir()
    tasks = runc_tasks(files, binary=str(binary))

    async def scenario() -> list[Any]:
        tasks.reaper.install()
        for exec_id, program in (("e1", "first"), ("e2", "second")):
            await tasks.exec(task.ExecProcessRequest(id="c1", exec_id=exec_id, spec=spec(program)), CTX)
        return await asyncio.gather(start(tasks, "e1"), start(tasks, "e2"), return_exceptions=True)

    first, second = asyncio.run(scenario())
    assert isinstance(first, RuntimeFailure) and isinstance(second, RuntimeFailure)
    assert "first: not found (together: True)" in first.message
    assert "second: not found (together: True)" in second.message
    assert not list(files.glob("exec-*.log.json"))  # each exec's log goes with its start


def gvisor_container(tmp_path: Path) -> tuple[Any, Any]:
    tasks, _, _ = test_gvisor_tasks.make_tasks(tmp_path)
    container = test_gvisor_tasks.add_container(tasks, tmp_path)
    for exec_id in ("e1", "e2"):
        container.execs[exec_id] = gt.Process(exec_id, ProcessIO(), spec=b"{}")
    return tasks, container


def wasm_container(tmp_path: Path) -> tuple[Any, Any]:
    tasks, container = test_wasm_exec_wait.make_tasks(tmp_path)
    container.execs["e2"] = wasm_tasks.Process("e2", io=ProcessIO(), spec={})
    return tasks, container


@pytest.mark.parametrize("backend", [gvisor_container, wasm_container])
def test_the_gvisor_and_wasm_backends_start_execs_side_by_side_too(tmp_path: Path, backend: Any) -> None:
    tasks, _ = backend(tmp_path)
    gate = GatedRunc()

    async def run_exec(container: Any, proc: Any) -> None:
        await gate.exec(container.id, tmp_path / f"{proc.id}.process.json", tmp_path / f"{proc.id}.pid")
        proc.pid = 4242

    tasks._run_exec = run_exec

    async def scenario() -> None:
        starts = [start(tasks, "e1"), start(tasks, "e2")]
        await all_in(gate)
        gate.gate.set()
        assert [response.pid for response in await asyncio.gather(*starts)] == [4242, 4242]

    asyncio.run(scenario())


class GatedQVisor:
    """QVisor's socket, as the Quark relay calls it: each Exec stays in flight until the gate opens."""

    def __init__(self) -> None:
        self.runc = GatedRunc()  # (its exec: the in-flight count and the gate)
        self.calls: list[str] = []

    async def call(self, service: str, method: str, req: Any, *args: object, **kwargs: object) -> bytes:
        self.calls.append(f"{method} {getattr(req, 'exec_id', '')}".strip())
        if method == "Exec":
            await self.runc.exec(req.id, Path(f"{req.exec_id}.process.json"), Path(os.devnull))
        return b""


def test_the_quark_relay_forwards_execs_of_one_container_side_by_side(tmp_path: Path) -> None:
    # Its Exec holds the container's lock over QVisor's answer: Execs of one container waited for each
    # other's round trip. Its Delete still waits for them, and an exec id given twice is refused.
    from kuasar.common.errors import AlreadyExists
    from kuasar.quark.task_relay import QuarkTaskRelay

    qvisor = GatedQVisor()
    relay = QuarkTaskRelay(qvisor, tmp_path)  # type: ignore[arg-type]
    relay.containers.state["c1"] = {"mounts": [], "io": {}, "execs": {}}

    def exec_(exec_id: str) -> asyncio.Future[bytes]:
        return asyncio.ensure_future(relay.exec(task.ExecProcessRequest(id="c1", exec_id=exec_id), CTX))

    async def scenario() -> None:
        execs = [exec_("e1"), exec_("e2")]
        await all_in(qvisor.runc)
        with pytest.raises(AlreadyExists):
            await exec_("e1")
        deleting = asyncio.ensure_future(relay.delete(task.DeleteRequest(id="c1"), CTX))
        await settle()
        assert not deleting.done() and "Delete" not in qvisor.calls
        qvisor.runc.gate.set()
        await asyncio.gather(*execs, deleting)
        assert qvisor.calls == ["Exec e1", "Exec e2", "Delete"] and "c1" not in relay.containers.state

    asyncio.run(scenario())


def runc_container_with_an_exec(tmp_path: Path) -> tuple[Any, Any]:
    tasks = runc_tasks(tmp_path)
    asyncio.run(add_execs(tasks, "e1"))
    return tasks, tasks.containers["c1"]


@pytest.mark.parametrize("backend", [runc_container_with_an_exec, gvisor_container, wasm_container])
def test_the_wait_on_an_exec_whose_start_was_refused_returns_when_it_is_deleted(tmp_path: Path, backend: Any) -> None:
    # The init exited between the exec's Exec and its Start: the Start is refused, no exit ever comes for
    # the exec, and containerd deletes it; its Wait (containerd's, made before Start) waited for ever.
    tasks, container = backend(tmp_path)

    async def scenario() -> None:
        container.init.status = types.STOPPED
        waiting = asyncio.ensure_future(tasks.wait(task.WaitRequest(id="c1", exec_id="e1"), CTX))
        with pytest.raises(FailedPrecondition):
            await tasks.start(task.StartRequest(id="c1", exec_id="e1"), CTX)
        await tasks.delete(task.DeleteRequest(id="c1", exec_id="e1"), CTX)
        assert (await asyncio.wait_for(waiting, 2)).exit_status == NEVER_RAN_EXIT_STATUS

    asyncio.run(scenario())
