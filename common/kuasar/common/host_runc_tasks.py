"""Task API for runc containers of pods on the host, served by a task server (one process for every pod
of the node): every container of runc-sandboxer's pods, and the Linux containers of wasm-sandboxer's
(an image whose entrypoint is not a WebAssembly module: a sidecar, a log shipper)."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import empty_pb2

from . import cgroup_attach, cgroups, mounts
from .api.containerd.events import task_pb2 as events
from .api.containerd.runtime.task.v2 import shim_pb2 as task
from .api.containerd.types.task import task_pb2 as types
from .errors import FailedPrecondition, NotFound, Unimplemented
from .events import EventPublisher
from .fifo_stdio import ProcessIO
from .pod_files import pod_dir, rewrite_container_spec
from .reaper import Reaper
from .runc_checkpoint import (
    CRIU_CONFIG_NAME,
    RestorePlan,
    criu_configured,
    external_files,
    external_stdio,
    plan_checkpoint,
    plan_restore,
    require_criu,
    use_criu_config,
    write_external_stdio,
)
from .runc_cli import Runc, Stdio
from .runc_tasks import RuncContainer, RuncContainerTasks, RuncProcess
from .task_table import (
    pod_id_of,
    shares_pid_namespace,
    signal_quietly,
    wait_exited,
)
from .ttrpc import Context

log = logging.getLogger(__name__)


def user_namespace_path(spec: dict) -> str:
    """The user namespace a container joins (CRI's hostUsers: false: its pod's), "" for none."""
    namespaces = (spec.get("linux") or {}).get("namespaces") or []
    return next((ns.get("path") or "" for ns in namespaces if ns.get("type") == "user"), "")


@dataclass
class Container(RuncContainer):
    """runc-sandboxer keeps a container's files in containerd's bundle, and knows its pod."""

    pod_id: str = ""


class RuncTasks(RuncContainerTasks):
    restores_checkpoints = True

    def __init__(self, reaper: Reaper, events: EventPublisher, directory: Path, runc_binary: str = "runc") -> None:
        super().__init__()
        self.reaper = reaper
        self.events = events
        self.directory = directory
        self.runc = Runc(reaper, directory / "runc", runc_binary)
        self.console_dir = directory / "console"
        self.console_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.containers: dict[str, Container] = {}
        self.attach_warmer = cgroup_attach.WARMER

    def _console_socket(self, container: Container) -> Path:
        return self.console_dir / f"{os.urandom(8).hex()}.sock"

    async def sweep_leftovers(self) -> None:
        # A console socket lives while runc creates a terminal process; a task server that died then left
        # it, under a random name nothing reuses. None is in use before this task server serves.
        for stale in self.console_dir.glob("*.sock"):
            stale.unlink(missing_ok=True)
        await super().sweep_leftovers()

    def _process_io(self, req: task.ExecProcessRequest) -> ProcessIO:
        return ProcessIO(req.stdin, req.stdout, req.stderr, req.terminal)

    def _release_io(self, io: ProcessIO) -> None:
        io.release_fds()

    def _discard_io(self, io: ProcessIO) -> None:
        io.close()

    # -- lifecycle ---------------------------------------------------------------------------------
    async def create(self, req: task.CreateTaskRequest, ctx: Context) -> task.CreateTaskResponse:
        restore = self._plan_restore(req)
        async with self._creating(req) as (bundle, spec):
            pod_id = pod_id_of(spec.get("annotations") or {})
            io = ProcessIO(req.stdin, req.stdout, req.stderr, req.terminal)
            container = Container(req.id, bundle, bundle, ctx.namespace or bundle_namespace(bundle),
                                  RuncProcess("", io), shares_pids=shares_pid_namespace(spec), pod_id=pod_id,
                                  restore=restore)
            if req.rootfs:
                mounts.mount_rootfs(req.rootfs, bundle / "rootfs", user_namespace_path(spec))
                container.rootfs_mounted = True
            try:
                rewrite_container_spec(bundle, spec, pod_dir(self.directory, pod_id) if pod_id else None,
                                       changed=use_criu_config(spec, bundle))
                if restore is None:
                    await self._start_process(container, container.init, is_exec=False)
            except BaseException:  # also a cancelled Create (its deadline, its connection gone)
                if container.rootfs_mounted:
                    mounts.unmount_all(bundle / "rootfs")
                raise
            self.containers[req.id] = container
        log.info("container %s created in pod %s pid %d", req.id, pod_id, container.init.pid)
        self._publish_create(req, req.bundle, container.init.pid, container.namespace)
        return task.CreateTaskResponse(pid=container.init.pid)

    @staticmethod
    def _plan_restore(req: task.CreateTaskRequest) -> RestorePlan | None:
        """What a Create naming a checkpoint restores; checked before anything is mounted."""
        if not req.checkpoint:
            return None
        if req.terminal:
            # CRIU would need the old terminal as an external one and runc the new one's console: neither
            # is set up here.
            raise Unimplemented(f"container {req.id}: restoring a container with a terminal is not supported")
        plan = plan_restore(req.checkpoint)
        require_criu()
        return plan

    async def _start_init(self, container: Container, proc: RuncProcess) -> None:
        if container.restore is None:
            await super()._start_init(container, proc)
            return
        with criu_configured(container.files / CRIU_CONFIG_NAME, container.restore,
                             inherit=container.restore.inherit):
            await self._start_process(container, proc, is_exec=False)
        container.restore = None  # restored: what is left is a running container's
        if proc.status == types.CREATED:
            proc.status = types.RUNNING
        log.info("container %s restored from a checkpoint, pid %d", container.id, proc.pid)

    async def _run_runc(self, container: Container, proc: RuncProcess, is_exec: bool, pid_file: Path,
                        stdio: Stdio, console: Path | None) -> None:
        if is_exec or container.restore is None:
            await super()._run_runc(container, proc, is_exec, pid_file, stdio, console)
            return
        await self.runc.restore(container.id, container.bundle, pid_file, container.log, stdio,
                                container.restore.runc_args())

    async def kill(self, req: task.KillRequest, ctx: Context) -> empty_pb2.Empty:
        container = self._get(req.id)
        if not req.exec_id and not container.init.pid:
            # A restore whose Start has not run: no process yet (as runc says of such a container).
            raise NotFound(f"container {req.id} has no process yet: its restore has not started")
        if not self._kill_without_runc(container, req) and not self._signal_directly(container, req.signal,
                                                                                      req.all):
            await self.runc.kill(req.id, req.signal, all_processes=req.all)
        return empty_pb2.Empty()

    def _signal_directly(self, container: Container, sig: int, all_processes: bool) -> bool:
        """Signal without a `runc kill` round trip; False when runc has to (a frozen container).

        Answering Kill before the process can die matters: containerd deletes the task (closing its
        connection) as soon as it sees the exit, and a Kill still waiting on runc then fails with
        "ttrpc: closed". Our pids cannot be reused behind our back: we are the reaper, and a reaped
        init is STOPPED.
        """
        if container.init.reaped:  # its pid may be another's: only the rest is ours to reach
            if all_processes:
                self._end_the_rest(container, sig)
            return True
        if container.init.status == types.PAUSED:
            return False
        if not all_processes:
            _signal([container.init.pid], sig)
            return True
        pids = cgroups.cgroup_procs_of(container.init.pid)
        if pids is None:  # the init is gone or a zombie (in the root cgroup): runc knows the cgroup
            return False
        _signal(pids or [container.init.pid], sig)
        return True

    async def checkpoint(self, req: task.CheckpointTaskRequest, ctx: Context) -> empty_pb2.Empty:
        container = self._get(req.id)
        plan = plan_checkpoint(req.path, req.options, container.init.io.terminal)
        require_criu()
        # Under the container's lock, as Pause: containerd pauses it first, and a Resume must wait.
        async with self._holding(req.id) as container:
            if container.init.status not in (types.RUNNING, types.PAUSED):
                raise FailedPrecondition(f"cannot checkpoint container {req.id}: it is "
                                         f"{types.Status.Name(container.init.status).lower()}")
            pids = cgroups.cgroup_procs_of(container.init.pid) or [container.init.pid]
            stdio = external_stdio(container.init.pid)  # before runc: `exit` ends the init
            with criu_configured(container.files / CRIU_CONFIG_NAME, plan, external_files(pids, container.init.pid)):
                await self.runc.checkpoint(plan.runc_args(req.id), container.log)
            write_external_stdio(plan.image_path, stdio)
        log.info("container %s checkpointed to %s%s", req.id, plan.image_path,
                 "" if plan.leave_running else " (and stopped)")
        self._publish(events.TaskCheckpointed(container_id=req.id), container.namespace)
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
        # (not a restore that never started: no process of it will exit)
        return await wait_exited([c.init for c in self.containers.values()
                                  if c.pod_id == pod_id and c.init.status != types.STOPPED and c.init.pid], timeout)

    async def remove_pod_containers(self, pod_id: str) -> None:
        for container in [c for c in self.containers.values() if c.pod_id == pod_id]:
            if container.init.status != types.STOPPED:
                await self.kill_pod_containers(pod_id, signal.SIGKILL)
                await self.wait_pod_containers(pod_id, 10.0)
            async with self._lock(container.id):
                if self.containers.get(container.id) is not container:
                    continue  # a Delete got there first
                await self._remove(container)
            log.info("pod %s: removed leftover container %s", pod_id, container.id)


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        signal_quietly(pid, sig)


def bundle_namespace(bundle: Path) -> str:
    """The containerd namespace of a task, for callers that send none (containerd 1.6 does not).

    containerd lays task bundles out as `<state>/io.containerd.runtime.v2.task/<namespace>/<id>`.
    """
    if bundle.parent.parent.name == "io.containerd.runtime.v2.task":
        return bundle.parent.name
    return "k8s.io"

