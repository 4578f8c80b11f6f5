"""A real containerd 2.x with runc-sandboxer as its `runc` proxy sandboxer, shared by a test module.

Needs root (namespaces, mounts, cgroups) and `make setup` (containerd 2.x in the project prefix).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket as socketlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.support import containerd as cd

REPO = Path(__file__).resolve().parents[2]
BUSYBOX = "localhost/kuasar/busybox:latest"
HANDLER = "kuasar-runc"


def integration_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root (namespaces, mounts, cgroups)"
    return cd.skip_reason()


@dataclass
class Stack:
    containerd: cd.ContainerdInstance
    sandboxer: subprocess.Popen
    sandboxer_socket: Path
    sandboxer_dir: Path
    sandboxer_log: Path
    log_dir: Path

    @property
    def address(self) -> str:
        return self.containerd.address

    def run(self, coro):
        return asyncio.run(coro)


def start_sandboxer(socket: Path, directory: Path, log_path: Path, events_address: str,
                    module: str = "kuasar.runc.cli", extra_args: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start a sandboxer daemon (`python -m <module>`) and wait until it says READY=1 on its
    $NOTIFY_SOCKET, as systemd would: its Sandbox API accepts before then, holding the calls while it
    recovers the sandboxes it had, and a test that looks at what recovery removes must not look sooner."""
    notify = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    notify_name = f"kuasar-test-notify-{os.getpid()}-{secrets.token_hex(4)}"
    notify.bind("\0" + notify_name)
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--listen", str(socket), "--dir", str(directory),
             "--log-level", "debug", "--events-address", events_address, *extra_args],
            env={**os.environ, "NOTIFY_SOCKET": "@" + notify_name},
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        message = wait_ready(notify, proc, log_path)
    finally:
        log.close()
        notify.close()
    assert b"READY=1" in message.split(b"\n"), message
    return proc


def wait_ready(notify: socketlib.socket, proc: subprocess.Popen, log: Path, timeout: float = 60) -> bytes:
    """The first message a daemon sends on the $NOTIFY_SOCKET bound to `notify` (READY=1 and its status)."""
    deadline = time.monotonic() + timeout
    notify.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            return notify.recv(4096)
        except TimeoutError:
            if proc.poll() is not None:
                break
    raise AssertionError(f"no READY=1 from {proc.args}:\n{log.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def kill_task_server(directory: Path) -> None:
    """Last-resort teardown: the task server and everything under it (pods, containers), then what
    its pods had mounted in `directory` (their /dev/shm), which nobody else would unmount."""
    pid_file = directory / "task-server.pid"
    try:
        server = psutil.Process(int(pid_file.read_text()))
        victims = [*server.children(recursive=True), server]
    except (psutil.NoSuchProcess, ValueError, FileNotFoundError):
        victims = []
    for proc in victims:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)
    cd.unmount_all(directory)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = integration_skip_reason()
    if reason:
        pytest.skip(reason)
    from .private_stack import private_stack  # built on this module's helpers

    # A bridge and subnet of its own, so test stacks (and benchmarks) can run side by side.
    token = secrets.randbelow(50)
    base = tmp_path_factory.mktemp("stack")
    # As installed (`make install`): containerd finds the type's v1 helper on its PATH (for `-info`,
    # and for re-attaching after its own restart).
    with private_stack(base, bridge=f"kuasar-it{token}", subnet=f"10.{200 + token}.0.0/16",
                       extra_path=[shim_dir(base, "containerd-shim-kuasar-runc-v1")]) as current:
        yield current


def shim_dir(base: Path, helper_name: str) -> Path:
    """A folder holding only the venv's `helper_name` (a containerd-shim-kuasar-<type>-v1), for the front
    of containerd's PATH."""
    helper = Path(sys.executable).parent / helper_name
    if not os.access(helper, os.X_OK):
        pytest.skip(f"{helper} missing (run `make setup`)")
    folder = base / "shim-bin"
    folder.mkdir()
    (folder / helper_name).symlink_to(helper)
    return folder
