"""The runc task server's exec, kill, delete and stats paths where they differed from containerd's shim."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import struct
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from google.protobuf import any_pb2

from kuasar.common import cgroups
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.errors import FailedPrecondition, InvalidArgument, NotFound, RuntimeFailure
from kuasar.common.fifo_stdio import ProcessIO
from kuasar.common.host_runc_tasks import RuncTasks
from kuasar.common.reaper import Exit, Reaper
from kuasar.common.runc_cli import Runc
from kuasar.common.runc_tasks import RuncContainer, RuncProcess, _container_procs_file, named_after
from kuasar.common.task_table import NEVER_RAN_EXIT_STATUS
from tests.support.events import RecordedEvents

CTX = SimpleNamespace(namespace="k8s.io")
SPEC = any_pb2.Any(value=json.dumps({"args": ["true"], "cwd": "/"}).encode())



class FakeRunc:
    """runc whose `exec` fails (a missing binary) or writes its pid file, and whose `delete` says when
    it ran."""

    def __init__(self, exec_fails: bool, steps: list[str]) -> None:
        self.exec_fails, self.steps = exec_fails, steps

    async def exec(self, container_id: str, process_json: Path, pid_file: Path, *args: object) -> None:
        if self.exec_fails:
            raise RuntimeFailure("runc exec failed (1): exec: \"nope\": executable file not found")
        pid_file.write_text(str(os.getpid()))

    async def delete(self, container_id: str) -> None:
        self.steps.append("runc delete")


def _tasks(tmp_path: Path, exec_fails: bool = False) -> tuple[RuncTasks, RecordedEvents, list[str]]:
    events, steps = RecordedEvents(), []
    tasks = RuncTasks(Reaper(), events, tmp_path)  # type: ignore[arg-type]
    io = ProcessIO()  # no stdio
    init = RuncProcess("", io, pid=os.getpid(), status=types.RUNNING)
    tasks.containers["c1"] = RuncContainer("c1", tmp_path, files=tmp_path, namespace="k8s.io", init=init)
    tasks.runc = FakeRunc(exec_fails, steps)  # type: ignore[assignment]
    return tasks, events, steps


def test_wait_on_an_exec_whose_start_failed_returns_and_kill_of_it_is_refused(tmp_path: Path) -> None:
    # A failed `runc exec` left the exec CREATED with no exit: Wait (called before Start) never returned
    # and containerd's clean-up (Kill, Wait, Delete) held a CRI exec for its whole minute.
    tasks, _, _ = _tasks(tmp_path, exec_fails=True)

    async def scenario() -> None:
        await tasks.exec(task.ExecProcessRequest(id="c1", exec_id="e1", spec=SPEC), CTX)  # type: ignore[arg-type]
        waiting = asyncio.ensure_future(tasks.wait(task.WaitRequest(id="c1", exec_id="e1"), CTX))  # type: ignore
        with pytest.raises(FailedPrecondition, match="not running"):  # not started: nothing to signal
            await tasks.kill(task.KillRequest(id="c1", exec_id="e1", signal=9), CTX)  # type: ignore[arg-type]
        with pytest.raises(RuntimeFailure):
            await tasks.start(task.StartRequest(id="c1", exec_id="e1"), CTX)  # type: ignore[arg-type]
        assert (await asyncio.wait_for(waiting, 2)).exit_status == NEVER_RAN_EXIT_STATUS

    asyncio.run(scenario())


def test_a_deleted_exec_leaves_no_pid_file_and_no_task_delete_event(tmp_path: Path) -> None:
    # Every exec left its pid file in the bundle until the container went, and its Delete published
    # /tasks/delete, which containerd's shim sends for a task (the init) only.
    tasks, events, _ = _tasks(tmp_path)

    async def scenario() -> None:
        await tasks.exec(task.ExecProcessRequest(id="c1", exec_id="init", spec=SPEC), CTX)  # type: ignore
        await tasks.start(task.StartRequest(id="c1", exec_id="init"), CTX)  # type: ignore[arg-type]
        assert (tmp_path / "exec-init.pid").exists() and not (tmp_path / "init.pid").exists()
        tasks.containers["c1"].execs["init"].record_exit(0, 1)
        await tasks.delete(task.DeleteRequest(id="c1", exec_id="init"), CTX)  # type: ignore[arg-type]

    asyncio.run(scenario())
    assert not list(tmp_path.glob("*.pid"))
    assert "/tasks/delete" not in events.topics and "/tasks/exec-started" in events.topics


def test_the_oom_watch_is_closed_before_runc_removes_the_cgroup(tmp_path: Path) -> None:
    # cgroup v1 signals the OOM eventfd when the cgroup is removed: closed after `runc delete`, the
    # watch read that as an OOM kill and CRI reported a container that exited normally "OOMKilled".
    tasks, _, steps = _tasks(tmp_path)
    container = tasks.containers["c1"]
    container.oom = SimpleNamespace(close=lambda: steps.append("oom watch closed"))
    container.init.record_exit(0, 1)
    asyncio.run(tasks.delete(task.DeleteRequest(id="c1"), CTX))  # type: ignore[arg-type]
    assert steps == ["oom watch closed", "runc delete"]


def test_a_zombie_init_has_no_cgroup_to_kill_all_in_or_to_read_stats_from(tmp_path: Path) -> None:
    # cgroup v1 shows an exited init not reaped yet in the root cgroup: Kill(all) signalled every process
    # listed there (the whole host: PID 1, the task server) and Stats reported the host's usage.
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        for _ in range(200):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            asyncio.run(asyncio.sleep(0.01))
        if cgroups.is_unified():
            # v2 shows it in the cgroup it lived in, the container's, which is right to end or read; here
            # that is this test's own, which Kill(all) must not be tried on.
            assert cgroups.cgroup_procs_file(pid) == cgroups.cgroup_procs_file(os.getpid())
            return
        assert cgroups.cgroup_procs_of(pid) is None
        with pytest.raises(FailedPrecondition, match="exited"):
            cgroups.metrics_for_pid(pid)
        tasks, _, _ = _tasks(tmp_path)
        tasks.containers["c1"].init.pid = pid
        assert tasks._signal_directly(tasks.containers["c1"], 9, all_processes=True) is False  # runc's turn
    finally:
        os.waitpid(pid, 0)


def test_resizing_a_process_without_a_terminal_is_accepted_and_ignored() -> None:
    # containerd's shims answer it with success; an error reached nerdctl/ctr on a window change.
    io = ProcessIO(terminal=False)
    io.resize(100, 40)
    assert io.size is None and io.master == -1


def test_a_window_size_over_16_bits_is_cut_as_containerds_shim_cuts_it() -> None:
    # struct.error reached the client as UNKNOWN; containerd's shim keeps the low 16 bits.
    master, replica = os.openpty()
    try:
        io = ProcessIO(terminal=True)
        io.master = master
        io.resize(70000, 80)
        rows, cols = struct.unpack("HHHH", fcntl.ioctl(replica, termios.TIOCGWINSZ, b"\0" * 8))[:2]
        assert (cols, rows) == (70000 - 65536, 80)
    finally:
        os.close(master)
        os.close(replica)


def test_the_sweep_removes_console_sockets_a_dead_task_server_left(tmp_path: Path) -> None:
    # A console socket lives while runc starts a terminal process; a task server killed then left it.
    tasks, _, _ = _tasks(tmp_path)
    tasks.runc.root = tmp_path / "no-runc-root"  # type: ignore[attr-defined]
    stale = tasks.console_dir / "0123456789abcdef.sock"
    stale.write_bytes(b"")
    asyncio.run(tasks.sweep_leftovers())
    assert list(tasks.console_dir.iterdir()) == []


def _sleeper() -> int:
    pid = os.fork()
    if pid == 0:
        os.execvp("sleep", ["sleep", "60"])
    return pid


@contextlib.contextmanager
def _sleepers(count: int) -> Iterator[list[int]]:
    """`count` children sleeping, gone again when the block ends whatever happened in it."""
    pids = [_sleeper() for _ in range(count)]
    try:
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


async def _exit_held(container: RuncContainer) -> None:
    """Until the reaper has seen the init exit and its exit is held for its execs'."""
    for _ in range(500):
        if container.init.reaped:
            break
        await asyncio.sleep(0.01)
    assert container.init.reaped and container.init.status == types.RUNNING


