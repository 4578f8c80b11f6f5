"""What every Task API backend keeps the same way: its containers and their processes.

A backend (runc-sandboxer, wasm-sandboxer, quark-sandboxer's gVisor backend, the vm-agent) subclasses
`TaskProcess` and `TaskContainer` with what its own processes and containers carry, and derives from
`ContainerTasks`, which holds them by id with a lock each, looks them up (NotFound otherwise), checks
the states every backend checks, builds the State/Wait/Delete answers and publishes the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from .api.containerd.events import task_pb2 as events
from .api.containerd.runtime.task.v2 import shim_pb2 as task
from .api.containerd.types.task import task_pb2 as types
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, KuasarError, NotFound
from .events import TASK_EVENT_TOPICS
from .ids import validate_id
from .keyed_locks import KeyedLocks
from .reaper import Exit
from .task_api import TaskBackend
from .ttrpc import Context

log = logging.getLogger(__name__)

# The exit status of an exec that never ran (its start failed, or it was deleted unstarted): containerd's
# UnknownExitStatus, so that it cannot read as success.
NEVER_RAN_EXIT_STATUS = 255

# CRI (and cri-o, and Kuasar) name the pod of a container with one of these annotations.
SANDBOX_ID_ANNOTATIONS = ("io.kubernetes.cri.sandbox-id", "io.kubernetes.cri-o.SandboxID",
                          "io.kubernetes.sandbox.id")
# OCI Process JSON larger than this is not a process spec (containerd's whole message cap is 4 MiB).
MAX_SPEC_BYTES = 1 << 20
VERSION = "kuasar-py"


class Publisher(Protocol):
    def publish(self, topic: str, message: Message, namespace: str) -> None: ...


def timestamp(ns: int) -> timestamp_pb2.Timestamp:
    """`ns` as a protobuf Timestamp; now when it is 0 (an event always carries a time)."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns or time.time_ns())
    return ts


def set_timestamp(message: Message, name: str, ns: int) -> None:
    """Set the Timestamp field `name` of `message` if `ns` is known (a response leaves it unset otherwise)."""
    if ns:
        getattr(message, name).FromNanoseconds(ns)


def pod_id_of(annotations: dict[str, Any]) -> str:
    """The pod of a container, from its spec's annotations ("" if none names it)."""
    pod_id = next((annotations[k] for k in SANDBOX_ID_ANNOTATIONS if k in annotations), "")
    if not isinstance(pod_id, str):
        raise InvalidArgument(f"the spec's sandbox id annotation is not a string: {pod_id!r}")
    return pod_id


# Sections of an OCI spec the task servers read or rewrite, with their JSON types.
_SPEC_SECTIONS: dict[str, type] = {"annotations": dict, "linux": dict, "process": dict, "root": dict,
                                   "mounts": list}


# Stats of a container whose init has exited: NotFound, which containerd's metrics collection (CRI's
# stats polling) passes over quietly; any other error it logs on every poll until the task is deleted.
STATS_OF_STOPPED = "container {} has exited: no statistics"
# A `runc ps` (`runsc ps`) takes tens of ms; containerd's reload waits on Pids with no deadline of its own.
PIDS_TIMEOUT = 2.0


def read_bundle_spec(bundle: Path) -> dict[str, Any]:
    """The bundle's config.json: a JSON object whose sections we use have their OCI types (anything
    else is INVALID_ARGUMENT here, not a Python error from deep inside a Create)."""
    path = bundle / "config.json"
    try:
        spec = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        raise InvalidArgument(f"{path} is not JSON") from None
    if not isinstance(spec, dict):
        raise InvalidArgument(f"{path} is not a JSON object")
    for name, kind in _SPEC_SECTIONS.items():
        if spec.get(name) is not None and not isinstance(spec[name], kind):
            raise InvalidArgument(f"{path}: {name} is not a JSON {'object' if kind is dict else 'array'}")
    if not isinstance((spec.get("root") or {}).get("path", ""), str):  # a TypeError after the rootfs mount
        raise InvalidArgument(f"{path}: root.path is not a string")
    return spec


def dead_init_pids(init: TaskProcess) -> task.PidsResponse:
    """Pids of a container whose processes have all ended: its dead init, not an empty list, which
    containerd reloading its tasks after a restart takes for a leaked shim (shim_load.go) and deletes,
    turning an exit that happened while it was down into 255/Unknown. A deleted container answers
    NotFound instead."""
    return task.PidsResponse(processes=[types.ProcessInfo(pid=init.pid)])


