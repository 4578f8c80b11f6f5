"""A `create` of runc or runsc that a dead task server left running: the next task server ends it, with
what it started, and removes what it made before the runtime saved the container."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kuasar.common import cgroups, proc_stat, strays
from kuasar.common.host_runc_tasks import RuncTasks
from kuasar.common.pod_files import pod_dir
from kuasar.common.reaper import Reaper
from kuasar.common.runc_cli import Runc
from kuasar.common.runtime_commands import create_of
from kuasar.quark.gvisor_tasks import SANDBOX_BUNDLE, GvisorTasks
from kuasar.quark.runsc import Leftover, Runsc

# Stands for the runtime's create: it takes its lock (runsc) or makes its directory (runc) at once, starts
# a process of the container's (runsc's sandbox, a runc hook), and saves the state only at the end.
CREATE = """
import os, subprocess, sys, time
early = os.environ["FAKE_EARLY"]
if os.environ["FAKE_EARLY_IS_DIR"] == "1":
    os.makedirs(early)
else:
    open(early, "w").close()
child = subprocess.Popen(["sleep", "60"])
with open(os.environ["FAKE_CHILD"] + ".tmp", "w") as f:
    f.write(str(child.pid))
os.rename(os.environ["FAKE_CHILD"] + ".tmp", os.environ["FAKE_CHILD"])
time.sleep(float(os.environ.get("FAKE_CREATE_TIME", "1.0")))
open(os.environ["FAKE_STATE"], "w").write("{}")
"""
# A create that runs to its end takes this long; the test waits past it before it looks.
CREATE_TIME = 1.0
SETTLE = 5.0


@dataclass
class Backend:
    tasks: object
    root: Path
    bundle: Path
    early: Path  # what the runtime makes of the container first
    early_is_dir: bool
    state: Path  # what it makes last


def _fake_runtime(tmp_path: Path, name: str) -> Path:
    """A program that is its own file (/proc/<pid>/exe names it), as a real runtime binary is: a copy of
    the interpreter, which a `-c` before the runtime's flags keeps from reading them."""
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    shutil.copy2(Path(sys.executable).resolve(), path)
    return path


def _runc(tmp_path: Path, container_id: str) -> Backend:
    root = tmp_path / "runc"
    tasks = RuncTasks.__new__(RuncTasks)  # only its runc is used
    tasks.runc = Runc(Reaper(), root, str(_fake_runtime(tmp_path, "runc")))
    bundle = tmp_path / "bundles" / container_id  # containerd names it after the task
    return Backend(tasks, root, bundle, root / container_id, True, root / container_id / "state.json")


def _runsc(tmp_path: Path, container_id: str) -> Backend:
    root = tmp_path / "runsc"
    tasks = GvisorTasks.__new__(GvisorTasks)  # only its runsc and its directory are used
    tasks.runsc = Runsc(Reaper(), root, binary=str(_fake_runtime(tmp_path, "runsc")))
    tasks.directory = tmp_path
    return Backend(tasks, root, pod_dir(tmp_path, container_id) / SANDBOX_BUNDLE,
                   root / f"{container_id}_sandbox:{container_id}.lock", False,
                   root / f"{container_id}_sandbox:{container_id}.state")


BACKENDS = {"runc": _runc, "runsc": _runsc}


@pytest.fixture
def cgroup_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("")  # a cgroup v2 root
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", root)
    return root


def _left_create(backend: Backend, binary: str, container_id: str,
                 tmp_path: Path) -> tuple[subprocess.Popen, int, int]:
    """Start a create as our Runc/Runsc would; return it and the pid and start time of the process it
    started, once it has."""
    child_file = tmp_path / f"child-{os.urandom(4).hex()}"
    env = dict(os.environ, FAKE_EARLY=str(backend.early), FAKE_EARLY_IS_DIR="1" if backend.early_is_dir else "0",
               FAKE_STATE=str(backend.state), FAKE_CHILD=str(child_file), FAKE_CREATE_TIME=str(CREATE_TIME))
    argv = [binary, "-c", CREATE, "--root", str(backend.root), "--log", str(tmp_path / "log.json"),
            "create", "--bundle", str(backend.bundle), "--pid-file", str(tmp_path / "init.pid"), container_id]
    proc = subprocess.Popen(argv, env=env)
    deadline = time.monotonic() + SETTLE
    while not child_file.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the fake create never started its child"
        time.sleep(0.01)
    child = int(child_file.read_text())
    return proc, child, proc_stat.start_time(child)