def _running_exec(container: RuncContainer, pid: int) -> None:
    io = ProcessIO()  # no stdio
    container.execs["e1"] = RuncProcess("e1", io, pid=pid, status=types.RUNNING)


def _killed(pid: int, timeout: float = 5.0) -> bool:
    """Whether child `pid` ends by SIGKILL within `timeout` seconds (a failing test must not hang)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
        time.sleep(0.01)
    return False


def test_kill_all_of_a_container_whose_init_is_gone_ends_what_it_left_in_a_shared_pid_namespace(
        tmp_path: Path) -> None:
    # containerd's Delete sends Kill(all) after the init's exit; the shim's `runc kill --all` ends what is
    # left in the container's cgroup. A container without a cgroup of its own known has nothing to end.
    tasks, _, _ = _tasks(tmp_path)
    container = tasks.containers["c1"]
    container.init.record_exit(0, 1)
    kill_all = task.KillRequest(id="c1", signal=9, all=True)
    with pytest.raises(NotFound, match="already finished"):
        asyncio.run(tasks.kill(kill_all, CTX))  # type: ignore[arg-type]
    with _sleepers(1) as [left]:
        container.procs_file = tmp_path / "cgroup.procs"
        container.procs_file.write_text(f"{left}\n")
        with pytest.raises(NotFound, match="already finished"):  # one process, not all: nothing to end
            asyncio.run(tasks.kill(task.KillRequest(id="c1", signal=9), CTX))  # type: ignore[arg-type]
        assert os.waitpid(left, os.WNOHANG) == (0, 0)
        asyncio.run(tasks.kill(kill_all, CTX))  # type: ignore[arg-type]
        assert _killed(left)


@pytest.mark.parametrize(("name", "container_id", "own"), [
    ("3f2a9c", "3f2a9c", True),  # <parent>/<id>
    ("cri-containerd-3f2a9c.scope", "3f2a9c", True),  # slice:cri-containerd:<id>
    ("3f2a9c.scope", "3f2a9c", True),  # slice::<id>
    ("kuasar-unit-a843bfc2-c1", "c2", False),  # holds the id, and is another's
    ("web-frontend", "web", False),
    ("pod-web", "web", False),  # a parent named after its pod: shared by its containers
    ("cri-containerd-3f2a9c.scope", "9c", False),
    ("3f2a9c.slice", "3f2a9c", False),
])
def test_a_containers_own_cgroup_is_named_exactly_after_it(name: str, container_id: str, own: bool) -> None:
    assert named_after(name, container_id) is own


def test_only_a_cgroup_named_after_the_container_is_one_to_end_the_rest_of(tmp_path: Path) -> None:
    # A cgroup shared with others (the root's, a parent's) is not: ending "the rest" there would end
    # other processes.
    hierarchy = cgroups.CGROUP_ROOT if cgroups.is_unified() else cgroups.CGROUP_ROOT / "pids"
    if not hierarchy.is_dir():
        pytest.skip("no pids hierarchy to make a cgroup in")
    directory = hierarchy / f"kuasar-unit-{os.urandom(4).hex()}-c1.scope"  # as a systemd scope is named
    directory.mkdir()
    try:
        with _sleepers(1) as [child]:
            (directory / "cgroup.procs").write_text(str(child))
            assert _container_procs_file("c1", child) == directory / "cgroup.procs"
            assert cgroups.read_procs(directory / "cgroup.procs") == [child]
            assert _container_procs_file("c2", child) is None
            os.kill(child, 9)
            os.waitpid(child, 0)
            assert _container_procs_file("c1", child) is None  # gone
            assert cgroups.read_procs(directory / "cgroup.procs") == []
    finally:
        directory.rmdir()
    assert cgroups.read_procs(directory / "cgroup.procs") is None


def test_the_rest_of_a_container_is_ended_in_the_cgroups_it_made_below_its_own_too(tmp_path: Path) -> None:
    # systemd or docker-in-docker in a container move its processes into cgroups of their own below the
    # container's; runc's `kill --all` finds them there, and so must we.
    hierarchy = cgroups.CGROUP_ROOT if cgroups.is_unified() else cgroups.CGROUP_ROOT / "pids"
    if not hierarchy.is_dir():
        pytest.skip("no pids hierarchy to make a cgroup in")
    top = hierarchy / f"kuasar-unit-{os.urandom(4).hex()}-c1"
    below = top / "init"
    below.mkdir(parents=True)
    try:
        with _sleepers(2) as children:
            (top / "cgroup.procs").write_text(str(children[0]))
            (below / "cgroup.procs").write_text(str(children[1]))
            assert sorted(cgroups.procs_below(top / "cgroup.procs") or []) == sorted(children)
            assert sorted(cgroups.cgroup_procs_of(children[0]) or []) == sorted(children)
            assert cgroups.cgroup_procs_of(children[1]) == [children[1]]  # from the one below: only its own
            cgroups.kill_members(top / "cgroup.procs")
            assert [_killed(child) for child in children] == [True, True]
    finally:
        below.rmdir()
        top.rmdir()


@pytest.mark.parametrize(("said", "code"), [
    ("container not running", NotFound), ("kill: No such process", NotFound),
    ("os: process already finished", NotFound), ("container c1 does not exist", NotFound),
    ("permission denied", RuntimeFailure)])
def test_a_kill_whose_process_ended_meanwhile_is_not_found_as_containerds_shim_reads_runc(
        tmp_path: Path, said: str, code: type) -> None:
    # CRI's StopContainer takes NotFound for "stopped"; any other error is a failed stop kubelet retries.
    fake = tmp_path / "runc"
    fake.write_text(f"#!/bin/sh\necho '{said}' >&2\nexit 1\n")
    fake.chmod(0o755)

    async def main() -> None:
        reaper = Reaper()
        reaper.install()
        with pytest.raises(code, match=said):
            await Runc(reaper, tmp_path / "root", str(fake)).kill("c1", 9, all_processes=True)

    asyncio.run(main())


def test_an_inits_exit_is_recorded_after_its_running_execs_exits(tmp_path: Path) -> None:
    # As containerd's shim (handleInitExit): the init's TaskExit comes last and its Wait returns once the
    # execs' exits are in. Meanwhile its pid, reaped, may be another process's: a Kill must not reach it.
    tasks, events, _ = _tasks(tmp_path)
    container = tasks.containers["c1"]
    seen: list[tuple[str, int]] = []
    tasks.events.publish = lambda topic, event, namespace="": seen.append((event.id, event.exit_status))

    async def scenario(init_pid: int, exec_pid: int) -> None:
        tasks.reaper.install()
        since = time.monotonic_ns() - 10**9
        tasks._watch(container, container.init, since)
        tasks._watch(container, container.execs["e1"], since)
        os.kill(init_pid, 15)
        await _exit_held(container)
        assert seen == []
        with pytest.raises(NotFound, match="already finished"):
            await tasks.kill(task.KillRequest(id="c1", signal=9), CTX)  # type: ignore[arg-type]
        with pytest.raises(NotFound, match="exited"):
            await tasks.stats(task.StatsRequest(id="c1"), CTX)  # type: ignore[arg-type]
        os.kill(exec_pid, 9)
        await asyncio.wait_for(container.init.exited.wait(), 5)
        assert seen == [("e1", 137), ("c1", 143)]

    with _sleepers(2) as (init_pid, exec_pid):
        container.init.pid = init_pid
        _running_exec(container, exec_pid)
        asyncio.run(scenario(init_pid, exec_pid))


def test_kill_all_of_an_ended_init_sends_the_signal_asked_for(tmp_path: Path) -> None:
    # As `runc kill --all <sig>`: a SIGTERM to the rest is a SIGTERM, not a SIGKILL.
    tasks, _, _ = _tasks(tmp_path)
    container = tasks.containers["c1"]
    container.init.record_exit(0, 1)
    with _sleepers(1) as [left]:
        container.procs_file = tmp_path / "cgroup.procs"
        container.procs_file.write_text(f"{left}\n")
        asyncio.run(tasks.kill(task.KillRequest(id="c1", signal=15, all=True), CTX))  # type: ignore[arg-type]
        _, status = os.waitpid(left, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 15


def test_an_inits_exit_is_not_held_for_execs_nothing_can_end(tmp_path: Path) -> None:
    # In a shared PID namespace whose cgroup is not the container's own, the execs outlive the init: the
    # exit waited the whole EXECS_EXIT_WAIT for them every time.
    tasks, _, _ = _tasks(tmp_path)
    container = tasks.containers["c1"]
    container.shares_pids = True  # and no procs_file

    async def scenario(init_pid: int) -> None:
        tasks.reaper.install()
        tasks._watch(container, container.init, time.monotonic_ns() - 10**9)
        os.kill(init_pid, 9)
        await asyncio.wait_for(container.init.exited.wait(), 5)
        assert not container.init.reaped and container.execs["e1"].status == types.RUNNING

    with _sleepers(2) as (init_pid, exec_pid):
        container.init.pid = init_pid
        _running_exec(container, exec_pid)
        asyncio.run(scenario(init_pid))


class GatedRunc:
    """runc whose `exec` waits for the test's word, then fails or writes the pid of a process it has."""

    def __init__(self, exec_pid: int) -> None:
        self.exec_pid = exec_pid
        self.entered, self.go = asyncio.Event(), asyncio.Event()
        self.fail = False

    async def exec(self, container_id: str, process_json: Path, pid_file: Path, *args: object) -> None:
        self.entered.set()
        await self.go.wait()
        if self.fail:
            raise RuntimeFailure("runc exec failed (1): container's init is gone")
        pid_file.write_text(str(self.exec_pid))