async def running_pids(init: TaskProcess, listing: Coroutine[Any, Any, list[int]]) -> list[int]:
    """The pids the runtime lists for a container whose init has not been seen to stop; its init's pid
    when the listing fails, takes longer than PIDS_TIMEOUT or finds nothing (an init that just exited):
    containerd, reloading its tasks after a restart, takes an error or an empty list for a leaked shim
    and deletes the task of a container that still runs (shim_load.go), and a hung one held its start."""
    try:
        async with asyncio.timeout(PIDS_TIMEOUT):
            pids = await listing
    except (KuasarError, TimeoutError, ValueError) as exc:
        log.warning("listing the processes of a container with init %d: %s; answering its init", init.pid, exc)
        pids = []
    return pids or ([init.pid] if init.pid else [])


def shares_pid_namespace(spec: dict[str, Any]) -> bool:
    """Whether a container's processes live in a PID namespace not its own (its pod's, or the host's),
    as containerd's shim decides it (runc.ShouldKillAllOnExit): only a namespace of its own ends them
    all when its init exits; in a shared one they would live on, holding the container's output open
    (so containerd never sees it end) until we end them."""
    linux = spec.get("linux") if isinstance(spec.get("linux"), dict) else {}
    namespaces = linux.get("namespaces") or []
    return not any(isinstance(ns, dict) and ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)


def host_bundle(bundle: str) -> Path:
    """A bundle on this host: an absolute directory holding a config.json."""
    path = Path(bundle)
    if not path.is_absolute() or not (path / "config.json").is_file():
        raise InvalidArgument(f"bundle {bundle!r} has no config.json")
    return path


def parse_exec_spec(req: task.ExecProcessRequest) -> dict[str, Any]:
    """The OCI Process of an Exec, checked to be a JSON object with args."""
    if len(req.spec.value) > MAX_SPEC_BYTES:
        raise InvalidArgument("exec process spec is too large")
    try:
        spec = json.loads(req.spec.value)
    except ValueError:
        raise InvalidArgument("exec spec is not an OCI Process JSON") from None
    if not isinstance(spec, dict) or not spec.get("args"):
        raise InvalidArgument("exec spec has no args")
    return spec


def signal_quietly(pid: int, sig: int) -> None:
    """Signal `pid`; one that is already gone is not an error. No pid (0, or less) is no process: to
    kill(2) it would be our own process group, or every process we may signal."""
    if pid <= 0:
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# How long a Delete lets a process's copied output reach containerd before it closes the copy
# (containerd's shim waits up to 10 s; ours ends by itself within iopump.FINISH_LIMIT of the exit
# unless containerd's reader is behind).
OUTPUT_DRAIN_TIMEOUT = 2.0


async def drain_and_close_io(procs: Iterable[Any]) -> None:
    """Processes being deleted, all gone: what they left reaches containerd (each given up to
    OUTPUT_DRAIN_TIMEOUT, all at once), then their IO is closed."""
    procs = list(procs)
    await asyncio.gather(*(proc.io.drain_output(OUTPUT_DRAIN_TIMEOUT) for proc in procs))
    for proc in procs:
        proc.io.close()


@dataclass
class TaskProcess:
    """A container's init (id "") or one of its execs."""

    id: str
    _: KW_ONLY
    pid: int = 0
    status: int = types.CREATED
    exit_status: int = 0
    exited_at_ns: int = 0
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    # An exec's Start and Delete take turns on it (ContainerTasks._holding_exec); the init's go by the
    # container's exclusive hold.
    turn: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False)
    # Its Start is under way. An exec's: a container's init that exits meanwhile reports its exit after
    # this one's (`unfinished_execs`). Either's: its own exit, if it comes meanwhile, is published after
    # its start event (`exit_held`), as containerd's shim orders them.
    starting: bool = False
    exit_held: bool = False
    # An init that has exited, its exit held until its execs' are in (`report_init_exit_last`). Its pid
    # may be another process's by then.
    reaped: bool = False

    def set_exited(self, exited: Exit) -> None:
        self.record_exit(exited.status, exited.at_ns)

    def record_exit(self, status: int, at_ns: int) -> None:
        self.status, self.exit_status, self.exited_at_ns = types.STOPPED, status, at_ns
        self.exited.set()


