"""A task server's start: slow but alive (a long sweep of a dead one's leftovers) is waited for, silent is not.

The task server writes PROGRESS to its ready pipe while it starts, READY once it serves; the sandboxer
waits START_TIMEOUT from the last byte, START_CAP in all (task_server.StartWatch), forked or exec'd.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from kuasar.common import task_server as ts
from kuasar.common.errors import Unavailable
from tests.support import slow_task_server

REPO = Path(__file__).resolve().parents[2]
DRIVERS = ["blocking", "loop"]  # wait_ready (fork_if_absent), await_ready (_spawn)


def _wait(driver: str, fd: int) -> bool:
    if driver == "blocking":
        try:
            return ts.wait_ready(fd)
        finally:
            os.close(fd)
    return asyncio.run(ts.await_ready(fd))


def _beat_then(driver: str, every: float, count: int | None, ready: bool) -> tuple[bool, float, float]:
    """Wait by `driver` on a pipe a thread writes PROGRESS to every `every` s, `count` times (else until
    the wait ends), then READY if `ready`; its writer stays open meanwhile. The verdict, and the
    seconds the wait took from its start and from the last beat."""
    read_fd, write_fd = os.pipe()
    done = threading.Event()
    last = [time.monotonic()]

    def beat() -> None:
        while (count is None or len(last) <= count) and not done.wait(every):
            os.write(write_fd, ts.PROGRESS)
            last.append(time.monotonic())
        if ready:
            os.write(write_fd, ts.READY)

    threading.Thread(target=beat, daemon=True).start()
    try:
        verdict = _wait(driver, read_fd)
    finally:
        done.set()
        os.close(write_fd)
    now = time.monotonic()
    return verdict, now - last[0], now - last[-1]


@pytest.fixture
def window(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(ts, "START_TIMEOUT", 0.3)
    return 0.3


@pytest.mark.parametrize("driver", DRIVERS)
def test_progress_for_longer_than_the_window_then_ready_is_ready(driver: str, window: float) -> None:
    ready, took, _ = _beat_then(driver, window / 3, count=10, ready=True)  # 1 s: past three windows
    assert ready is True
    assert took >= 3 * window


@pytest.mark.parametrize("driver", DRIVERS)
def test_silence_for_longer_than_the_window_fails_within_it(driver: str, window: float) -> None:
    ready, took, silent = _beat_then(driver, window / 3, count=5, ready=False)
    assert ready is False
    assert took > window and window * 0.9 <= silent < window + 0.5


@pytest.mark.parametrize("driver", DRIVERS)
def test_progress_beyond_the_overall_cap_fails(driver: str, window: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ts, "START_CAP", 1.0)
    ready, took, _ = _beat_then(driver, window / 3, count=None, ready=False)
    assert ready is False
    assert 1.0 <= took < 1.5


@pytest.mark.parametrize("driver", DRIVERS)
def test_an_end_without_ready_fails_at_once(driver: str, window: float) -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, ts.PROGRESS * 3)
    os.close(write_fd)  # the task server exited
    began = time.monotonic()
    assert _wait(driver, read_fd) is False
    assert time.monotonic() - began < window


def test_only_ready_is_ready_and_only_progress_restarts_the_window(window: float) -> None:
    watch = ts.StartWatch(100.0)
    assert watch.wait(100.0) == pytest.approx(window)
    assert watch.feed(ts.PROGRESS, 100.2) is None
    assert watch.wait(100.2) == pytest.approx(window)  # restarted
    assert watch.wait(100.2 + window + 0.01) == 0
    assert watch.feed(ts.PROGRESS * 2 + ts.READY, 100.3) is True
    assert ts.StartWatch(0.0).feed(b"x", 0.0) is False  # no other byte is taken for either
    assert ts.StartWatch(0.0).feed(b"", 0.0) is False


def test_the_heartbeat_stops_when_its_block_ends_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ts, "HEARTBEAT_INTERVAL", 0.02)
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    try:
        with ts.beating(write_fd):
            time.sleep(0.2)
        beats = os.read(read_fd, 100)
        assert len(beats) >= 3 and set(beats) == set(ts.PROGRESS)
        with pytest.raises(RuntimeError), ts.beating(write_fd):
            time.sleep(0.1)
            raise RuntimeError("the start failed")
        assert set(os.read(read_fd, 100)) == set(ts.PROGRESS)  # beats until the failure
        time.sleep(0.1)
        with pytest.raises(BlockingIOError):
            os.read(read_fd, 1)  # none after either block
        assert not [t for t in threading.enumerate() if t.name == "start-heartbeat"]
    finally:
        os.close(read_fd)
        os.close(write_fd)


# -- a real (runc) task server, its sweep made slow (tests/support/slow_task_server.py) ------------------
WINDOW = 1.5  # the sandboxer's START_TIMEOUT here
BEAT = 0.2  # the task server's HEARTBEAT_INTERVAL here


@pytest.fixture
def slow_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ts.TaskServerHandle]:
    monkeypatch.setattr(ts, "START_TIMEOUT", WINDOW)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # for the exec'd one: python -m tests.support....
    monkeypatch.setenv(slow_task_server.HEARTBEAT_S, str(BEAT))
    launch = ts.TaskServerLaunch(slow_task_server.__name__, "runc-task-server", ts.TaskServerSettings(str(tmp_path)))
    yield ts.TaskServerHandle(tmp_path, launch)
    _end(tmp_path / slow_task_server.SWEEPING_PID)


def _start(handle: ts.TaskServerHandle, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if how == "fork":
        # The child closes every fd but its pipe and log (on 1 and 2): pytest's log handlers (whose
        # closing then fails) and its capture files must not be what it logs through.
        monkeypatch.setattr(logging.getLogger(), "handlers", [])
        monkeypatch.setattr(sys, "stdout", sys.__stdout__)
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)
        try:
            handle.fork_if_absent()
        finally:
            gc.unfreeze()  # (fork_if_absent froze this test process's heap)
    else:
        asyncio.run(handle._spawn())


def _end(pid_file: Path) -> None:
    """Kill the task server (stopped or not) and wait until it is gone."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        os.waitpid(pid, 0)  # exec'd: our child
    except ChildProcessError:  # forked: a grandchild, re-parented
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:  # its new parent reaps it
                    return
            except psutil.NoSuchProcess:
                return
            time.sleep(0.02)