@pytest.mark.parametrize("exec_starts", [False, True])
def test_an_inits_exit_waits_for_an_exec_still_being_started(tmp_path: Path, exec_starts: bool) -> None:
    # containerd's shim counts an exec as running from its Start on: the init's exit came first when the
    # init exited while `runc exec` ran. One that starts then is ended (nothing else would end it), and
    # a later exec Start is refused, as the shim's "init process is not running".
    tasks, _, _ = _tasks(tmp_path)
    container = tasks.containers["c1"]
    seen: list[tuple[str, int]] = []
    tasks.events.publish = lambda topic, event, namespace="": (  # type: ignore[method-assign]
        seen.append((event.id, event.exit_status)) if hasattr(event, "exit_status") and event.id else None)

    async def scenario(init_pid: int, exec_pid: int) -> None:
        tasks.reaper.install()
        runc = tasks.runc = GatedRunc(exec_pid)  # type: ignore[assignment]
        runc.fail = not exec_starts
        tasks._watch(container, container.init, time.monotonic_ns() - 10**9)
        for exec_id in ("e1", "e2"):
            await tasks.exec(task.ExecProcessRequest(id="c1", exec_id=exec_id, spec=SPEC), CTX)  # type: ignore
        starting = asyncio.ensure_future(tasks.start(task.StartRequest(id="c1", exec_id="e1"), CTX))  # type: ignore
        await asyncio.wait_for(runc.entered.wait(), 5)
        os.kill(init_pid, 9)
        await _exit_held(container)
        assert seen == []
        with pytest.raises(FailedPrecondition, match="not running"):
            await tasks.start(task.StartRequest(id="c1", exec_id="e2"), CTX)  # type: ignore[arg-type]
        runc.go.set()
        if exec_starts:
            assert (await asyncio.wait_for(starting, 5)).pid == exec_pid
        else:
            with pytest.raises(RuntimeFailure):
                await asyncio.wait_for(starting, 5)
        await asyncio.wait_for(container.init.exited.wait(), 5)
        # A start that failed has no exit to report; one that started was ended before the init's exit.
        assert seen == ([("e1", 137), ("c1", 137)] if exec_starts else [("c1", 137)])

    with _sleepers(2) as (init_pid, exec_pid):
        container.init.pid = init_pid
        asyncio.run(scenario(init_pid, exec_pid))


