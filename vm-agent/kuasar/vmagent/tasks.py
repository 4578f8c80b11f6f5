"""`containerd.task.v3.Task` (and v2) inside the guest: the pod's containers, run with runc.

Bundles come from the host through the shared directory: `CreateTaskRequest.bundle` is used when
it is a guest path holding a `config.json`, otherwise `<share>/<container id>` (Kuasar's layout).
runc's state, pid files and logs stay in the guest's tmpfs (`<state>/<id>/`). Stdio is containerd's
streaming IO (or guest paths), see `stdio.py`.
"""

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
from kuasar.common.ids import validate_id
from kuasar.common.oom import OomWatch
from kuasar.common.reaper import Exit, Reaper
from kuasar.common.streaming_io import StreamHub
from kuasar.common.task_api import TaskBackend
from kuasar.common.ttrpc import Context

from .events import EventQueue
from .runc import Runc, Stdio
from .stdio import ProcessIO

log = logging.getLogger(__name__)

MAX_SPEC_BYTES = 1 << 20
VERSION = "kuasar-py vm-agent"
# After a process exits, how long Wait/Delete let its output drain into the streams.
OUTPUT_DRAIN_TIMEOUT = 2.0


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
    state: Path
    namespace: str
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)
    rootfs_mounted: bool = False
    oom: OomWatch | None = None

    @property
    def log(self) -> Path:
        return self.state / "log.json"

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        proc = self.execs.get(exec_id)
        if proc is None:
            raise NotFound(f"exec {exec_id} not found in container {self.id}")
        return proc


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns or time.time_ns())
    return ts


def _set_ts(message: Message, name: str, ns: int) -> None:
    if ns:
        getattr(message, name).FromNanoseconds(ns)


