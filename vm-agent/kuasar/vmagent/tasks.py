"""`containerd.task.v3.Task` (and v2) inside the guest: the pod's containers, run with runc.

Bundles come from the host through the shared directory: `CreateTaskRequest.bundle` is used when
it is a guest path holding a `config.json`, otherwise `<share>/<container id>` (Kuasar's layout).
runc's state, pid files and logs stay in the guest's tmpfs (`<state>/<id>/`). Stdio is containerd's
streaming IO (or guest paths), see `stdio.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from google.protobuf import empty_pb2

from kuasar.common import mounts
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.errors import InvalidArgument
from kuasar.common.ids import validate_id
from kuasar.common.reaper import Reaper
from kuasar.common.runc_cli import Runc
from kuasar.common.runc_tasks import RuncContainer, RuncContainerTasks, RuncProcess
from kuasar.common.streaming_io import StreamHub
from kuasar.common.task_table import (
    read_bundle_spec,
    shares_pid_namespace,
)
from kuasar.common.ttrpc import Context

from .events import EventQueue
from .stdio import ProcessIO

log = logging.getLogger(__name__)

VERSION = "kuasar-py vm-agent"


# In the guest a container's files live in the agent's state dir: the bundle is the host's share.
Container = RuncContainer
# Options that make any mount a bind mount (mount(8)'s spelling, as kuasar.common.mounts reads them).
BIND_OPTIONS = ("bind", "rbind")


def _is_bind(m: mounts.MountLike) -> bool:
    """Whether a rootfs mount binds its source, a path (other types' source may be a mere label)."""
    return m.type == "bind" or any(option in BIND_OPTIONS for option in m.options)


class GuestTasks(RuncContainerTasks):
    version = VERSION

    def __init__(self, reaper: Reaper, hub: StreamHub, events_queue: EventQueue, state_dir: Path,
                 share_dir: str | None, runc_binary: str = "runc", no_pivot: bool = False) -> None:
        super().__init__()
        self.reaper = reaper
        self.hub = hub
        self.events = events_queue
        self.state_dir = state_dir
        self.share_dir = Path(share_dir) if share_dir else None
        self.runc = Runc(reaper, state_dir / "runc", runc_binary, no_pivot=no_pivot)
        self.containers: dict[str, Container] = {}

    def _console_socket(self, container: Container) -> Path:
        # Not under the container's own directory: with an id of up to 76 characters that path could
        # pass the 107 bytes a unix socket's may have.
        return self.state_dir / f"console-{os.urandom(6).hex()}.sock"

    def _process_io(self, req: task.ExecProcessRequest) -> ProcessIO:
        return ProcessIO(self.hub, req.stdin, req.stdout, req.stderr, req.terminal)

    def _release_io(self, io: ProcessIO) -> None:
        io.release_child_fds()

    def _discard_io(self, io: ProcessIO) -> None:
        io.release_child_fds()

    def _remove_files(self, container: Container) -> None:
        # Also called while a failed Create unwinds, where raising would hide why it failed. Only the
        # files runc and we leave (log.json, pid files, console sockets) are removed, never a directory.
        for leftover in container.files.glob("*"):
            try:
                if not leftover.is_dir() or leftover.is_symlink():
                    leftover.unlink(missing_ok=True)
            except OSError as err:
                log.warning("container %s: removing %s: %s", container.id, leftover, err)
        try:
            container.files.rmdir()
        except OSError:
            pass

    def _inside_share(self, path: str, what: str) -> Path:
        """`path` if it lies in the shared directory: the host may only point the agent at what it shared."""
        resolved = Path(os.path.realpath(path))
        share = Path(os.path.realpath(self.share_dir)) if self.share_dir is not None else None
        if share is None or not resolved.is_relative_to(share):
            raise InvalidArgument(f"{what} {path!r} is outside the sandbox's shared directory")
        return resolved

    def resolve_bundle(self, container_id: str, requested: str) -> Path:
        candidates = []
        if requested and os.path.isabs(requested) and (Path(requested) / "config.json").is_file():
            candidates.append(self._inside_share(requested, "bundle"))
        if self.share_dir is not None:
            candidates.append(self.share_dir / container_id)
        for candidate in candidates:
            if (candidate / "config.json").is_file():
                return candidate
        where = " or ".join(str(c) for c in candidates) or "(no shared directory)"
        raise InvalidArgument(f"no bundle for container {container_id}: no config.json in {where}")

    def _check_rootfs_paths(self, rootfs) -> None:
        """Every host-provided path a rootfs mount names (source, overlay dirs) must be in the share."""
        for m in rootfs:
            if _is_bind(m) and not m.source.startswith("/"):
                # mount(2) would resolve it from the agent's working directory, outside the share.
                raise InvalidArgument(f"rootfs bind source {m.source!r} must be an absolute path")
            if m.source.startswith("/"):
                self._inside_share(m.source, "rootfs source")
            for option in m.options:
                key, _, value = option.partition("=")
                if key in ("lowerdir", "upperdir", "workdir"):
                    for part in value.split(":"):
                        self._inside_share(part, f"rootfs {key}")

    # -- lifecycle ---------------------------------------------------------------------------------
    async def create(self, req: task.CreateTaskRequest, ctx: Context) -> task.CreateTaskResponse:
        validate_id(req.id, "container id")
        async with self._lock(req.id):
            self._refuse_known_id(req.id)
            bundle = self.resolve_bundle(req.id, req.bundle)
            self._check_rootfs_paths(req.rootfs)
            shares_pids = shares_pid_namespace(read_bundle_spec(bundle))
            io = ProcessIO(self.hub, req.stdin, req.stdout, req.stderr, req.terminal)
            container = Container(req.id, bundle, self.state_dir / req.id, ctx.namespace or "k8s.io",
                                  RuncProcess("", io), shares_pids=shares_pids)
            container.files.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                if req.rootfs:
                    mounts.mount_rootfs(req.rootfs, bundle / "rootfs")
                    container.rootfs_mounted = True
                await self._start_process(container, container.init, is_exec=False)
            except BaseException:
                io.close()
                # The guest's tmpfs is its memory: a failed Create must not leave runc's log behind.
                self._remove_files(container)
                if container.rootfs_mounted:
                    mounts.unmount_all(bundle / "rootfs")
                raise
            self.containers[req.id] = container
        log.info("container %s created, pid %d, bundle %s", req.id, container.init.pid, bundle)
        self._publish_create(req, str(bundle), container.init.pid, container.namespace)
        return task.CreateTaskResponse(pid=container.init.pid)

    async def kill(self, req: task.KillRequest, ctx: Context) -> empty_pb2.Empty:
        if not self._kill_without_runc(self._get(req.id), req):
            await self.runc.kill(req.id, req.signal, all_processes=req.all)
        return empty_pb2.Empty()

    # -- inspection --------------------------------------------------------------------------------
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
