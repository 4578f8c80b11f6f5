"""The cgroup attach-lock warmer: what it writes, when it stops, and that runc starts run inside it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kuasar.common import cgroup_attach, cgroups
from kuasar.common.cgroup_attach import AttachLockWarmer, own_procs_file
from kuasar.common.events import EventPublisher
from kuasar.common.fifo_stdio import ProcessIO
from kuasar.common.host_runc_tasks import Container, RuncProcess, RuncTasks
from kuasar.common.reaper import Reaper
from tests.support.procs import thread_names

WAIT_S = 5.0  # bounds a thread that should have ended long before


def _wait_until(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def _only_our_pid_written(path: Path) -> bool:
    # A burst keeps its file open: a plain file standing in for cgroup.procs collects every write.
    written = path.read_text()
    return bool(written) and not written.replace(str(os.getpid()), "")


def test_own_procs_file_is_the_cgroup_this_process_is_in() -> None:
    target = own_procs_file()
    if target is None:
        pytest.skip("no writable cgroup hierarchy here")
    assert str(os.getpid()) in target.read_text().split()


@pytest.mark.parametrize("unified", [False, True])
def test_own_procs_file_follows_proc_self_cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 unified: bool) -> None:
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(cgroups, "is_unified", lambda: unified)
    paths = {"": "/system.slice/x.service"} if unified else {"cpu": "/a", "pids": "/k8s/b", "name=systemd": "/c"}
    monkeypatch.setattr(cgroups, "proc_cgroups", lambda pid: paths)
    expected = tmp_path / ("system.slice/x.service" if unified else "pids/k8s/b") / "cgroup.procs"
    assert own_procs_file() is None  # nothing there yet
    expected.parent.mkdir(parents=True)
    expected.write_text("")
    assert own_procs_file() == expected
    paths.clear()
    paths.update({"": "/../escape"} if unified else {"pids": "/../escape"})
    (tmp_path / ("escape" if unified else "pids/../escape")).mkdir(parents=True, exist_ok=True)
    assert own_procs_file() is None


@contextlib.contextmanager
def _target(monkeypatch: pytest.MonkeyPatch, path: Path) -> Iterator[Path]:
    monkeypatch.setattr(cgroup_attach, "own_procs_file", lambda: path)
    yield path


def test_writes_our_pid_while_held_and_for_the_linger_then_stops(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    warmer = AttachLockWarmer(linger=0.2)
    with _target(monkeypatch, tmp_path / "cgroup.procs") as target:
        target.write_text("")
        with warmer.held():
            _wait_until(lambda: warmer.writes >= 3, "no rewrites while held")
            with warmer.held():  # nested and concurrent users share the one thread
                pass
            assert _only_our_pid_written(target)
        after_exit = warmer.writes
        _wait_until(lambda: warmer.writes > after_exit, "the burst did not linger")
        _wait_until(lambda: not warmer.bursting, "the thread did not end after the linger")
        done = warmer.writes
        time.sleep(3 * cgroup_attach.REWRITE_INTERVAL_S)
        assert warmer.writes == done and not warmer.disabled
        with warmer.held():  # a later burst wakes the same thread
            _wait_until(lambda: warmer.writes > done, "no second burst")


def test_bursts_share_one_thread_and_look_our_cgroup_up_only_after_a_move(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "a.procs", tmp_path / "b.procs"
    first.write_text("")
    second.write_text("")
    placed = {"text": b"4:pids:/a\n", "path": first}
    lookups: list[Path] = []

    def lookup() -> Path:
        lookups.append(placed["path"])
        return placed["path"]

    monkeypatch.setattr(cgroup_attach, "own_procs_file", lookup)
    monkeypatch.setattr(cgroup_attach, "_read_proc_self_cgroup", lambda: placed["text"])
    warmer = AttachLockWarmer(linger=0.0)

    def burst() -> None:
        before = warmer.writes
        with warmer.held():
            _wait_until(lambda: warmer.writes > before, "no rewrite in this burst")
        _wait_until(lambda: not warmer.bursting, "the burst did not end")

    burst()
    thread = warmer.thread_id
    burst()
    assert thread is not None and warmer.thread_id == thread
    assert cgroup_attach.THREAD_NAME in thread_names(os.getpid(), but_main=True)  # named for `ps -T`
    assert lookups == [first]  # the second burst reused the open file
    placed.update(text=b"4:pids:/b\n", path=second)  # moved to another cgroup meanwhile
    written_to_first = first.read_text()
    burst()
    assert lookups == [first, second] and warmer.thread_id == thread
    assert first.read_text() == written_to_first and _only_our_pid_written(second)


def _write_pid(files: list[Path], pid: int) -> None:
    for path in files:
        with open(path, "r+") as procs:  # as cgroup.procs: the file must be there
            procs.write(str(pid))


def test_submitted_work_runs_on_the_thread_before_its_own_writes(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "own.procs"
    own.write_text("")
    pod_files = [tmp_path / "memory.procs", tmp_path / "pids.procs"]
    for path in pod_files:
        path.write_text("")
    seen: list[tuple[str, int]] = []

    def place() -> None:
        seen.append((own.read_text(), threading.get_ident()))
        _write_pid(pod_files, 4242)

    with _target(monkeypatch, own):
        warmer = AttachLockWarmer(linger=0.0)
        placed = warmer.submit(place)
        assert placed.result(WAIT_S) is None
        assert [path.read_text() for path in pod_files] == ["4242", "4242"]
        # The burst's first writes (they pay the grace period), made by the warmer's thread.
        assert seen == [("", warmer.thread_id)]
        _wait_until(lambda: not warmer.bursting, "a burst for submitted work alone did not end")
        assert warmer.thread_id is not None


def test_failed_submitted_work_is_reported_and_the_burst_still_ends(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with _target(monkeypatch, tmp_path / "own.procs") as own:
        own.write_text("")
        warmer = AttachLockWarmer(linger=0.0)
        placed = warmer.submit(lambda: _write_pid([tmp_path / "gone" / "cgroup.procs"], 4242))
        with pytest.raises(FileNotFoundError):
            placed.result(WAIT_S)
        _wait_until(lambda: not warmer.bursting, "the burst did not end")
        assert not warmer.disabled  # the warmer's own writes are fine


def test_work_that_raises_something_else_is_reported_and_the_next_still_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only OSError was caught: anything else ended the thread with its burst still marked as running,
    # and every later placement (so every pod) waited for ever.
    with _target(monkeypatch, tmp_path / "own.procs") as own:
        own.write_text("")
        warmer = AttachLockWarmer(linger=0.0)

        def broken() -> None:
            raise ValueError("not a pid")

        with pytest.raises(ValueError):
            warmer.submit(broken).result(WAIT_S)
        target = tmp_path / "cgroup.procs"
        target.write_text("")
        assert warmer.submit(lambda: _write_pid([target], 77)).result(WAIT_S) is None
        assert target.read_text() == "77"


def test_work_submitted_to_a_disabled_warmer_is_done_at_once(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroup_attach, "own_procs_file", lambda: None)
    warmer = AttachLockWarmer(linger=0.0)
    with warmer.held():
        _wait_until(lambda: warmer.disabled and not warmer.bursting, "not disabled without a cgroup")
    target = tmp_path / "cgroup.procs"
    target.write_text("")
    placed = warmer.submit(lambda: _write_pid([target], 77))
    assert placed.done() and placed.result() is None and target.read_text() == "77"


def test_a_failed_write_disables_it_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    warmer = AttachLockWarmer(linger=0.0)
    with _target(monkeypatch, tmp_path / "missing" / "cgroup.procs"):
        with warmer.held():
            _wait_until(lambda: warmer.disabled, "a failing write did not disable it")
        _wait_until(lambda: not warmer.bursting, "the thread did not end")
        with warmer.held():
            assert not warmer.bursting and warmer.writes == 0


def test_no_cgroup_to_write_means_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroup_attach, "own_procs_file", lambda: None)
    warmer = AttachLockWarmer()
    with warmer.held():
        _wait_until(lambda: warmer.disabled and not warmer.bursting, "not disabled without a cgroup")


def test_the_real_rewrites_leave_this_process_in_its_cgroups() -> None:
    if own_procs_file() is None:
        pytest.skip("no writable cgroup hierarchy here")
    before = Path("/proc/self/cgroup").read_text()
    warmer = AttachLockWarmer(linger=0.0)
    with warmer.held():
        _wait_until(lambda: warmer.writes >= 2 or warmer.disabled, "no rewrites")
    assert not warmer.disabled
    assert Path("/proc/self/cgroup").read_text() == before


class RecordingWarmer:
    def __init__(self) -> None:
        self.active = 0

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class RecordingRunc:
    """Stands in for `Runc`: notes whether the warmer was held while runc would have run."""

    def __init__(self, warmer: RecordingWarmer) -> None:
        self.warmer = warmer
        self.calls: list[tuple[str, int]] = []

    async def create(self, container_id: str, bundle: Path, pid_file: Path, *args: object) -> None:
        self.calls.append(("create", self.warmer.active))
        pid_file.write_text(str(os.getpid()))

    async def exec(self, container_id: str, process_json: Path, pid_file: Path, *args: object) -> None:
        self.calls.append(("exec", self.warmer.active))
        pid_file.write_text(str(os.getpid()))


def test_runc_sandboxer_runs_runc_create_and_exec_inside_the_warmer(tmp_path: Path) -> None:
    async def main() -> None:
        tasks = RuncTasks(Reaper(), EventPublisher(""), tmp_path / "dir")
        assert tasks.attach_warmer is cgroup_attach.WARMER
        warmer = RecordingWarmer()
        runc = RecordingRunc(warmer)
        tasks.attach_warmer, tasks.runc = warmer, runc  # type: ignore[assignment]
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        container = Container("c1", bundle, bundle, "k8s.io", RuncProcess("", ProcessIO()))
        await tasks._start_process(container, container.init, is_exec=False)
        exec_proc = RuncProcess("e1", ProcessIO(), spec=b"{}")
        await tasks._start_process(container, exec_proc, is_exec=True)
        assert runc.calls == [("create", 1), ("exec", 1)]
        assert warmer.active == 0 and container.init.pid == exec_proc.pid == os.getpid()
        tasks.reaper.forget(os.getpid())

    asyncio.run(main())


def test_wasm_sandboxer_places_a_container_inside_the_warmer(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from kuasar.common.errors import InvalidArgument
    from kuasar.wasm.tasks import WasmTasks

    async def main() -> None:
        tasks = WasmTasks(Reaper(), EventPublisher(""), tmp_path)
        assert tasks.attach_warmer is cgroup_attach.WARMER
        warmer = RecordingWarmer()
        tasks.attach_warmer = warmer  # type: ignore[assignment]
        seen: list[int] = []

        def plan(container: object, spec: object, name: str, image_module: object = None) -> None:
            seen.append(warmer.active)  # the plan makes the cgroup; the fork and the child's move follow
            raise InvalidArgument("stop before forking")

        tasks.plan = plan  # type: ignore[method-assign]
        with pytest.raises(InvalidArgument):
            await tasks._launch(SimpleNamespace(id="c1", image_module=None),  # type: ignore[arg-type]
                                SimpleNamespace(id="", spec={}),
                                wait_for_go=True)
        assert seen == [1] and warmer.active == 0

    asyncio.run(main())


def test_a_forked_child_starts_its_own_bursts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "cgroup.procs"
    target.write_text("")
    monkeypatch.setattr(cgroup_attach, "own_procs_file", lambda: target)
    warmer = cgroup_attach.WARMER
    monkeypatch.setattr(warmer, "linger", 0.0)
    with warmer.held():
        _wait_until(lambda: warmer.writes >= 1, "no rewrites in the parent")
        pid = os.fork()
        if pid == 0:  # the child: the parent's thread is not here; a burst of its own must still run
            ok = not warmer.bursting and warmer._users == 0
            mine = tmp_path / "child.procs"
            mine.write_text("")
            cgroup_attach.own_procs_file = lambda: mine  # type: ignore[assignment]
            with warmer.held():
                deadline = time.monotonic() + WAIT_S
                while not _only_our_pid_written(mine) and time.monotonic() < deadline:
                    time.sleep(0.005)
            os._exit(0 if ok and _only_our_pid_written(mine) else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    _wait_until(lambda: not warmer.bursting, "the parent's thread did not end")


def test_entering_does_not_wait_for_the_burst_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cgroup lookup and the first write are the burst thread's: a caller placing a process never
    waits for them (they took ~0.5 ms of pod creation on a busy machine)."""
    release = threading.Event()
    target = tmp_path / "cgroup.procs"
    target.write_text("")

    def slow_lookup() -> Path:
        release.wait(WAIT_S)
        return target

    monkeypatch.setattr(cgroup_attach, "own_procs_file", slow_lookup)
    warmer = AttachLockWarmer(linger=0.0)
    started = time.monotonic()
    with warmer.held():
        entered = time.monotonic() - started
        release.set()
        _wait_until(lambda: warmer.writes >= 1, "no rewrite once the lookup returned")
    assert entered < 0.5
    _wait_until(lambda: not warmer.bursting, "the thread did not end")