@dataclass
class TaskContainer:
    """A container; a subclass adds its `namespace` and `init` (and whatever else it keeps)."""

    id: str
    bundle: Path
    _: KW_ONLY
    execs: dict[str, Any] = field(default_factory=dict)
    rootfs_mounted: bool = False

    def process(self, exec_id: str) -> Any:
        if not exec_id:
            return self.init  # type: ignore[attr-defined]
        proc = self.execs.get(exec_id)
        if proc is None:
            raise NotFound(f"exec {exec_id} not found in container {self.id}")
        return proc

    def processes(self) -> list[Any]:
        return [self.init, *self.execs.values()]  # type: ignore[attr-defined]

    def require_init(self, status: int, action: str) -> None:
        """Refuse `action` (pause, resume) unless the init is in `status`: checked before the runtime runs,
        and again after it, where the reaper may have recorded the init's exit meanwhile."""
        current = self.init.status  # type: ignore[attr-defined]
        if current != status:
            raise FailedPrecondition(f"cannot {action} container {self.id}: it is {types.Status.Name(current).lower()}")

    def created_process(self, exec_id: str) -> Any:
        """The process Start may start: one still in created state."""
        proc = self.process(exec_id)
        if proc.status != types.CREATED:
            raise FailedPrecondition(f"process {exec_id or self.id} is not in created state")
        return proc

    def check_new_exec(self, exec_id: str) -> None:
        """Exec may add `exec_id`: it is new and the container has not stopped, nor is paused (as
        containerd's shim refuses it there, rather than publish an exec that could never start)."""
        if exec_id in self.execs:
            raise AlreadyExists(f"exec {exec_id} already exists in container {self.id}")
        if self.init.status == types.STOPPED:  # type: ignore[attr-defined]
            raise FailedPrecondition(f"container {self.id} is stopped")
        if self.init.status == types.PAUSED:  # type: ignore[attr-defined]
            raise FailedPrecondition(f"cannot exec in paused container {self.id}")


# How long an init's exit waits for its execs' (they are ending: the kernel ended its PID namespace, or
# we ended the rest of a shared one); one stuck in the kernel must not hide the init's exit for ever.
EXECS_EXIT_WAIT = 10.0


def unfinished_execs(container: TaskContainer) -> list[TaskProcess]:
    """A container's execs that are running, or being started, whose exit is not recorded yet."""
    return [e for e in container.execs.values() if (e.starting or e.pid) and e.status != types.STOPPED]


def report_init_exit_last(container: TaskContainer, execs: list[TaskProcess],
                          report: Callable[[], None]) -> asyncio.Future[None]:
    """`report` the exit of a container's init once `execs` (`unfinished_execs`, ending with it: its PID
    namespace is gone, or the rest of a shared one was ended) have exited, as containerd's shim does
    (handleInitExit): the init's exit is the container's last, and its Wait returns after theirs. From
    now on the init counts as `reaped` (its pid may be another's: not to be signalled), and an exec
    Start is refused. One stuck in the kernel is not waited for past EXECS_EXIT_WAIT."""
    container.init.reaped = True  # type: ignore[attr-defined]

    async def after_execs() -> None:
        if not await wait_exited(execs, EXECS_EXIT_WAIT):
            log.warning("container %s: execs still running %.0f s after its init exited; reporting its exit",
                        container.id, EXECS_EXIT_WAIT)
        report()

    return asyncio.ensure_future(after_execs())


async def wait_exited(procs: Iterable[TaskProcess], timeout: float) -> bool:
    """Wait until every one of `procs` has exited; False if `timeout` seconds pass first."""
    waits = [proc.exited.wait() for proc in procs]
    if not waits:
        return True
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*waits)
        return True
    except TimeoutError:
        return False


def state_response(req: task.StateRequest, container: Any, proc: Any) -> task.StateResponse:
    """State of `proc` (with its `io`) of `container`. A running exec of a paused container is PAUSED:
    it is frozen with the rest of the cgroup, which only the init's status records (containerd's shim
    too answers for an exec with its container's paused state)."""
    status = proc.status
    if req.exec_id and status == types.RUNNING and container.init.status == types.PAUSED:
        status = types.PAUSED
    io = proc.io
    response = task.StateResponse(
        id=req.id, exec_id=req.exec_id, bundle=str(container.bundle), pid=proc.pid, status=status,
        stdin=io.stdin, stdout=io.stdout, stderr=io.stderr, terminal=io.terminal, exit_status=proc.exit_status)
    set_timestamp(response, "exited_at", proc.exited_at_ns)
    return response


