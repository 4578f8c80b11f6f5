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
import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from . import __version__, linux, log_rotation, pod_leftovers, proc_stat, strays
from .api.kuasar.pods.v1 import pods_pb2
from .build import build_id
from .errors import KuasarError, Unavailable, Unimplemented
from .events import EventPublisher
from .lean import serve_until
from .logs import setup_logging
from .pod_service import PODS_SERVICE, PodLauncher, PodService
from .reaper import Reaper
from .state import write_atomic
from .task_api import TaskBackend, register_task_service
from .ttrpc import TtrpcClient, TtrpcServer

log = logging.getLogger(__name__)

TASK_SOCKET = "task.sock"
LOCK_FILE = "sandboxer.lock"
# Held by the task server for its whole life: a second one (a sandboxer that could not connect for a
# moment) must not start, least of all sweep the pods of the first as left by a dead one.
SERVER_LOCK_FILE = "task-server.lock"
PID_FILE = "task-server.pid"
LOG_FILE = "task-server.log"
# How often an idle task server checks whether it is still wanted.
IDLE_CHECK_INTERVAL = 2.0
# The forked task server's comm (ps, top): its argv is still the sandboxer's. Not the program name:
# per-pod processes are found by their own comm prefixes ("pod-", "wasm-").
PROCESS_NAME = "task-server"
# What a starting task server writes to its ready pipe: PROGRESS every HEARTBEAT_INTERVAL while it
# starts, READY once it serves. One byte each, so that a read never splits one.
PROGRESS = b"."
READY = b"1"
# A fresh task server binds its socket in well under a second, but one started after a crash first
# sweeps what the dead one left (runc/runsc deletes, pods killed and their cgroups waited for): with
# hundreds of leftovers that takes longer than any fixed budget. So the sandboxer waits START_TIMEOUT
# from the last sign of life (the start, or a PROGRESS byte), and START_CAP in all.
START_TIMEOUT = 20.0
# A tenth of START_TIMEOUT: a few beats may come late (a loaded host, a GIL held by a long call)
# before the sandboxer takes silence for a hang.
HEARTBEAT_INTERVAL = 2.0
# Bounds a start that beats but never gets ready: the heartbeat says the process lives, not that its
# sweep progresses (the runc and runsc commands a sweep awaits have no timeout of their own). Far past
# any sweep measured (200 runc containers took 21.7 s one at a time; they go 16 at a time now), short
# enough that a stuck one is reported within minutes. systemd waits as long for READY=1 (the unit's
# TimeoutStartSec); a start made for a request (connect) also ends with that request's deadline.
START_CAP = 300.0
# An idle task server probes the sandboxer's lock (_sandboxer_alive) every IDLE_CHECK_INTERVAL, holding
# it for microseconds: a sandboxer starting then tries again for a while before it calls the lock taken.
LOCK_ATTEMPTS = 20
LOCK_RETRY_S = 0.01
CALL_TIMEOUT = 60.0
# Computed once, in the sandboxer before it forks its task server (which so shares it) or in a task
# server started anew from the same files.
BUILD_ID = build_id()
# How long a sandboxer waits for a task server of an earlier build to answer Retire and then be gone.
RETIRE_TIMEOUT = 10.0


def helper_argv(program: str, subcommand: str, module: str) -> list[str]:
    """argv to run, as `sys.executable`, a per-pod helper process of a sandboxer: a frozen multi-call
    binary picks its program by argv[0] (`vmm-sandboxer task-proxy`); from source the helper's module
    runs alone, without the sandboxer's gRPC stack (a smaller process per pod)."""
    if getattr(sys, "frozen", False):
        return [program, subcommand]
    return [sys.executable, "-m", module]


@dataclass
class TaskServerSettings:
    """All a task server needs, handed over by the sandboxer that starts it: it reads no config file
    and has no CLI of its own (click and the config loader would stay resident in it for nothing)."""

    dir: str
    events_address: str = ""
    log_level: str = "info"
    options: dict[str, Any] = field(default_factory=dict)  # the sandbox type's own, e.g. its runc binary
    log_limit: int = log_rotation.TASK_SERVER_LOG_LIMIT  # bytes of LOG_FILE before it is rotated; 0: never


