"""The long-lived task server a resident sandboxer owns, and the sandboxer's handle on it.

containerd marks every container exited (255) the moment the connection behind its task address
drops, so the Task API is served by this separate process, not the Sandbox API process: a crash or
upgrade of the sandboxer leaves containers, their stdio and containerd's connections untouched. The
sandboxer holds an flock on `sandboxer.lock` for its whole life; the task server exits only when that
lock is free (no sandboxer) and it has no pods left.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from . import linux
from .errors import Unavailable
from .events import EventPublisher
from .pod_service import PODS_SERVICE, PodLauncher, PodService
from .reaper import Reaper
from .task_api import TaskBackend, register_task_service
from .ttrpc import TtrpcClient, TtrpcServer

log = logging.getLogger(__name__)

TASK_SOCKET = "task.sock"
LOCK_FILE = "sandboxer.lock"
PID_FILE = "task-server.pid"
LOG_FILE = "task-server.log"
# How often an idle task server checks whether it is still wanted.
IDLE_CHECK_INTERVAL = 2.0
# A fresh task server binds its socket in well under a second; this only bounds a broken start.
START_TIMEOUT = 20.0
CALL_TIMEOUT = 60.0


def self_command(module: str) -> list[str]:
    """How to start this program again: a frozen binary is its own interpreter."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", module]


# -- inside the task server ------------------------------------------------------------------------
async def run_task_server(directory: Path, events_address: str, ready_fd: int,
                          make_backend: Callable[[Reaper, EventPublisher, Path], TaskBackend]) -> None:
    linux.set_child_subreaper()  # containers re-parent here when runc exits, so we see their exits
    reaper = Reaper()
    reaper.install()
    events = EventPublisher(events_address)
    backend = make_backend(reaper, events, directory)
    # A backend that makes its own pod processes (gVisor's sandbox) says so by being a PodLauncher.
    pods = PodService(reaper, backend, backend if isinstance(backend, PodLauncher) else None)
    server = TtrpcServer()
    register_task_service(server, backend)
    pods.register(server)
    await server.start_unix(str(directory / TASK_SOCKET), mode=0o600)
    (directory / PID_FILE).write_text(str(os.getpid()))
    if ready_fd >= 0:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    log.info("task server %d serving %s", os.getpid(), directory / TASK_SOCKET)
    while not stop.is_set():
        try:
            async with asyncio.timeout(IDLE_CHECK_INTERVAL):
                await stop.wait()
        except TimeoutError:
            if not pods.pods and not backend_has_work(backend) and not _sandboxer_alive(directory):
                log.info("no sandboxer and no pods left; task server exits")
                break
    await server.close()
    await events.close()
    for name in (TASK_SOCKET, PID_FILE):
        (directory / name).unlink(missing_ok=True)


def backend_has_work(backend: TaskBackend) -> bool:
    return bool(getattr(backend, "containers", None))


def _sandboxer_alive(directory: Path) -> bool:
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe lock if we got it
    return False


# -- inside the sandboxer --------------------------------------------------------------------------
class TaskServerHandle:
    """Finds the running task server for `directory`, or starts one, and calls its Pods service."""

    def __init__(self, directory: Path, command: list[str]) -> None:
        self.directory = directory
        self.command = command
        self.socket = directory / TASK_SOCKET
        self.client: TtrpcClient | None = None
        self._lock_fd = -1
        self._connecting = asyncio.Lock()

    @property
    def address(self) -> str:
        return f"ttrpc+unix://{self.socket}"

    def hold_lock(self) -> None:
        self._lock_fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise Unavailable(f"another sandboxer already serves {self.directory}") from None

    async def connect(self) -> TtrpcClient:
        async with self._connecting:
            if self.client is not None and not self.client.closed:
                return self.client
            try:
                self.client = await TtrpcClient.connect_unix(str(self.socket))
            except Unavailable:
                await self._spawn()
                self.client = await TtrpcClient.connect_unix(str(self.socket))
            return self.client

    async def _spawn(self) -> None:
        read_fd, write_fd = os.pipe()
        log_path = self.directory / LOG_FILE
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [*self.command, "--ready-fd", str(write_fd)], stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=log_file, pass_fds=(write_fd,), start_new_session=True)
        os.close(write_fd)
        loop = asyncio.get_running_loop()
        try:
            ready = await asyncio.wait_for(loop.run_in_executor(None, os.read, read_fd, 1), START_TIMEOUT)
        finally:
            os.close(read_fd)
        if ready != b"1":
            process.kill()
            raise Unavailable(f"task server failed to start; see {log_path}")
        log.info("started task server pid %d", process.pid)

    async def call(self, method: str, request: Message, response_type: type[Message],
                   timeout: float | None = CALL_TIMEOUT) -> Any:
        client = await self.connect()
        return await client.call(PODS_SERVICE, method, request, response_type, timeout=timeout)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