class ExitingRunc(FakeRunc):
    """runc whose `start` (the command, as with poststart hooks) returns only after the init exited."""

    def __init__(self, tasks: RuncTasks) -> None:
        super().__init__(False, [])
        self.tasks = tasks

    async def start(self, container_id: str, bundle: Path, log_path: Path, init_exited: asyncio.Event) -> None:
        container = self.tasks.containers[container_id]
        self.tasks._record_exit(container, container.init, Exit(container.init.pid, 0, time.time_ns()))
        await asyncio.sleep(0)


def test_an_exit_during_start_is_published_after_the_start_event(tmp_path: Path) -> None:
    # A `runc start` (poststart hooks) during which a short init exited published /tasks/exit before
    # /tasks/start (4 of 30 such containers under real runc); containerd's shim holds the exit back.
    tasks, events, _ = _tasks(tmp_path)
    container = tasks.containers["c1"]
    container.init.status = types.CREATED
    tasks.runc = ExitingRunc(tasks)  # type: ignore[assignment]
    container.execs["e1"] = RuncProcess("e1", ProcessIO(), spec=b"{}")

    async def exec_that_exits_at_once(container: RuncContainer, proc: RuncProcess) -> None:
        proc.pid = os.getpid()
        tasks._record_exit(container, proc, Exit(proc.pid, 3, time.time_ns()))
        await asyncio.sleep(0)

    tasks._run_exec = exec_that_exits_at_once  # type: ignore[method-assign]

    async def scenario() -> None:
        await tasks.start(task.StartRequest(id="c1"), CTX)  # type: ignore[arg-type]
        container.init.status, container.init.exited = types.RUNNING, asyncio.Event()  # run the exec's case
        await tasks.start(task.StartRequest(id="c1", exec_id="e1"), CTX)  # type: ignore[arg-type]

    asyncio.run(scenario())
    assert events.topics == ["/tasks/start", "/tasks/exit", "/tasks/exec-started", "/tasks/exit"]
    assert container.execs["e1"].exit_status == 3  # its own exit, published once