@dataclass
class TaskServerLaunch:
    """How a sandbox type's task server is started: the module whose `main()` runs it (task_server_main),
    the program name a frozen multi-call binary knows it by, and its settings."""

    module: str
    program: str
    settings: TaskServerSettings

    def args(self, ready_fd: int) -> list[str]:
        """What task_server_main reads after argv[0]: SETTINGS READY_FD."""
        return [json.dumps(asdict(self.settings)), str(ready_fd)]

    def argv(self, ready_fd: int) -> list[str]:
        """argv to run as `sys.executable`: `python -m module SETTINGS READY_FD` from a venv; a frozen
        multi-call binary picks its program by argv[0], so there it is `program SETTINGS READY_FD`."""
        head = [self.program] if getattr(sys, "frozen", False) else [sys.executable, "-m", self.module]
        return [*head, *self.args(ready_fd)]


def task_server_main(make_backend: Callable[[dict[str, Any], Reaper, EventPublisher, Path], TaskBackend]) -> None:
    """Entry point of a type's task server: `PROGRAM SETTINGS_JSON READY_FD`, as TaskServerHandle runs it."""
    if sys.argv[1:] == ["--version"]:
        print(f"{os.path.basename(sys.argv[0])} {__version__} (internal: started by its sandboxer)")
        return
    try:
        settings = TaskServerSettings(**json.loads(sys.argv[1]))
        ready_fd = int(sys.argv[2])
    except (IndexError, ValueError, TypeError) as exc:
        sys.stderr.write(f"{sys.argv[0]}: internal program, started by its sandboxer "
                         f"(usage: SETTINGS_JSON READY_FD): {exc}\n")
        sys.exit(2)
    setup_logging(settings.log_level)
    try:
        linux.forget_inherited_ignores()  # before any runc is started
    except OSError as exc:  # an architecture whose system call number we do not know
        log.warning("signals 32/33 stay ignored, and so in containers: %s", exc)
    asyncio.run(run_task_server(
        Path(settings.dir), settings.events_address, ready_fd,
        lambda reaper, events, directory: make_backend(settings.options, reaper, events, directory),
        settings.log_limit))


# -- inside the task server ------------------------------------------------------------------------
async def run_task_server(directory: Path, events_address: str, ready_fd: int,
                          make_backend: Callable[[Reaper, EventPublisher, Path], TaskBackend],
                          log_limit: int = 0) -> None:
    with beating(ready_fd):  # until READY, or a failure: the process then exits, and the pipe closes
        server_lock = _hold_server_lock(directory)
        linux.set_child_subreaper()  # containers re-parent here when runc exits, so we see their exits
        reaper = Reaper()
        reaper.install()
        events = EventPublisher(events_address)
        backend = make_backend(reaper, events, directory)
        # Ours is the only task server (the lock): whatever a task server left is a dead one's. Containers
        # first: they live in the pods' cgroups.
        sweep_containers = getattr(backend, "sweep_leftovers", None)
        if sweep_containers is not None:
            await sweep_containers()
        if await pod_leftovers.sweep(directory):
            log.warning("ended the pods of a task server that died (see above)")
        # A backend that makes its own pod processes (gVisor's sandbox) says so by being a PodLauncher.
        pods = PodService(reaper, backend, backend if isinstance(backend, PodLauncher) else None, directory,
                          getattr(backend, "attach_warmer", None))
        server = TtrpcServer()
        register_task_service(server, backend)
        pods.register(server)
        stop = asyncio.Event()

        async def retire(req: pods_pb2.RetireRequest, ctx: Any) -> pods_pb2.RetireResponse:
            reply = pods_pb2.RetireResponse(build=BUILD_ID, pods=len(pods.pods) + pods.creating,
                                            containers=len(getattr(backend, "containers", None) or ()))
            if req.build and req.build != BUILD_ID and not reply.pods and not reply.containers:
                log.info("a sandboxer of another build (%s, ours %s) starts and we hold nothing: task server "
                         "exits", req.build, BUILD_ID)
                reply.retiring = True
                asyncio.get_running_loop().call_soon(stop.set)  # after this reply is written
            return reply

        server.add_unary(PODS_SERVICE, "Retire", pods_pb2.RetireRequest, retire)
        await server.start_unix(str(directory / TASK_SOCKET), mode=0o600)
        # Whole or absent: a reader (a sandboxer, ctl, a test) looking while we start must never see it empty.
        write_atomic(directory / PID_FILE, str(os.getpid()).encode(), mode=0o644, durable=False)
    if ready_fd >= 0:
        try:
            os.write(ready_fd, READY)
        except BrokenPipeError:
            # The sandboxer stopped waiting (the deadline of the request that started us, START_CAP): serve
            # anyway. Dying here threw the sweep away, and left a socket that the next start, refused
            # by our lock while we lived, took for a server.
            log.warning("the sandboxer stopped waiting for this task server's start; serving anyway")
        os.close(ready_fd)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    log.info("task server %d serving %s", os.getpid(), directory / TASK_SOCKET)
    rotating = None
    if log_limit > 0:
        log_path = directory / LOG_FILE
        rotating = asyncio.create_task(log_rotation.keep_rotating(
            lambda: log_rotation.rotate_stdio_log(log_path, log_limit), str(log_path)), name="log rotation")

    def unwanted() -> bool:
        if pods.pods or backend_has_work(backend) or _sandboxer_alive(directory):
            return False
        log.info("no sandboxer and no pods left; task server exits")
        return True

    await serve_until(stop, IDLE_CHECK_INTERVAL, lambda: len(pods.pods) + len(getattr(backend, "containers", ())),
                      unwanted)
    if rotating is not None:
        rotating.cancel()
    await server.close()
    await events.close()
    for name in (TASK_SOCKET, PID_FILE):
        (directory / name).unlink(missing_ok=True)
    os.close(server_lock)