@pytest.mark.parametrize(("how", "sweep"), [("fork", "await"), ("fork", "block"), ("exec", "await"),
                                            ("exec", "block")])
def test_a_task_server_whose_sweep_outlasts_the_window_still_starts(
        slow_start: ts.TaskServerHandle, monkeypatch: pytest.MonkeyPatch, how: str, sweep: str) -> None:
    # "block": the sweep holds the event loop still (time.sleep, as cgroups.empty_and_remove does), so
    # only a heartbeat of its own thread keeps going.
    monkeypatch.setenv(slow_task_server.SWEEP_S, str(2.5 * WINDOW))
    monkeypatch.setenv(slow_task_server.SWEEP_HOW, sweep)
    began = time.monotonic()
    _start(slow_start, how, monkeypatch)
    assert time.monotonic() - began >= 2.5 * WINDOW
    assert slow_start._serving()


@pytest.mark.parametrize("how", ["fork", "exec"])
def test_a_task_server_that_falls_silent_is_given_up_within_the_window(
        slow_start: ts.TaskServerHandle, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    # It beats for twice the window, then hangs (SIGSTOP: no sign of life at all).
    monkeypatch.setenv(slow_task_server.SWEEP_S, "60")
    pid_file = slow_start.directory / slow_task_server.SWEEPING_PID
    stopped: list[float] = []

    def stop_it() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                pid = int(pid_file.read_text())
                break
            except (OSError, ValueError):
                time.sleep(0.01)
        else:
            return
        time.sleep(2 * WINDOW)
        os.kill(pid, signal.SIGSTOP)
        stopped.append(time.monotonic())

    stopper = threading.Thread(target=stop_it, daemon=True)
    stopper.start()
    with pytest.raises(Unavailable, match="failed to start"):
        _start(slow_start, how, monkeypatch)
    gave_up = time.monotonic()
    stopper.join()
    assert stopped, "the sweep never began"
    assert stopped[0] <= gave_up < stopped[0] + WINDOW + 1.0  # not before it fell silent, nor long after
    assert not slow_start._serving()
    # Ended, forked as exec'd: left, it held task-server.lock, and every later start failed at once.
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _runs(pid):
        assert time.monotonic() < deadline, f"the given-up task server {pid} ({how}) still runs"
        time.sleep(0.02)


def _runs(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_task_server_whose_starter_stopped_waiting_mid_sweep_serves_all_the_same(
        slow_start: ts.TaskServerHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    # The request that started it hit its deadline during the sweep: READY then met a closed pipe, and the
    # task server died of the BrokenPipeError once its sweep was done, the sweep thrown away.
    monkeypatch.setenv(slow_task_server.SWEEP_S, str(2 * WINDOW))

    async def give_up_mid_sweep() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(slow_start._spawn(), WINDOW / 2)

    asyncio.run(give_up_mid_sweep())
    deadline = time.monotonic() + 2 * WINDOW + 5
    while not slow_start._serving() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = slow_start.directory / ts.LOG_FILE
    assert slow_start._serving(), log.read_text()[-600:] if log.exists() else "no log"
    time.sleep(0.5)  # past the READY write
    assert slow_start._serving()


def test_systemd_waits_for_ready_longer_than_a_task_server_may_take_to_start() -> None:
    # Before READY=1 the sandboxer waits for its task server (prepare, open): systemd's default 90 s
    # start timeout would kill it while a slow sweep still shows progress.
    unit = (REPO / "packaging/systemd/kuasar-sandboxer.service.in").read_text()
    value = re.search(r"^TimeoutStartSec=(\d+)min$", unit, re.MULTILINE)
    assert value is not None and int(value[1]) * 60 > ts.START_CAP