def test_wait_on_an_exec_never_started_returns_when_its_container_is_deleted(tmp_path: Path) -> None:
    # Its Start refused (the init had exited), the container deleted: the exec's Wait waited for ever.
    tasks, _, steps = _tasks(tmp_path)
    container = tasks.containers["c1"]

    async def scenario() -> None:
        await tasks.exec(task.ExecProcessRequest(id="c1", exec_id="e1", spec=SPEC), CTX)  # type: ignore[arg-type]
        waiting = asyncio.ensure_future(tasks.wait(task.WaitRequest(id="c1", exec_id="e1"), CTX))  # type: ignore
        container.init.record_exit(0, time.time_ns())
        with pytest.raises(FailedPrecondition, match="not running"):
            await tasks.start(task.StartRequest(id="c1", exec_id="e1"), CTX)  # type: ignore[arg-type]
        await tasks.delete(task.DeleteRequest(id="c1"), CTX)  # type: ignore[arg-type]
        assert (await asyncio.wait_for(waiting, 2)).exit_status == NEVER_RAN_EXIT_STATUS

    asyncio.run(scenario())
    assert steps == ["runc delete"] and "c1" not in tasks.containers


def test_a_running_exec_of_a_paused_container_is_paused(tmp_path: Path) -> None:
    # runc freezes the whole cgroup; State of an exec said RUNNING (containerd's shim: PAUSED).
    tasks, _, _ = _tasks(tmp_path)
    container = tasks.containers["c1"]
    container.execs["e1"] = RuncProcess("e1", ProcessIO(), pid=os.getpid(), status=types.RUNNING)
    container.execs["e2"] = RuncProcess("e2", ProcessIO(), pid=1, status=types.STOPPED)

    def states() -> list[int]:
        return [asyncio.run(tasks.state(task.StateRequest(id="c1", exec_id=e), CTX)).status  # type: ignore
                for e in ("", "e1", "e2")]

    assert states() == [types.RUNNING, types.RUNNING, types.STOPPED]
    container.init.status = types.PAUSED
    assert states() == [types.PAUSED, types.PAUSED, types.STOPPED]


def test_stdio_refused_after_stdin_was_opened_leaves_no_fd(tmp_path: Path) -> None:
    # The stdin FIFO's read end and our held write end stayed open when stdout was refused (not a FIFO
    # path, e.g. containerd's binary:// logging), for the task server's life.
    stdin = tmp_path / "in"
    os.mkfifo(stdin)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        io = ProcessIO(str(stdin), "binary:///bin/logger", "")
        with pytest.raises(InvalidArgument, match="only FIFO paths"):
            io.runc_stdio()
    assert len(os.listdir("/proc/self/fd")) == fds
