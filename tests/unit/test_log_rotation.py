"""Rotation of a process's own stdio log (kuasar.common.log_rotation), and the task server using it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from kuasar.common import log_rotation
from kuasar.common.task_server import TaskServerHandle, TaskServerLaunch, TaskServerSettings

# A process whose fds 1 and 2 are the log, as a task server's are: fills it, rotates, writes on.
CHILD = r"""
import os, sys
from pathlib import Path
from kuasar.common.log_rotation import rotate_stdio_log
path, limit = Path(sys.argv[1]), int(sys.argv[2])
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.dup2(fd, 1); os.dup2(fd, 2); os.close(fd)
print("before " * 20, flush=True)
sys.stderr.write("buffered, not yet flushed\n")
first = rotate_stdio_log(path, limit)
print("after", flush=True)
print("err after", file=sys.stderr, flush=True)
second = rotate_stdio_log(path, limit)  # the new file is under the limit
os.write(int(sys.argv[3]), f"{first} {second}".encode())
"""


def run_child(path: Path, limit: int) -> str:
    read_fd, write_fd = os.pipe()
    subprocess.run([sys.executable, "-c", CHILD, str(path), str(limit), str(write_fd)], pass_fds=(write_fd,),
                   check=True)
    os.close(write_fd)
    with os.fdopen(read_fd) as answer:
        return answer.read()


def test_a_log_over_its_limit_moves_to_dot_1_and_stdout_and_stderr_go_on_in_a_new_file(tmp_path: Path) -> None:
    log = tmp_path / "task-server.log"
    assert run_child(log, 100) == "True False"
    assert log_rotation.rotated(log).read_text() == "before " * 20 + "\nbuffered, not yet flushed\n"
    assert log.read_text() == "after\nerr after\n"
    assert oct(log.stat().st_mode & 0o777) == "0o600"


# A rotation cut short after the rename (the new file could not be opened): the next one finishes it.
HALF_DONE = r"""
import os, sys
from pathlib import Path
from kuasar.common.log_rotation import rotate_stdio_log, rotated
path = Path(sys.argv[1])
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.dup2(fd, 1); os.dup2(fd, 2); os.close(fd)
print("before", flush=True)
os.replace(path, rotated(path))
print("still into the renamed file", flush=True)
done = rotate_stdio_log(path, 10**9)
print("after", flush=True)
sys.stderr.write(f"{done} {rotate_stdio_log(path, 10**9)}\n")
"""


def test_a_rotation_cut_short_after_the_rename_is_finished_by_the_next(tmp_path: Path) -> None:
    log = tmp_path / "task-server.log"
    subprocess.run([sys.executable, "-c", HALF_DONE, str(log)], check=True)
    assert log_rotation.rotated(log).read_text() == "before\nstill into the renamed file\n"
    assert log.read_text() == "after\nTrue False\n"


def test_a_log_under_its_limit_or_not_behind_fd_2_is_left_alone(tmp_path: Path) -> None:
    log = tmp_path / "task-server.log"
    assert run_child(log, 10_000) == "False False"
    assert not log_rotation.rotated(log).exists()
    # This process's fd 2 is not that file (pytest's capture, or a terminal): the name alone is not enough.
    log.write_text("x" * 500)
    assert not log_rotation.rotate_stdio_log(log, 100)
    assert log.read_text() == "x" * 500 and not log_rotation.rotated(log).exists()
    assert not log_rotation.rotate_stdio_log(tmp_path / "missing.log", 100)


def test_keep_rotating_goes_on_after_a_failure_and_logs_a_lasting_one_once(caplog: pytest.LogCaptureFixture) -> None:
    outcomes = [OSError(28, "No space left on device")] * 3 + [None, OSError(24, "Too many open files"), None]
    calls: list[int] = []

    def rotate() -> None:
        calls.append(1)
        outcome = outcomes[min(len(calls), len(outcomes)) - 1]
        if outcome is not None:
            raise outcome

    async def scenario() -> None:
        task = asyncio.create_task(log_rotation.keep_rotating(rotate, "/x/y.log", period=0.001))
        while len(calls) < len(outcomes) + 2:  # noqa: ASYNC110 - counting calls of a plain function
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level("WARNING", logger="kuasar.common.log_rotation"):
        asyncio.run(scenario())
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "No space left" in warned[0] and "Too many open files" in warned[1]


def test_a_task_server_rotates_its_log(tmp_path: Path) -> None:
    from kuasar.common import task_server
    from kuasar.common.api.kuasar.pods.v1 import pods_pb2

    log = tmp_path / task_server.LOG_FILE
    launch = TaskServerLaunch("kuasar.runc.task_server_main", "runc-task-server",
                              TaskServerSettings(str(tmp_path), log_limit=1000))

    async def main() -> None:
        handle = TaskServerHandle(tmp_path, launch)
        handle.hold_lock()
        await handle.replace_if_outdated()
        await handle.connect()
        pid = int((tmp_path / task_server.PID_FILE).read_text())
        try:
            for n in range(8):  # each pod logs two lines, ~200 bytes: once over the limit, not twice
                await handle.call("Create", pods_pb2.CreatePodRequest(id=f"pod{n}"), pods_pb2.CreatePodResponse)
                await handle.call("Delete", pods_pb2.PodRequest(id=f"pod{n}"), empty_pb2.Empty)
            deadline = time.monotonic() + 10
            while not log_rotation.rotated(log).exists() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            assert b"pod0 removed" in log_rotation.rotated(log).read_bytes()
            await handle.call("Create", pods_pb2.CreatePodRequest(id="later"), pods_pb2.CreatePodResponse)
            await handle.call("Delete", pods_pb2.PodRequest(id="later"), empty_pb2.Empty)
            deadline = time.monotonic() + 5
            while b"later removed" not in log.read_bytes() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            assert b"later removed" in log.read_bytes()
        finally:
            await handle.close()
            os.kill(pid, signal.SIGTERM)

    asyncio.run(main())