@contextmanager
def beating(ready_fd: int) -> Iterator[None]:
    """Write PROGRESS to `ready_fd` every HEARTBEAT_INTERVAL while the block runs (a task server's start:
    see START_TIMEOUT); none is written once it is left, so READY, written next, is the last byte.

    From a thread rather than the event loop: the sweep has steps that block the loop for seconds
    (cgroups.empty_and_remove polls in time.sleep for up to EMPTY_WAIT_S; the wasm sweep is synchronous
    throughout; unmounts and /proc scans grow with the leftovers), and a loop-driven beat would stop
    for as long as they run. A hang of the loop in an await (a runc delete that never returns) keeps
    either kind beating; START_CAP bounds that. The thread sleeps and writes one byte in the kernel and
    holds no lock a fork could inherit (none forks in Python while it runs: the runtimes are started
    by subprocess's fork-exec), and it is gone before the task server serves."""
    if ready_fd < 0:
        yield
        return
    stopped = threading.Event()

    def beat() -> None:
        while not stopped.wait(HEARTBEAT_INTERVAL):
            try:
                os.write(ready_fd, PROGRESS)
            except OSError:  # the sandboxer gave up and closed its end: READY will fail the same way
                return

    thread = threading.Thread(target=beat, name="start-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join()  # no beat after this: READY follows, and the fd is closed (its number reused)


def _hold_server_lock(directory: Path) -> int:
    fd = os.open(directory / SERVER_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"another task server serves {directory}") from None
    return fd


def backend_has_work(backend: TaskBackend) -> bool:
    return bool(getattr(backend, "containers", None))


def _sandboxer_alive(directory: Path) -> bool:
    return _lock_held(directory / LOCK_FILE)


def _lock_held(path: Path) -> bool:
    """Whether a process holds the flock on `path` (a lock file that does not exist: no)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
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

    def __init__(self, directory: Path, launch: TaskServerLaunch) -> None:
        self.directory = directory
        self.launch = launch
        self.socket = directory / TASK_SOCKET
        self.client: TtrpcClient | None = None
        self._lock_fd = -1
        self._connecting = asyncio.Lock()
        self._replace_checked = False  # replace_if_outdated runs once, at start-up

    @property
    def address(self) -> str:
        return f"ttrpc+unix://{self.socket}"

    def hold_lock(self) -> None:
        if self._lock_fd >= 0:
            return
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        for attempt in range(LOCK_ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == LOCK_ATTEMPTS - 1:
                    os.close(fd)
                    raise Unavailable(f"another sandboxer already serves {self.directory}") from None
                time.sleep(LOCK_RETRY_S)  # before the loop: a probe of an idle task server's holds it
        self._lock_fd = fd

    async def replace_if_outdated(self) -> None:
        """A task server an earlier build left running (an upgrade: task servers outlive their
        sandboxer) is asked to retire, and exits if it holds no pod and no container; the next connect
        then starts one of ours. A busy one keeps serving, with its code, until a restart of the
        sandboxer finds it empty (drain the node, then restart)."""
        if self._replace_checked or not self._serving():
            return
        self._replace_checked = True
        try:
            client = await TtrpcClient.connect_unix(str(self.socket))
        except Unavailable:
            return
        try:
            reply = await client.call(PODS_SERVICE, "Retire", pods_pb2.RetireRequest(build=BUILD_ID),
                                      pods_pb2.RetireResponse, timeout=RETIRE_TIMEOUT)
        except Unimplemented:
            log.warning("the task server of %s is of a build that cannot retire: it keeps serving with its own "
                        "code until it ends (no pods and no sandboxer)", self.directory)
            return
        except Unavailable:  # it closed the connection: gone as it retired, or just now
            reply = pods_pb2.RetireResponse(retiring=True)
        except KuasarError as exc:  # (a hung one: it keeps serving, as before there was this check)
            log.warning("the task server of %s did not answer Retire (%s); it keeps serving", self.directory,
                        exc.message)
            return
        finally:
            await client.close()
        if reply.retiring:
            try:
                await self._wait_server_gone()
            except Unavailable as exc:  # the next connect finds it still serving, or starts one
                log.warning("%s", exc.message)
                return
            log.info("the task server of an earlier build retired; one of this build takes its place")
        elif reply.build != BUILD_ID:
            log.warning("the task server of %s is of another build (%s, ours %s) and keeps serving its %d pods and "
                        "%d containers with its own code; once none is left, a restart of the sandboxer replaces it",
                        self.directory, reply.build, BUILD_ID, reply.pods, reply.containers)

    async def _wait_server_gone(self) -> None:
        """Until the retiring task server released its lock (so that a new one can take it)."""
        deadline = time.monotonic() + RETIRE_TIMEOUT
        while time.monotonic() < deadline:
            if not _lock_held(self.directory / SERVER_LOCK_FILE):
                return
            await asyncio.sleep(0.02)
        raise Unavailable(f"the task server of {self.directory} of an earlier build did not exit")

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

    def fork_if_absent(self) -> None:
        """Start the task server by forking this process, unless one is serving already.

        Called before the sandboxer's event loop, threads and gRPC server exist. The child runs the
        task server's `main()` without exec'ing a new interpreter: the pages of everything imported so
        far (the interpreter, asyncio, protobuf, the shared modules) stay shared copy-on-write between
        the two resident processes, as Kuasar's runc-sandboxer forks its task server. If the task
        server has to be started again later, from the running loop, `_spawn` execs a fresh one.

        A frozen one-file binary always execs: its bootloader deletes the extracted libraries when the
        sandboxer exits, and a forked task server would go on using them.
        """
        if getattr(sys, "frozen", False) or self._serving():
            return
        read_fd, write_fd = os.pipe()
        pid_read, pid_write = os.pipe()  # the task server's pid, from the intermediate child
        log_fd = os.open(self.directory / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()  # the collector would otherwise write to, and so unshare, every page it scans
        pid = os.fork()
        if pid == 0:
            os.close(pid_read)
            self._run_forked_child(read_fd, write_fd, log_fd, pid_write)  # never returns
        os.close(write_fd)
        os.close(log_fd)
        os.close(pid_write)
        os.waitpid(pid, 0)  # the intermediate child exits at once; the task server is re-parented
        try:
            server_pid = int(os.read(pid_read, 32) or b"0")
        except ValueError:
            server_pid = 0
        finally:
            os.close(pid_read)
        server_start = proc_stat.start_time(server_pid) if server_pid else 0
        try:
            ready = wait_ready(read_fd)
        finally:
            os.close(read_fd)
        if not ready:
            # Given up (silent for a window, or past the cap): ended, as `_spawn` ends an exec'd one. Left,
            # it held task-server.lock, and every later start failed at once until someone killed it.
            strays.kill(server_pid, server_start)
            raise Unavailable(f"task server failed to start; see {self.directory / LOG_FILE}")
        log.info("forked task server (%s)", self.socket)

    def _run_forked_child(self, read_fd: int, write_fd: int, log_fd: int, pid_write: int) -> None:
        status = 1
        try:
            os.close(read_fd)
            os.setsid()  # like start_new_session: a signal to the sandboxer's group spares the pods
            server = os.fork()
            if server != 0:  # double fork: the task server is never a zombie of the sandboxer
                os.write(pid_write, str(server).encode())
                os._exit(0)
            os.close(pid_write)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            # Nothing of the sandboxer's may stay open here (its lock above all: the task server
            # exits once no sandboxer holds it).
            os.closerange(3, write_fd)
            os.closerange(write_fd + 1, os.sysconf("SC_OPEN_MAX"))
            linux.set_process_name(PROCESS_NAME)
            sys.argv = [self.launch.program, *self.launch.args(write_fd)]
            importlib.import_module(self.launch.module).main()
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
            if exc.code is not None and not isinstance(exc.code, int):  # its reason, as the interpreter prints it
                print(exc.code, file=sys.stderr, flush=True)
        except BaseException:
            traceback.print_exc()
        finally:
            logging.shutdown()  # what the task server logged last may still wait for a write (logs.py)
            os._exit(status)  # never back into the sandboxer's code (atexit, click, finally blocks)

    def _serving(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(str(self.socket))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    async def _spawn(self) -> None:
        read_fd, write_fd = os.pipe()
        log_path = self.directory / LOG_FILE
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                self.launch.argv(write_fd), executable=sys.executable, stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=log_file, pass_fds=(write_fd,), start_new_session=True)
        os.close(write_fd)
        if not await await_ready(read_fd):  # (closes read_fd)
            process.kill()
            raise Unavailable(f"task server failed to start; see {log_path}")
        log.info("started task server pid %d", process.pid)

    async def call(self, method: str, request: Message, response_type: type[Message],
                   timeout: float | None = CALL_TIMEOUT) -> Any:
        client = await self.connect()
        return await client.call(PODS_SERVICE, method, request, response_type, timeout=timeout)

    def begin_call(self, method: str, request: Message, response_type: type[Message],
                   timeout: float | None = CALL_TIMEOUT) -> Coroutine[Any, Any, Any]:
        """`call`, with the request already written when this returns if the connection is up
        (otherwise it goes once the returned coroutine has reconnected)."""
        if self.client is not None and not self.client.closed:
            return self.client.begin_call(PODS_SERVICE, method, request, response_type, timeout=timeout)
        return self.call(method, request, response_type, timeout)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


class StartWatch:
    """What a sandboxer makes of its task server's ready pipe, without the I/O: `feed` it each read, and
    it says ready (True), failed (False) or not yet (None); `wait` says how long to wait for the next
    read, START_TIMEOUT from the last PROGRESS and START_CAP from the start at most (0: given up)."""

    def __init__(self, now: float) -> None:
        self.started = self.heard = now

    def wait(self, now: float) -> float:
        return max(0.0, min(self.heard + START_TIMEOUT, self.started + START_CAP) - now)

    def feed(self, data: bytes, now: float) -> bool | None:
        if not data:  # end of file: the task server exited (or closed the pipe) before it was ready
            return False
        for byte in data:
            if byte == READY[0]:
                return True
            if byte != PROGRESS[0]:  # not of this protocol: not to be taken for either
                return False
        self.heard = now
        return None


def wait_ready(fd: int) -> bool:
    """Whether the task server writing to pipe `fd` became ready (StartWatch), blocking: before the
    sandboxer's event loop exists (fork_if_absent)."""
    watch = StartWatch(time.monotonic())
    while (left := watch.wait(time.monotonic())) > 0:
        readable, _, _ = select.select([fd], [], [], left)
        if readable and (verdict := watch.feed(os.read(fd, 64), time.monotonic())) is not None:
            return verdict
    return False


async def await_ready(fd: int) -> bool:
    """`wait_ready` in the event loop (_spawn). Takes `fd` over and closes it, also when cancelled."""
    loop = asyncio.get_running_loop()
    watch = StartWatch(time.monotonic())
    readable = asyncio.Event()
    try:
        os.set_blocking(fd, False)
        loop.add_reader(fd, readable.set)
        while (left := watch.wait(time.monotonic())) > 0:
            try:
                async with asyncio.timeout(left):
                    await readable.wait()
            except TimeoutError:
                continue  # (the watch has given up by now)
            readable.clear()
            try:
                data = os.read(fd, 64)
            except BlockingIOError:
                continue
            if (verdict := watch.feed(data, time.monotonic())) is not None:
                return verdict
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)
