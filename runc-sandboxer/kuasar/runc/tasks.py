"""Task API for runc containers, served by the task server (one process for every pod of the node)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from kuasar.common import cgroups, mounts
from kuasar.common.api.containerd.events import task_pb2 as events
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from kuasar.common.events import EventPublisher
from kuasar.common.ids import validate_id
from kuasar.common.oom import OomWatch
from kuasar.common.reaper import Exit, Reaper
from kuasar.common.task_api import TaskBackend
from kuasar.common.ttrpc import Context

from .runc import Runc, Stdio
from .stdio import ProcessIO

log = logging.getLogger(__name__)

# CRI (and cri-o, and Kuasar) name the pod of a container with one of these annotations.
SANDBOX_ID_ANNOTATIONS = ("io.kubernetes.cri.sandbox-id", "io.kubernetes.cri-o.SandboxID",
                          "io.kubernetes.sandbox.id")
# OCI Process JSON larger than this is not a process spec (containerd's whole message cap is 4 MiB).
MAX_SPEC_BYTES = 1 << 20
VERSION = "kuasar-py"


@dataclass
class Process:
    id: str
    io: ProcessIO
    pid: int = 0
    status: int = types.CREATED
    exit_status: int = 0
    exited_at_ns: int = 0
    spec: bytes = b""
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    def set_exited(self, exited: Exit) -> None:
        self.status, self.exit_status, self.exited_at_ns = types.STOPPED, exited.status, exited.at_ns
        self.exited.set()


@dataclass
class Container:
    id: str
    bundle: Path
    pod_id: str
    namespace: str
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)
    rootfs_mounted: bool = False
    oom: OomWatch | None = None

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        proc = self.execs.get(exec_id)
        if proc is None:
            raise NotFound(f"exec {exec_id} not found in container {self.id}")
        return proc


def _timestamp_ns(message: Message, name: str, ns: int) -> None:
    if ns:
        getattr(message, name).FromNanoseconds(ns)


class RuncTasks(TaskBackend):
    def __init__(self, reaper: Reaper, events: EventPublisher, directory: Path, runc_binary: str = "runc") -> None:
        self.reaper = reaper
        self.events = events
        self.runc = Runc(reaper, directory / "runc", runc_binary)
        self.console_dir = directory / "console"
        self.console_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.containers: dict[str, Container] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _get(self, container_id: str) -> Container:
        container = self.containers.get(validate_id(container_id, "container id"))
        if container is None:
            raise NotFound(f"container {container_id} not found")
        return container

    def _lock(self, container_id: str) -> asyncio.Lock:
        return self._locks.setdefault(container_id, asyncio.Lock())

    def _watch(self, container: Container, proc: Process) -> None:
        def on_exit(future: asyncio.Future[Exit]) -> None:
            if future.cancelled():
                return
            exited = future.result()
            proc.set_exited(exited)
            log.info("container %s exec %r pid %d exited %d", container.id, proc.id, proc.pid, exited.status)
            self.events.publish("/tasks/exit", events.TaskExit(
                container_id=container.id, id=proc.id or container.id, pid=proc.pid,
                exit_status=exited.status, exited_at=_ts(exited.at_ns)), container.namespace)

        self.reaper.watch(proc.pid).add_done_callback(on_exit)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def create(self, req: task.CreateTaskRequest, ctx: Context) -> task.CreateTaskResponse:
        validate_id(req.id, "container id")
        bundle = Path(req.bundle)
        if not bundle.is_absolute() or not (bundle / "config.json").is_file():
            raise InvalidArgument(f"bundle {req.bundle!r} has no config.json")
        async with self._lock(req.id):
            if req.id in self.containers:
                raise AlreadyExists(f"container {req.id} already exists")
            spec = json.loads((bundle / "config.json").read_bytes())
            annotations = spec.get("annotations") or {}
            pod_id = next((annotations[k] for k in SANDBOX_ID_ANNOTATIONS if k in annotations), "")
            io = ProcessIO(req.stdin, req.stdout, req.stderr, req.terminal)
            container = Container(req.id, bundle, pod_id, ctx.namespace or bundle_namespace(bundle), Process("", io))
            if req.rootfs:
                mounts.mount_rootfs(req.rootfs, bundle / "rootfs")
                container.rootfs_mounted = True
            try:
                await self._runc_start_process(container, container.init, is_exec=False)
            except Exception:
                if container.rootfs_mounted:
                    mounts.unmount_all(bundle / "rootfs")
                raise
            self.containers[req.id] = container
        log.info("container %s created in pod %s pid %d", req.id, pod_id, container.init.pid)
        self.events.publish("/tasks/create", events.TaskCreate(
            container_id=req.id, bundle=req.bundle, rootfs=req.rootfs, pid=container.init.pid,
            io=events.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal)),
            container.namespace)
        return task.CreateTaskResponse(pid=container.init.pid)

    async def _runc_start_process(self, container: Container, proc: Process, is_exec: bool) -> None:
        """`runc create` for init, `runc exec --detach` for an exec; learn the pid, watch its exit."""
        io = proc.io
        console = None
        receiving = None
        if io.terminal:
            console = self.console_dir / f"{secrets.token_hex(8)}.sock"
            io.listen_console(console)
            receiving = asyncio.create_task(io.receive_console())
            stdio = None
        else:
            stdio = io.runc_stdio()
        pid_file = container.bundle / (f"{proc.id}.pid" if is_exec else "init.pid")
        try:
            if is_exec:
                process_json = container.bundle / f"{proc.id}.process.json"
                process_json.write_bytes(proc.spec)
                try:
                    await self.runc.exec(container.id, container.bundle, process_json, pid_file,
                                         stdio or Stdio(), console)
                finally:
                    process_json.unlink(missing_ok=True)
            else:
                await self.runc.create(container.id, container.bundle, pid_file, stdio or Stdio(), console)
            if receiving is not None:
                await receiving
        except BaseException:
            if receiving is not None:
                receiving.cancel()
            io.close()
            raise
        io.release_fds()
        proc.pid = int(pid_file.read_text().strip())
        self._watch(container, proc)

    async def start(self, req: task.StartRequest, ctx: Context) -> task.StartResponse:
        container = self._get(req.id)
        async with self._lock(req.id):
            proc = container.process(req.exec_id)
            if proc.status != types.CREATED:
                raise FailedPrecondition(f"process {req.exec_id or req.id} is not in created state")
            if req.exec_id:
                if container.init.status != types.RUNNING:
                    raise FailedPrecondition(f"container {req.id} is not running")
                await self._runc_start_process(container, proc, is_exec=True)
                if proc.status == types.CREATED:
                    proc.status = types.RUNNING
                self.events.publish("/tasks/exec-started", events.TaskExecStarted(
                    container_id=req.id, exec_id=req.exec_id, pid=proc.pid), container.namespace)
            else:
                await self.runc.start(req.id, container.bundle)
                if proc.status == types.CREATED:
                    proc.status = types.RUNNING
                    container.oom = OomWatch(proc.pid, lambda: self._on_oom(container))
                self.events.publish("/tasks/start", events.TaskStart(container_id=req.id, pid=proc.pid),
                                    container.namespace)
        log.info("container %s exec %r started pid %d", req.id, req.exec_id, proc.pid)
        return task.StartResponse(pid=proc.pid)

    def _on_oom(self, container: Container) -> None:
        log.info("container %s: OOM kill in its memory cgroup", container.id)
        self.events.publish("/tasks/oom", events.TaskOOM(container_id=container.id), container.namespace)

    async def exec(self, req: task.ExecProcessRequest, ctx: Context) -> empty_pb2.Empty:
        container = self._get(req.id)
        validate_id(req.exec_id, "exec id")
        if len(req.spec.value) > MAX_SPEC_BYTES:
            raise InvalidArgument("exec process spec is too large")
        try:
            spec = json.loads(req.spec.value)
        except ValueError:
            raise InvalidArgument("exec spec is not an OCI Process JSON") from None
        if not isinstance(spec, dict) or not spec.get("args"):
            raise InvalidArgument("exec spec has no args")
        async with self._lock(req.id):
            if req.exec_id in container.execs:
                raise AlreadyExists(f"exec {req.exec_id} already exists in container {req.id}")
            if container.init.status == types.STOPPED:
                raise FailedPrecondition(f"container {req.id} is stopped")
            spec["terminal"] = req.terminal
            proc = Process(req.exec_id, ProcessIO(req.stdin, req.stdout, req.stderr, req.terminal),
                           spec=json.dumps(spec).encode())
            container.execs[req.exec_id] = proc
        self.events.publish("/tasks/exec-added", events.TaskExecAdded(container_id=req.id, exec_id=req.exec_id),
                            container.namespace)
        return empty_pb2.Empty()

    async def kill(self, req: task.KillRequest, ctx: Context) -> empty_pb2.Empty:
        container = self._get(req.id)
        proc = container.process(req.exec_id)
        if proc.status == types.STOPPED:
            raise NotFound(f"process {req.exec_id or req.id} already finished")
        if req.exec_id:
            _signal([proc.pid] if proc.pid else [], req.signal)
        elif not self._signal_directly(container, req.signal, req.all):
            await self.runc.kill(req.id, req.signal, all_processes=req.all)
        return empty_pb2.Empty()

    def _signal_directly(self, container: Container, sig: int, all_processes: bool) -> bool:
        """Signal without a `runc kill` round trip; False when runc has to (a frozen container).

        Answering Kill before the process can die matters: containerd deletes the task (closing its
        connection) as soon as it sees the exit, and a Kill still waiting on runc then fails with
        "ttrpc: closed". Our pids cannot be reused behind our back: we are the reaper, and a reaped
        init is STOPPED.
        """
        if container.init.status == types.PAUSED:
            return False
        pids = cgroups.cgroup_procs_of(container.init.pid) if all_processes else []
        _signal(pids or [container.init.pid], sig)
        return True

    async def wait(self, req: task.WaitRequest, ctx: Context) -> task.WaitResponse:
        proc = self._get(req.id).process(req.exec_id)
        await proc.exited.wait()
        response = task.WaitResponse(exit_status=proc.exit_status)
        _timestamp_ns(response, "exited_at", proc.exited_at_ns)
        return response

    async def delete(self, req: task.DeleteRequest, ctx: Context) -> task.DeleteResponse:
        container = self._get(req.id)
        async with self._lock(req.id):
            proc = container.process(req.exec_id)
            if proc.status in (types.RUNNING, types.PAUSED) and proc.pid:
                raise FailedPrecondition(f"process {req.exec_id or req.id} is still running")
            if req.exec_id:
                proc.io.close()
                del container.execs[req.exec_id]
            else:
                await self._remove(container)
        response = task.DeleteResponse(pid=proc.pid, exit_status=proc.exit_status)
        _timestamp_ns(response, "exited_at", proc.exited_at_ns)
        self.events.publish("/tasks/delete", events.TaskDelete(
            container_id=req.id, id=req.exec_id or req.id, pid=proc.pid, exit_status=proc.exit_status,
            exited_at=_ts(proc.exited_at_ns)), container.namespace)
        log.info("container %s exec %r deleted (exit %d)", req.id, req.exec_id, proc.exit_status)
        return response

    async def _remove(self, container: Container) -> None:
        await self.runc.delete(container.id)
        for proc in [container.init, *container.execs.values()]:
            proc.io.close()
        if container.oom is not None:
            container.oom.close()
        if container.rootfs_mounted:
            mounts.unmount_all(container.bundle / "rootfs")
        self.containers.pop(container.id, None)
        self._locks.pop(container.id, None)

    # -- inspection --------------------------------------------------------------------------------
    async def state(self, req: task.StateRequest, ctx: Context) -> task.StateResponse:
        container = self._get(req.id)
        proc = container.process(req.exec_id)
        response = task.StateResponse(
            id=req.id, exec_id=req.exec_id, bundle=str(container.bundle), pid=proc.pid, status=proc.status,
            stdin=proc.io.stdin, stdout=proc.io.stdout, stderr=proc.io.stderr, terminal=proc.io.terminal,
            exit_status=proc.exit_status)
        _timestamp_ns(response, "exited_at", proc.exited_at_ns)
        return response

    async def pids(self, req: task.PidsRequest, ctx: Context) -> task.PidsResponse:
        container = self._get(req.id)
        if container.init.status == types.STOPPED:
            # The dead init, not an empty list: containerd reloading its tasks after a restart deletes a
            # task without pids as a "leaked shim" (shim_load.go), which would turn an exit that happened
            # while it was down into 255/Unknown. A deleted container answers NotFound instead.
            return task.PidsResponse(processes=[types.ProcessInfo(pid=container.init.pid)])
        pids = await self.runc.ps(req.id)
        return task.PidsResponse(processes=[types.ProcessInfo(pid=pid) for pid in pids])

    async def stats(self, req: task.StatsRequest, ctx: Context) -> task.StatsResponse:
        container = self._get(req.id)
        if container.init.status == types.STOPPED:
            raise FailedPrecondition(f"container {req.id} is stopped")
        return task.StatsResponse(stats=cgroups.metrics_for_pid(container.init.pid))

    async def connect(self, req: task.ConnectRequest, ctx: Context) -> task.ConnectResponse:
        container = self._get(req.id)
        return task.ConnectResponse(shim_pid=os.getpid(), task_pid=container.init.pid, version=VERSION)

    # -- control -----------------------------------------------------------------------------------
    async def pause(self, req: task.PauseRequest, ctx: Context) -> empty_pb2.Empty:
        container = self._get(req.id)
        await self.runc.pause(req.id)
        container.init.status = types.PAUSED
        self.events.publish("/tasks/paused", events.TaskPaused(container_id=req.id), container.namespace)
        return empty_pb2.Empty()

    async def resume(self, req: task.ResumeRequest, ctx: Context) -> empty_pb2.Empty:
        container = self._get(req.id)
        await self.runc.resume(req.id)
        container.init.status = types.RUNNING
        self.events.publish("/tasks/resumed", events.TaskResumed(container_id=req.id), container.namespace)
        return empty_pb2.Empty()

    async def resize_pty(self, req: task.ResizePtyRequest, ctx: Context) -> empty_pb2.Empty:
        self._get(req.id).process(req.exec_id).io.resize(req.width, req.height)
        return empty_pb2.Empty()

    async def close_io(self, req: task.CloseIORequest, ctx: Context) -> empty_pb2.Empty:
        proc = self._get(req.id).process(req.exec_id)
        if req.stdin:
            proc.io.close_stdin()
        return empty_pb2.Empty()

    async def update(self, req: task.UpdateTaskRequest, ctx: Context) -> empty_pb2.Empty:
        container = self._get(req.id)
        try:
            json.loads(req.resources.value or b"{}")
        except ValueError:
            raise InvalidArgument("resources is not OCI LinuxResources JSON") from None
        path = container.bundle / "update-resources.json"
        path.write_bytes(req.resources.value or b"{}")
        try:
            await self.runc.update(req.id, path)
        finally:
            path.unlink(missing_ok=True)
        return empty_pb2.Empty()

    # -- pod hooks (kuasar.common.pod_service.PodContainers) -----------------------------------------
    def pod_container_ids(self, pod_id: str) -> list[str]:
        return [c.id for c in self.containers.values() if c.pod_id == pod_id]

    async def kill_pod_containers(self, pod_id: str, sig: int) -> None:
        for container in [c for c in self.containers.values() if c.pod_id == pod_id]:
            if container.init.status != types.STOPPED and not self._signal_directly(container, sig, True):
                try:
                    await self.runc.kill(container.id, sig, all_processes=True)
                except (NotFound, Exception) as exc:  # noqa: BLE001 - best effort during pod stop
                    log.warning("pod %s: killing container %s: %s", pod_id, container.id, exc)

    async def wait_pod_containers(self, pod_id: str, timeout: float) -> bool:
        waits = [c.init.exited.wait() for c in self.containers.values()
                 if c.pod_id == pod_id and c.init.status != types.STOPPED]
        if not waits:
            return True
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*waits)
            return True
        except TimeoutError:
            return False

    async def remove_pod_containers(self, pod_id: str) -> None:
        for container in [c for c in self.containers.values() if c.pod_id == pod_id]:
            if container.init.status != types.STOPPED:
                await self.kill_pod_containers(pod_id, signal.SIGKILL)
                await self.wait_pod_containers(pod_id, 10.0)
            await self._remove(container)
            log.info("pod %s: removed leftover container %s", pod_id, container.id)


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def bundle_namespace(bundle: Path) -> str:
    """The containerd namespace of a task, for callers that send none (containerd 1.6 does not).

    containerd lays task bundles out as `<state>/io.containerd.runtime.v2.task/<namespace>/<id>`.
    """
    if bundle.parent.parent.name == "io.containerd.runtime.v2.task":
        return bundle.parent.name
    return "k8s.io"


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns or time.time_ns())
    return ts
