"""The task servers' internal entry points: settings in, clear refusal of anything else."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from google.protobuf import empty_pb2

from kuasar.common.errors import Unavailable
from kuasar.common.task_server import LOCK_FILE, TaskServerHandle, TaskServerLaunch, TaskServerSettings, helper_argv

MODULES = ["kuasar.runc.task_server_main", "kuasar.wasm.task_server_main", "kuasar.quark.task_server_main"]


BAD_ARGS = [[], ["not json", "3"], ['{"dir": "/x", "bogus": 1}', "3"], ['{"dir": "/x"}', "three"]]


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("args", BAD_ARGS)
def test_bad_arguments_are_refused_with_a_usage_line(module: str, args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, timeout=60)
    assert result.returncode == 2
    assert b"internal program, started by its sandboxer" in result.stderr
    assert b"Traceback" not in result.stderr


def test_launch_argv_carries_the_settings_as_json() -> None:
    settings = TaskServerSettings("/run/k", "/run/containerd.sock.ttrpc", "debug", {"runc": "/usr/sbin/runc"})
    argv = TaskServerLaunch("kuasar.runc.task_server_main", "runc-task-server", settings).argv(7)
    assert argv[:3] == [sys.executable, "-m", "kuasar.runc.task_server_main"]
    assert TaskServerSettings(**json.loads(argv[3])) == settings
    assert argv[4] == "7"


def test_version_is_answered() -> None:
    result = subprocess.run([sys.executable, "-m", MODULES[0], "--version"], capture_output=True, timeout=60)
    assert result.returncode == 0 and b"0.1.0" in result.stdout


@pytest.mark.parametrize("args", [[], ["not json"], ['{"listen": "/x"}'], ["[1, 2]"]])
def test_the_daemon_proper_refuses_anything_but_a_spec_from_its_cli(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "kuasar.common.daemon_main", *args], capture_output=True,
                            timeout=60)
    assert result.returncode == 2
    assert b"internal program, exec'd by a sandboxer's CLI" in result.stderr
    assert b"Traceback" not in result.stderr


def test_a_sandboxer_starting_while_its_idle_task_server_probes_the_lock_still_gets_it(tmp_path: Path) -> None:
    # An idle task server takes the sandboxer's lock for microseconds every 2 s to see whether a
    # sandboxer is alive; a sandboxer starting in that moment refused to start ("another sandboxer").
    probe = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(probe, fcntl.LOCK_EX)
    threading.Timer(0.05, os.close, (probe,)).start()  # the probe lets go
    handle = TaskServerHandle(tmp_path, None)  # type: ignore[arg-type]
    handle.hold_lock()
    assert not _lock_is_free(tmp_path)


def test_a_lock_held_by_a_live_sandboxer_is_refused_and_can_be_taken_once_it_is_gone(tmp_path: Path) -> None:
    other = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)
    handle = TaskServerHandle(tmp_path, None)  # type: ignore[arg-type]
    with pytest.raises(Unavailable, match="another sandboxer"):
        handle.hold_lock()
    os.close(other)
    handle.hold_lock()  # it kept the closed fd's number as if it held the lock
    assert not _lock_is_free(tmp_path)


def _lock_is_free(directory: Path) -> bool:
    """Whether another open file could take the lock (flock is per open file: this one sees ours)."""
    probe = os.open(directory / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(probe)


def test_a_per_pod_helper_runs_from_its_module_or_as_a_program_of_the_frozen_binary(monkeypatch) -> None:
    assert helper_argv("vmm-sandboxer", "task-proxy", "kuasar.vmm.proxy") == [
        sys.executable, "-m", "kuasar.vmm.proxy"]
    # Frozen, sys.executable is the multi-call binary: argv[0] names the program (test_binaries runs it).
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert helper_argv("vmm-sandboxer", "task-proxy", "kuasar.vmm.proxy") == ["vmm-sandboxer", "task-proxy"]


def test_a_task_server_of_another_build_retires_when_it_holds_nothing_and_stays_while_it_holds_a_pod(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Task servers outlive their sandboxer by design: after an upgrade, the old code served on for good.
    from kuasar.common import task_server
    from kuasar.common.api.kuasar.pods.v1 import pods_pb2

    launch = TaskServerLaunch("kuasar.runc.task_server_main", "runc-task-server", TaskServerSettings(str(tmp_path)))

    def server_pid() -> int:
        return int((tmp_path / task_server.PID_FILE).read_text())

    async def sandboxer_start(build: str) -> TaskServerHandle:
        monkeypatch.setattr(task_server, "BUILD_ID", build)
        handle = TaskServerHandle(tmp_path, launch)
        handle.hold_lock()
        await handle.replace_if_outdated()
        await handle.connect()
        return handle

    ours = task_server.BUILD_ID  # what a task server started from these files computes too

    async def main() -> None:
        handle = await sandboxer_start(ours)  # starts one of its build
        first = server_pid()
        await handle.call("Create", pods_pb2.CreatePodRequest(id="busy"), pods_pb2.CreatePodResponse)
        await handle.close()
        handle = await sandboxer_start("an-upgrade")
        assert server_pid() == first  # it holds a pod: it stays, and serves
        await handle.call("Delete", pods_pb2.PodRequest(id="busy"), empty_pb2.Empty)
        await handle.close()
        handle = await sandboxer_start("another-upgrade")
        assert server_pid() != first and _ended(first)
        second = server_pid()
        await handle.close()
        handle = await sandboxer_start(ours)  # the build the new one was started from: kept
        assert server_pid() == second
        await handle.close()
        os.kill(second, signal.SIGTERM)

    asyncio.run(main())


def _ended(pid: int) -> bool:
    """Exited (this process started it, so it may wait as a zombie for its status)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