@pytest.mark.parametrize("runtime", sorted(BACKENDS))
def test_a_create_left_running_is_ended_with_what_it_started_and_made(
        runtime: str, tmp_path: Path, cgroup_root: Path, running: list[subprocess.Popen]) -> None:
    # gVisor: a task server SIGKILLed during `runsc create` (~0.1-0.2 s of every pod start) left it
    # running; runsc saves the sandbox's state only at its end, so the next task server's `runsc list`
    # did not see it, and a live sandbox (runsc-sandbox, gofer, cgroup) stayed until the next restart.
    container_id = "pod1"
    backend = BACKENDS[runtime](tmp_path, container_id)
    backend.bundle.mkdir(parents=True)
    (backend.bundle / "config.json").write_text(json.dumps({"linux": {"cgroupsPath": f"/kubepods/{container_id}"}}))
    (cgroup_root / "kubepods" / container_id).mkdir(parents=True)  # what the runtime made for the container
    binary = str(backend.tasks._runtime_binary_and_root()[0])  # type: ignore[attr-defined]
    left, child, child_start = _left_create(backend, binary, container_id, tmp_path)
    running.append(left)
    # The same binary on another root (another task server's): not ours to end.
    other = subprocess.Popen([binary, "-c", "import time; time.sleep(60)", "--root", str(tmp_path / "other"),
                              "create", "--bundle", str(backend.bundle), container_id])
    running.append(other)

    asyncio.run(backend.tasks._end_runtime_commands())  # type: ignore[attr-defined]

    assert left.wait(timeout=SETTLE) == -signal.SIGKILL  # ended, not left to save its state
    assert strays.gone(child, child_start), "what the create started outlived it"
    assert not backend.early.exists() and not backend.state.exists()
    assert not (cgroup_root / "kubepods" / container_id).exists() and (cgroup_root / "kubepods").is_dir()
    assert other.poll() is None


def test_the_gvisor_sweep_ends_a_create_before_it_lists(tmp_path: Path, cgroup_root: Path,
                                                       running: list[subprocess.Popen]) -> None:
    backend = _runsc(tmp_path, "pod1")
    tasks: GvisorTasks = backend.tasks  # type: ignore[assignment]
    backend.bundle.mkdir(parents=True)
    left, child, child_start = _left_create(backend, tasks.runsc.binary, "pod1", tmp_path)
    running.append(left)
    # The sandbox's control socket, which runsc makes in its root early in the create (only its
    # `delete` of a saved sandbox removes it: it was left behind).
    with socket.socket(socket.AF_UNIX) as control:
        control.bind(str(backend.root / "runsc-pod1.sock"))
    listed_while_running: list[bool] = []

    async def leftovers() -> list[Leftover]:  # `runsc list`: what has a state file
        listed_while_running.append(left.poll() is None)
        return [Leftover(name.split("_sandbox:")[0], "", name.split("_sandbox:")[0])
                for name in os.listdir(backend.root) if name.endswith(".state")]

    async def delete(container_id: str, network: str) -> None:
        raise AssertionError(f"nothing was saved to delete, yet {container_id} was listed")

    tasks.runsc.leftovers = leftovers  # type: ignore[method-assign]
    tasks.runsc.delete = delete  # type: ignore[method-assign]
    asyncio.run(tasks.sweep_leftovers())
    time.sleep(CREATE_TIME)  # past the end a create left alone would have reached
    assert listed_while_running == [False, False]
    assert left.poll() == -signal.SIGKILL and strays.gone(child, child_start)
    assert os.listdir(backend.root) == [], "a sandbox nobody knows of is left in the runsc root"


def test_a_create_command_line_names_its_container_and_bundle() -> None:
    argv = [b"runc", b"--root", b"/run/k/runc", b"--log", b"/x/log.json", b"--log-format", b"json", b"create",
            b"--bundle", b"/b/ctr", b"--pid-file", b"/x/init.pid", b"--console-socket", b"/c/1.sock", b"ctr-1", b""]
    assert create_of(argv) == ("ctr-1", Path("/b/ctr"))
    runsc = [b"runsc", b"--root", b"/r", b"--platform=systrap", b"--network=none", b"--log", b"/b/runsc.log",
             b"--log-format", b"json", b"create", b"--bundle", b"/p/pods/pod1/sandbox", b"--pid-file",
             b"/p/pods/pod1/sandbox/sandbox.pid", b"pod1", b""]
    assert create_of(runsc) == ("pod1", Path("/p/pods/pod1/sandbox"))
    # Not a create, a relative bundle, an id runc would not have taken, a truncated line: nothing to remove.
    assert create_of([b"runc", b"--root", b"/r", b"delete", b"--force", b"ctr-1"]) is None
    assert create_of([b"runc", b"--root", b"/r", b"create", b"--bundle", b"b", b"ctr-1"]) is None
    assert create_of([b"runc", b"--root", b"/r", b"create", b"--bundle", b"/b", b"../x"]) is None
    assert create_of([b"runc", b"--root", b"/r", b"create", b"--bundle"]) is None
