"""The task servers' internal entry points: settings in, clear refusal of anything else."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kuasar.common.task_server import TaskServerLaunch, TaskServerSettings

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