def wait_response(proc: TaskProcess) -> task.WaitResponse:
    response = task.WaitResponse(exit_status=proc.exit_status)
    set_timestamp(response, "exited_at", proc.exited_at_ns)
    return response


def delete_response(proc: TaskProcess) -> task.DeleteResponse:
    response = task.DeleteResponse(pid=proc.pid, exit_status=proc.exit_status)
    set_timestamp(response, "exited_at", proc.exited_at_ns)
    return response


class ContainerTasks(TaskBackend):
    """A TaskBackend's containers by id, with a lock each, and what every backend answers alike.

    A container's lock is shared by what concerns one of its execs alone (its Exec, Start and Delete;
    each exec's Start and Delete also take turns on its own `turn`) and held exclusively by all else
    (Create, the init's Start, Delete, Pause, Resume, runc's Update). Not one plain lock: an exec's
    Start (`runc exec`, ~20 ms) then waited for every other's, so exec probes due together queued
    (containerd's shim starts them side by side). An exec's Start touches only what is its own (its
    files are named after it) and reads the init's state, which only exclusive holders change; so
    what changes the whole container still waits until no exec is being started: a Pause must not
    freeze it under one (runc refuses an exec into a frozen container, and a start waits on a frozen
    process), nor a Delete remove it, nor the init's Start overlap one. Simpler than a lock per
    process, which every container-wide call would have to take for each exec.
    """

    events: Publisher
    version = VERSION

    def __init__(self) -> None:
        self.containers: dict[str, Any] = {}
        self._locks = KeyedLocks()

    def namespace_of(self, container_id: str) -> str | None:
        """The containerd namespace a container was created in; None for an id not known here."""
        container = self.containers.get(container_id)
        return getattr(container, "namespace", None) if container is not None else None

    def _get(self, container_id: str) -> Any:
        container = self.containers.get(validate_id(container_id, "container id"))
        if container is None:
            raise NotFound(f"container {container_id} not found")
        return container

    def _lock(self, container_id: str, shared: bool = False) -> contextlib.AbstractAsyncContextManager[None]:
        return self._locks.hold(container_id, shared)

    @contextlib.asynccontextmanager
    async def _creating(self, req: task.CreateTaskRequest) -> AsyncIterator[tuple[Path, dict[str, Any]]]:
        """What every Create of a host bundle begins with: a valid id, its lock held, the id not taken
        (`_refuse_known_id`); the bundle and its spec."""
        validate_id(req.id, "container id")
        bundle = host_bundle(req.bundle)
        async with self._lock(req.id):
            self._refuse_known_id(req.id)
            yield bundle, read_bundle_spec(bundle)

    def _refuse_known_id(self, container_id: str) -> None:
        if container_id in self.containers:
            raise AlreadyExists(f"container {container_id} already exists")

    @contextlib.asynccontextmanager
    async def _holding(self, container_id: str, shared: bool = False) -> AsyncIterator[Any]:
        """The container, with its lock held (exclusively unless `shared`). NotFound if it is gone by
        the time the lock is ours: a Delete that went first (the container may even have been created
        again under the same id, which is not the one the caller asked about)."""
        container = self._get(container_id)
        async with self._lock(container_id, shared):
            if self.containers.get(container_id) is not container:
                raise NotFound(f"container {container_id} not found")
            yield container

    @contextlib.asynccontextmanager
    async def _holding_exec(self, container_id: str, exec_id: str) -> AsyncIterator[tuple[Any, Any]]:
        """The container, held shared, and its exec `exec_id`, its turn ours: of two Starts of one exec
        the second finds it started (or failed) and is refused, and a Delete never finds it half started.
        NotFound if the exec was deleted (perhaps added again) while the caller waited."""
        async with self._holding(container_id, shared=True) as container:
            proc = container.process(exec_id)
            async with proc.turn:
                if container.execs.get(exec_id) is not proc:
                    raise NotFound(f"exec {exec_id} not found in container {container_id}")
                yield container, proc

    def _forget(self, container_id: str) -> None:
        self.containers.pop(container_id, None)

    # -- events ------------------------------------------------------------------------------------
    def _publish(self, event: Message, namespace: str) -> None:
        self.events.publish(TASK_EVENT_TOPICS[type(event)], event, namespace)

    def _publish_exit(self, container: Any, proc: TaskProcess) -> None:
        """`/tasks/exit` for a process whose exit is recorded; for a container's init, after `/tasks/oom`
        if an OOM kill not reported yet ended it (OomWatch.check_now)."""
        if proc.starting:
            proc.exit_held = True  # published by its Start (`_start_over`), after the start event
            return
        oom = getattr(container, "oom", None)
        if oom is not None and not proc.id:
            oom.check_now()
        self._publish(events.TaskExit(
            container_id=container.id, id=proc.id or container.id, pid=proc.pid,
            exit_status=proc.exit_status, exited_at=timestamp(proc.exited_at_ns)), container.namespace)

    def _record_exit(self, container: Any, proc: TaskProcess, exited: Exit) -> None:
        """`proc` has exited (its exit reaped as `exited`): record it, and tell containerd."""
        proc.set_exited(exited)
        log.info("container %s exec %r pid %d exited %d", container.id, proc.id, proc.pid, exited.status)
        self._publish_exit(container, proc)

    def _publish_delete(self, req: task.DeleteRequest, proc: TaskProcess, namespace: str) -> None:
        self._publish(events.TaskDelete(
            container_id=req.id, id=req.exec_id or req.id, pid=proc.pid, exit_status=proc.exit_status,
            exited_at=timestamp(proc.exited_at_ns)), namespace)

    def _publish_create(self, req: task.CreateTaskRequest, bundle: str, pid: int, namespace: str) -> None:
        self._publish(events.TaskCreate(
            container_id=req.id, bundle=bundle, rootfs=req.rootfs, pid=pid,
            io=events.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal)),
            namespace)

    def _publish_started(self, req: task.StartRequest, pid: int, namespace: str) -> None:
        """`/tasks/exec-started` for an exec, `/tasks/start` for a container's init."""
        if req.exec_id:
            self._publish(events.TaskExecStarted(container_id=req.id, exec_id=req.exec_id, pid=pid), namespace)
        else:
            self._publish(events.TaskStart(container_id=req.id, pid=pid), namespace)

    def _publish_paused(self, container_id: str, paused: bool, namespace: str) -> None:
        if paused:
            self._publish(events.TaskPaused(container_id=container_id), namespace)
        else:
            self._publish(events.TaskResumed(container_id=container_id), namespace)

    def _publish_exec_added(self, req: task.ExecProcessRequest, namespace: str) -> None:
        self._publish(events.TaskExecAdded(container_id=req.id, exec_id=req.exec_id), namespace)

    def _on_oom(self, container: Any) -> None:
        log.info("container %s: OOM kill in its memory cgroup", container.id)
        self._publish(events.TaskOOM(container_id=container.id), container.namespace)

    # -- answers alike in every backend ----------------------------------------------------------------
    def _is_running(self, proc: TaskProcess) -> bool:
        """Whether Delete must refuse `proc` as still running."""
        return proc.status in (types.RUNNING, types.PAUSED)

    async def start(self, req: task.StartRequest, ctx: Context) -> task.StartResponse:
        if req.exec_id:
            proc = await self._start_exec(req)
        else:
            async with self._holding(req.id) as container:
                proc = container.created_process("")
                proc.starting = True
                try:
                    await self._start_init(container, proc)
                except BaseException:
                    self._start_over(container, proc)
                    raise
                self._publish_started(req, proc.pid, container.namespace)
                self._start_over(container, proc)
        log.info("container %s exec %r started pid %d", req.id, req.exec_id, proc.pid)
        return task.StartResponse(pid=proc.pid)

    async def _start_init(self, container: Any, proc: Any) -> None:
        """Start a created container's init (the container held exclusively); it runs once this returns."""
        raise NotImplementedError

    async def _run_exec(self, container: Any, proc: Any) -> None:
        """Start an exec's process (the container held shared, the exec's turn ours) and learn its pid."""
        raise NotImplementedError

    async def _start_exec(self, req: task.StartRequest) -> Any:
        """Start an exec still created in a running container, beside its other execs being started."""
        async with self._holding_exec(req.id, req.exec_id) as (container, proc):
            container.created_process(req.exec_id)
            # (not paused: Pause waits for this hold; not an init that exited, its exit held for execs')
            if container.init.status != types.RUNNING or container.init.reaped:
                raise FailedPrecondition(f"container {req.id} is not running")
            proc.starting = True
            try:
                await self._run_exec(container, proc)
            except BaseException:
                if not proc.exited.is_set():
                    # No exit will come for it: Wait (which containerd calls before Start, and CRI's
                    # ExecSync never cancels) must still return, as containerd's shims end it.
                    proc.record_exit(NEVER_RAN_EXIT_STATUS, time.time_ns())
                self._start_over(container, proc)
                raise
            if proc.status == types.CREATED:
                proc.status = types.RUNNING
            self._publish_started(req, proc.pid, container.namespace)
            self._start_over(container, proc)
            if container.init.reaped and proc.status != types.STOPPED:
                # Started as its init exited: its exit must come before the init's, and nothing else
                # would end it (the rest of a shared PID namespace was ended before it joined).
                log.info("container %s: exec %s started as its init exited; ending it", req.id, req.exec_id)
                await self._end_late_exec(container, proc)
        return proc

    def _start_over(self, container: Any, proc: TaskProcess) -> None:
        """A process's Start is over, done or failed: publish the exit it held meanwhile."""
        proc.starting = False
        if proc.exit_held:
            proc.exit_held = False
            self._publish_exit(container, proc)

    async def _end_late_exec(self, container: Any, proc: Any) -> None:
        """SIGKILL an exec that started while its container's init was exiting."""
        raise NotImplementedError

    async def _delete_exec(self, container: Any, proc: Any) -> None:
        """An exec is being deleted (its container stays): release what it holds."""

    async def _remove(self, container: Any) -> None:
        """A container is being deleted: undo everything it holds and forget it."""
        raise NotImplementedError

    def _refuse_running(self, proc: TaskProcess, req: task.DeleteRequest) -> None:
        if self._is_running(proc):
            raise FailedPrecondition(f"process {req.exec_id or req.id} is still running")

    def _delete_response(self, proc: TaskProcess) -> task.DeleteResponse:
        return delete_response(proc)

    async def delete(self, req: task.DeleteRequest, ctx: Context) -> task.DeleteResponse:
        if req.exec_id:
            async with self._holding_exec(req.id, req.exec_id) as (container, proc):
                self._refuse_running(proc, req)
                await self._delete_exec(container, proc)
                if proc.status == types.CREATED:
                    # Never started (its Start refused: the init gone, paused, or the Start cancelled while
                    # it waited): no exit will ever come for it, and a Wait on it must not outlive it.
                    proc.record_exit(NEVER_RAN_EXIT_STATUS, time.time_ns())
                del container.execs[req.exec_id]
        else:
            async with self._holding(req.id) as container:
                proc = container.init
                self._refuse_running(proc, req)
                await self._remove(container)
                for never_ran in container.execs.values():
                    if not never_ran.exited.is_set():  # its Start refused: a Wait on it must not outlive it
                        never_ran.record_exit(NEVER_RAN_EXIT_STATUS, time.time_ns())
        response = self._delete_response(proc)
        if not req.exec_id:  # as containerd's shim: an exec's delete is no task's
            self._publish_delete(req, proc, container.namespace)
        log.info("container %s exec %r deleted (exit %d)", req.id, req.exec_id, proc.exit_status)
        return response

    async def wait(self, req: task.WaitRequest, ctx: Context) -> task.WaitResponse:
        proc = self._get(req.id).process(req.exec_id)
        await proc.exited.wait()
        return wait_response(proc)

    async def connect(self, req: task.ConnectRequest, ctx: Context) -> task.ConnectResponse:
        container = self._get(req.id)
        return task.ConnectResponse(shim_pid=os.getpid(), task_pid=container.init.pid, version=self.version)


class TerminalTasks(ContainerTasks):
    """Backends whose processes may have a terminal: each process's `io` resizes its pty, closes the
    copy into it and ends the copy out of it when the process exits (fifo_stdio.ProcessIO, the
    vm-agent's streams)."""

    def _publish_exit(self, container: Any, proc: TaskProcess) -> None:
        proc.io.process_exited()  # before containerd hears of the exit, as the shim shuts its console
        super()._publish_exit(container, proc)

    async def resize_pty(self, req: task.ResizePtyRequest, ctx: Context) -> empty_pb2.Empty:
        self._get(req.id).process(req.exec_id).io.resize(req.width, req.height)
        return empty_pb2.Empty()

    async def close_io(self, req: task.CloseIORequest, ctx: Context) -> empty_pb2.Empty:
        # The process sees end of input once containerd has closed its end of the stdin FIFO and our
        # write end is closed here (fifo_stdio.ProcessIO._hold_stdin); with a terminal our copy into
        # the pty stops too.
        proc = self._get(req.id).process(req.exec_id)
        if req.stdin:
            proc.io.close_stdin()
        return empty_pb2.Empty()