class GuestTasks(TaskBackend):
    def __init__(self, reaper: Reaper, hub: StreamHub, events_queue: EventQueue, state_dir: Path,
                 share_dir: str | None, runc_binary: str = "runc", no_pivot: bool = False) -> None:
        self.reaper = reaper
        self.hub = hub
        self.events = events_queue
        self.state_dir = state_dir
        self.share_dir = Path(share_dir) if share_dir else None
        self.runc = Runc(reaper, state_dir / "runc", runc_binary, no_pivot=no_pivot)
        self.containers: dict[str, Container] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _get(self, container_id: str) -> Container:
        container = self.containers.get(validate_id(container_id, "container id"))
        if container is None:
            raise NotFound(f"container {container_id} not found")
        return container

    def _lock(self, container_id: str) -> asyncio.Lock:
        return self._locks.setdefault(container_id, asyncio.Lock())

    def resolve_bundle(self, container_id: str, requested: str) -> Path:
        candidates = []
        if requested and os.path.isabs(requested):
            candidates.append(Path(requested))
        if self.share_dir is not None:
            candidates.append(self.share_dir / container_id)
        for candidate in candidates:
            if (candidate / "config.json").is_file():
                return candidate
        where = " or ".join(str(c) for c in candidates) or "(no shared directory)"
        raise InvalidArgument(f"no bundle for container {container_id}: no config.json in {where}")

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
        async with self._lock(req.id):
            if req.id in self.containers:
                raise AlreadyExists(f"container {req.id} already exists")
            bundle = self.resolve_bundle(req.id, req.bundle)
            state = self.state_dir / req.id
            state.mkdir(parents=True, exist_ok=True, mode=0o700)
            io = ProcessIO(self.hub, req.stdin, req.stdout, req.stderr, req.terminal)
            container = Container(req.id, bundle, state, ctx.namespace or "k8s.io", Process("", io))
            if req.rootfs:
                mounts.mount_rootfs(req.rootfs, bundle / "rootfs")
                container.rootfs_mounted = True
            try:
                await self._start_process(container, container.init, is_exec=False)
            except BaseException:
                if container.rootfs_mounted:
                    mounts.unmount_all(bundle / "rootfs")
                io.close()
                raise
            self.containers[req.id] = container
        log.info("container %s created, pid %d, bundle %s", req.id, container.init.pid, bundle)
        self.events.publish("/tasks/create", events.TaskCreate(
            container_id=req.id, bundle=str(bundle), rootfs=req.rootfs, pid=container.init.pid,
            io=events.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal)),
            container.namespace)
        return task.CreateTaskResponse(pid=container.init.pid)

    async def _start_process(self, container: Container, proc: Process, is_exec: bool) -> None:
        """`runc create` for init, `runc exec --detach` for an exec; learn the pid, watch its exit."""
        io = proc.io
        console = None
        receiving = None
        stdio = Stdio()
        if io.terminal:
            console = container.state / f"console-{secrets.token_hex(6)}.sock"
            io.listen_console(console)
            receiving = asyncio.create_task(io.receive_console())
        else:
            stdio = io.runc_stdio()
        pid_file = container.state / (f"{proc.id}.pid" if is_exec else "init.pid")
        try:
            if is_exec:
                process_json = container.state / f"{proc.id}.process.json"
                process_json.write_bytes(proc.spec)
                try:
                    await self.runc.exec(container.id, process_json, pid_file, container.log, stdio, console)
                finally:
                    process_json.unlink(missing_ok=True)
            else:
                await self.runc.create(container.id, container.bundle, pid_file, container.log, stdio, console)
            if receiving is not None:
                await receiving
        except BaseException:
            if receiving is not None:
                receiving.cancel()
            io.release_child_fds()
            raise
        io.release_child_fds()
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
                await self._start_process(container, proc, is_exec=True)
                if proc.status == types.CREATED:
                    proc.status = types.RUNNING
                self.events.publish("/tasks/exec-started", events.TaskExecStarted(
                    container_id=req.id, exec_id=req.exec_id, pid=proc.pid), container.namespace)
            else:
                await self.runc.start(req.id, container.log)
                if proc.status == types.CREATED:
                    proc.status = types.RUNNING
                    container.oom = OomWatch(proc.pid, lambda: self._on_oom(container))
                self.events.publish("/tasks/start", events.TaskStart(container_id=req.id, pid=proc.pid),
                                    container.namespace)
        log.info("container %s exec %r started, pid %d", req.id, req.exec_id, proc.pid)
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
            io = ProcessIO(self.hub, req.stdin, req.stdout, req.stderr, req.terminal)
            container.execs[req.exec_id] = Process(req.exec_id, io, spec=json.dumps(spec).encode())
        self.events.publish("/tasks/exec-added", events.TaskExecAdded(container_id=req.id, exec_id=req.exec_id),
                            container.namespace)
        return empty_pb2.Empty()

    async def kill(self, req: task.KillRequest, ctx: Context) -> empty_pb2.Empty:
        container = self._get(req.id)
        proc = container.process(req.exec_id)
        if proc.status == types.STOPPED:
            raise NotFound(f"process {req.exec_id or req.id} already finished")
        if req.exec_id:
            if proc.pid:
                try:
                    os.kill(proc.pid, req.signal)
                except ProcessLookupError:
                    pass
            return empty_pb2.Empty()
        await self.runc.kill(req.id, req.signal, all_processes=req.all)
        return empty_pb2.Empty()

    async def wait(self, req: task.WaitRequest, ctx: Context) -> task.WaitResponse:
        proc = self._get(req.id).process(req.exec_id)
        await proc.exited.wait()
        response = task.WaitResponse(exit_status=proc.exit_status)
        _set_ts(response, "exited_at", proc.exited_at_ns)
        return response

    async def delete(self, req: task.DeleteRequest, ctx: Context) -> task.DeleteResponse:
        container = self._get(req.id)
        async with self._lock(req.id):
            proc = container.process(req.exec_id)
            if proc.status in (types.RUNNING, types.PAUSED) and proc.pid:
                raise FailedPrecondition(f"process {req.exec_id or req.id} is still running")
            if req.exec_id:
                await proc.io.wait_output(OUTPUT_DRAIN_TIMEOUT)
                proc.io.close()
                del container.execs[req.exec_id]
            else:
                await self._remove(container)
        response = task.DeleteResponse(pid=proc.pid, exit_status=proc.exit_status)
        _set_ts(response, "exited_at", proc.exited_at_ns)
        self.events.publish("/tasks/delete", events.TaskDelete(
            container_id=req.id, id=req.exec_id or req.id, pid=proc.pid, exit_status=proc.exit_status,
            exited_at=_ts(proc.exited_at_ns)), container.namespace)
        log.info("container %s exec %r deleted (exit %d)", req.id, req.exec_id, proc.exit_status)
        return response

    async def _remove(self, container: Container) -> None:
        await self.runc.delete(container.id)
        for proc in [container.init, *container.execs.values()]:
            await proc.io.wait_output(OUTPUT_DRAIN_TIMEOUT)
            proc.io.close()
        if container.oom is not None:
            container.oom.close()
        if container.rootfs_mounted:
            mounts.unmount_all(container.bundle / "rootfs")
        for leftover in container.state.glob("*"):
            leftover.unlink(missing_ok=True)
        try:
            container.state.rmdir()
        except OSError:
            pass
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
        _set_ts(response, "exited_at", proc.exited_at_ns)
        return response

    async def pids(self, req: task.PidsRequest, ctx: Context) -> task.PidsResponse:
        container = self._get(req.id)
        if container.init.status == types.STOPPED:
            return task.PidsResponse()
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
        path = container.state / "update-resources.json"
        path.write_bytes(req.resources.value or b"{}")
        try:
            await self.runc.update(req.id, path)
        finally:
            path.unlink(missing_ok=True)
        return empty_pb2.Empty()

    # -- whole guest ---------------------------------------------------------------------------------
    async def stop_all(self, grace: float) -> None:
        """SIGTERM every running container, SIGKILL after `grace` seconds, then delete them all."""
        running = [c for c in self.containers.values() if c.init.status != types.STOPPED]
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if not running or (sig == signal.SIGTERM and grace <= 0):
                continue
            for container in running:
                try:
                    await self.runc.kill(container.id, sig, all_processes=True)
                except Exception as err:  # noqa: BLE001 - best effort while powering off
                    log.debug("kill %s: %s", container.id, err)
            try:
                async with asyncio.timeout(wait):
                    await asyncio.gather(*(c.init.exited.wait() for c in running))
            except TimeoutError:
                pass
            running = [c for c in running if c.init.status != types.STOPPED]
        for container in list(self.containers.values()):
            try:
                await self._remove(container)
            except Exception as err:  # noqa: BLE001
                log.warning("removing container %s: %s", container.id, err)
