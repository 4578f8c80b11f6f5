"""Server side of the private `kuasar.pods.v1.Pods` service, run inside a task server.

It owns the pod processes (forked holders) and their cgroups, so they survive a sandboxer restart.
The task backend plugs in through `PodContainers` so pod Stop can take the containers down too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from google.protobuf import empty_pb2

from . import cgroups, mounts, pod_leftovers, proc_stat
from .api.kuasar.pods.v1 import pods_pb2 as pb
from .cgroup_attach import AttachLockWarmer, warm
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .ids import validate_id
from .pod_files import SHM, pod_dir
from .pod_holder import PodNamespaces, start_pod_holder
from .pod_leftovers import PodLeftovers
from .pod_leftovers import forget as forget_leftovers
from .reaper import Exit, Reaper
from .ttrpc import Context, TtrpcServer

log = logging.getLogger(__name__)

PODS_SERVICE = "kuasar.pods.v1.Pods"


class PodContainers(Protocol):
    async def kill_pod_containers(self, pod_id: str, sig: int) -> None: ...

    async def wait_pod_containers(self, pod_id: str, timeout: float) -> bool: ...

    async def remove_pod_containers(self, pod_id: str) -> None: ...

    def pod_container_ids(self, pod_id: str) -> list[str]: ...


@runtime_checkable
class PodLauncher(Protocol):
    """How a pod's process is made and unmade when it is not the default forked holder.

    A task backend that implements this (e.g. an application-kernel sandbox whose own process holds the
    pod's namespaces) starts that process itself; the service still watches its exit (it must be a child
    of the task server, or re-parented to it as the task server is a child subreaper) and kills it.
    """

    async def launch_pod(self, req: pb.CreatePodRequest, cgroup: cgroups.PodCgroup | None) -> int:
        """Start the pod's process inside `cgroup` (already created) and return its host pid."""
        ...

    async def release_pod(self, pod_id: str) -> None:
        """Remove what launch_pod made; called once the pod's process is gone."""
        ...


@dataclass
class Pod:
    id: str
    pid: int
    exit: asyncio.Future[Exit]
    cgroup: cgroups.PodCgroup | None = None
    shm: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)
    placed: asyncio.Future[None] | None = None  # the process's move into `cgroup`, while it is made

    @property
    def running(self) -> bool:
        return not self.exit.done()


class PodService:
    def __init__(self, reaper: Reaper, containers: PodContainers, launcher: PodLauncher | None = None,
                 directory: Path | None = None, attach_warmer: AttachLockWarmer | None = None) -> None:
        self.reaper = reaper
        # Warm from a pod's Create on: its cgroup placement and its first container's runc come next.
        self.attach_warmer = attach_warmer
        self.containers = containers
        self.launcher = launcher
        self.directory = directory  # the sandboxer's --dir, where a pod's /dev/shm is mounted
        self.pods: dict[str, Pod] = {}
        # Pods being made, each set once its Create is done: a second Create of the id is refused, and a
        # Delete waits (the Create of a caller that gave up goes on: ttrpc sends no cancel).
        self._creating: dict[str, asyncio.Event] = {}

    def register(self, server: TtrpcServer) -> None:
        server.add_unary(PODS_SERVICE, "Create", pb.CreatePodRequest, self.create)
        server.add_unary(PODS_SERVICE, "Kill", pb.KillPodRequest, self.kill)
        server.add_unary(PODS_SERVICE, "Wait", pb.PodRequest, self.wait)
        server.add_unary(PODS_SERVICE, "Status", pb.PodRequest, self.status)
        server.add_unary(PODS_SERVICE, "Delete", pb.PodRequest, self.delete)
        server.add_unary(PODS_SERVICE, "List", empty_pb2.Empty, self.list)
        server.add_unary(PODS_SERVICE, "Stats", pb.PodRequest, self.stats)

    @property
    def creating(self) -> int:
        """Pods whose Create is under way."""
        return len(self._creating)

    def _get(self, pod_id: str) -> Pod:
        pod = self.pods.get(validate_id(pod_id, "pod id"))
        if pod is None:
            raise NotFound(f"pod {pod_id} not found")
        return pod

    async def create(self, req: pb.CreatePodRequest, ctx: Context) -> pb.CreatePodResponse:
        validate_id(req.id, "pod id")
        if req.id in self.pods or req.id in self._creating:
            raise AlreadyExists(f"pod {req.id} already exists")
        if req.netns_path and not os.path.exists(req.netns_path):
            raise InvalidArgument(f"netns {req.netns_path} does not exist")
        if req.userns and not req.netns_path:
            raise InvalidArgument("a pod with its own user namespace needs a netns made in it")
        if req.userns and self.launcher is not None:
            raise InvalidArgument("this task server's pods cannot have their own user namespace")
        shm = None
        if req.shm_size:
            if self.directory is None:
                raise InvalidArgument("this task server keeps no pod /dev/shm")
            shm = pod_dir(self.directory, req.id) / SHM
        cgroup = None
        if req.cgroup_parent:
            parent = cgroups.pod_parent_path(req.cgroup_parent)
            # A launcher (gVisor's) puts its own pod process where it wants: below the cgroup, as we do.
            leaf = "" if self.launcher is not None else cgroups.pod_process_leaf(req.id, parent)
            cgroup = cgroups.PodCgroup(parent, process_leaf=leaf)
        recorded = False
        if cgroup is not None:
            def record(made: cgroups.PodCgroup) -> None:
                # Before the first mkdir: a task server that dies before its pod's process is known
                # leaves no cgroup (or /dev/shm) its successor's sweep does not know of.
                nonlocal recorded
                self._write_leftovers(req.id, 0, 0, made, shm)
                recorded = True

            # Before the warmer's burst: its first write holds the kernel's cgroup_mutex through an RCU
            # grace period, and these mkdirs would wait for it.
            try:
                cgroup.create(before_making=record)
            except BaseException:
                cgroup.remove()
                if recorded and self.directory is not None:
                    forget_leftovers(pod_dir(self.directory, req.id))
                raise
        # Warm from a pod's Create on: its cgroup placement and its first container's runc come next.
        with warm(self.attach_warmer):
            return await self._create(req, cgroup, shm, recorded)

    async def _create(self, req: pb.CreatePodRequest, cgroup: cgroups.PodCgroup | None,
                      shm: Path | None, recorded: bool) -> pb.CreatePodResponse:
        self._creating[req.id] = asyncio.Event()
        def meanwhile() -> None:
            if not recorded:
                self._record_before_the_process(req.id, cgroup, shm)  # before the mount, for the same reason
            if shm is not None:
                mounts.mount_tmpfs(shm, req.shm_size)

        started_ns = time.monotonic_ns()
        try:
            if self.launcher is not None:
                meanwhile()
                pid = await self.launcher.launch_pod(req, cgroup)
            else:
                # The mount is made while the new process enters its namespaces: ~0.1 ms alone, and
                # 0.4 ms on a busy machine, on the path of the pod's Start.
                namespaces = PodNamespaces(req.netns_path, req.new_ipc, req.new_uts, req.new_pid, req.userns,
                                           tuple(sorted(req.sysctls.items())))
                owner = pod_dir(self.directory, req.id) if self.directory is not None else None
                pid = await start_pod_holder(req.id, namespaces, req.hostname, meanwhile=meanwhile, owner=owner)
        except BaseException:  # also a cancelled Create (its deadline, its connection gone)
            if shm is not None:
                mounts.unmount_all(shm)
            if cgroup is not None:
                cgroup.remove()
            if self.directory is not None:
                forget_leftovers(pod_dir(self.directory, req.id))
            raise
        finally:
            self._creating.pop(req.id).set()
        # An exit reaped before this watch is kept by the reaper, so a launcher's await loses nothing.
        pod = Pod(req.id, pid, self.reaper.watch(pid, started_ns), cgroup, shm)
        self.pods[req.id] = pod
        if self.directory is not None:  # after the reply is written: off the pod start's path
            asyncio.get_running_loop().call_soon(self._record_leftovers, pod)
        if cgroup is not None and self.launcher is None:
            pod.placed = self._place(pod, cgroup)
        log.info("pod %s: process %d holds its namespaces", req.id, pid)
        return pb.CreatePodResponse(pid=pid)

    def _record_before_the_process(self, pod_id: str, cgroup: cgroups.PodCgroup | None, shm: Path | None) -> None:
        """What a pod holds before its process is known (its cgroups, its /dev/shm), for the sweep of a
        task server started after this one died meanwhile; that sweep finds the process itself by its
        command line. Written while the new process enters its namespaces, so it costs the start nothing."""
        if cgroup is not None or shm is not None:
            self._write_leftovers(pod_id, 0, 0, cgroup, shm)

    def _record_leftovers(self, pod: Pod) -> None:
        if self.pods.get(pod.id) is pod:
            self._write_leftovers(pod.id, pod.pid, proc_stat.start_time(pod.pid), pod.cgroup, pod.shm)

    def _write_leftovers(self, pod_id: str, pid: int, start: int, cgroup: cgroups.PodCgroup | None,
                         shm: Path | None) -> None:
        if self.directory is None:
            return
        record = PodLeftovers(pid, start, list(cgroup.created) if cgroup else [], str(shm) if shm is not None else "")
        try:
            record.write(pod_dir(self.directory, pod_id))
        except OSError as exc:  # the pod runs anyway; only a task server crash would now leak it
            log.error("pod %s: recording what it holds: %s", pod_id, exc)

    def _place(self, pod: Pod, cgroup: cgroups.PodCgroup) -> asyncio.Future[None] | None:
        """Move the pod's process into its cgroup: by the attach-lock warmer's thread, after Create has
        answered. The move may wait out an RCU grace period (~8 ms here); nothing of the pod's start
        needs it done, as its containers get cgroups of their own below this one, which exists."""
        if self.attach_warmer is None:
            cgroup.add(pod.pid)
            return None
        def place() -> None:
            if pod.running:  # not a pid already reaped, which may be another process's by now
                cgroup.add(pod.pid)

        placed = asyncio.wrap_future(self.attach_warmer.submit(place))
        placed.add_done_callback(lambda done: self._placed(pod, cgroup, done))
        return placed

    def _placed(self, pod: Pod, cgroup: cgroups.PodCgroup, placed: asyncio.Future[None]) -> None:
        error = None if placed.cancelled() else placed.exception()
        if error is not None and pod.running and self.pods.get(pod.id) is pod:
            # As a failed move failed Create when it was made before answering: the pod does not run.
            log.error("pod %s: moving its process into cgroup %s failed: %s; stopping the pod",
                      pod.id, cgroup.path, error)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pod.pid, signal.SIGKILL)

    async def kill(self, req: pb.KillPodRequest, ctx: Context) -> empty_pb2.Empty:
        pod = self._get(req.id)
        sig = req.signal or signal.SIGKILL
        if req.containers and req.timeout_secs:
            await self.containers.kill_pod_containers(pod.id, signal.SIGTERM)
            await self.containers.wait_pod_containers(pod.id, float(req.timeout_secs))
        if req.containers:
            await self.containers.kill_pod_containers(pod.id, sig)
            # A pod stop, after which containerd's own sandboxes unmount the pod's /dev/shm (the rest of
            # its files wait for the removal): what was written there is memory, and kubelet may keep a
            # stopped pod for long.
            pod.exit.add_done_callback(lambda _: self._release_shm(pod))
        await self._placement_done(pod)
        if pod.running:
            try:
                os.kill(pod.pid, sig)
            except ProcessLookupError:
                pass
        return empty_pb2.Empty()

    @staticmethod
    async def _placement_done(pod: Pod) -> None:
        """Before the pod's process is signalled: its move into its cgroup, under way on the warmer's
        thread, must not write a pid reaped meanwhile (another process's, once reused, into the pod's
        cgroup, which then cannot be removed)."""
        if pod.placed is not None:
            await asyncio.gather(pod.placed, return_exceptions=True)

    def _release_shm(self, pod: Pod) -> None:
        if pod.shm is not None and self.pods.get(pod.id) is pod:
            try:
                mounts.unmount_all(pod.shm)
            except OSError as exc:  # Delete tries again
                log.error("pod %s: unmounting its /dev/shm: %s", pod.id, exc)

    async def wait(self, req: pb.PodRequest, ctx: Context) -> pb.PodExit:
        pod = self._get(req.id)
        return _exit_message(await asyncio.shield(pod.exit))

    async def status(self, req: pb.PodRequest, ctx: Context) -> pb.PodStatus:
        return self._status(self._get(req.id))

    def _status(self, pod: Pod) -> pb.PodStatus:
        status = pb.PodStatus(id=pod.id, pid=pod.pid, running=pod.running,
                              containers=self.containers.pod_container_ids(pod.id),
                              cgroup=pod.cgroup.path if pod.cgroup else "")
        if not pod.running:
            status.exit.CopyFrom(_exit_message(pod.exit.result()))
        return status

    async def delete(self, req: pb.PodRequest, ctx: Context) -> empty_pb2.Empty:
        creating = self._creating.get(validate_id(req.id, "pod id"))
        if creating is not None:  # what that Create makes is this Delete's to remove
            await creating.wait()
        if req.id not in self.pods and self.directory is not None and \
                not await pod_leftovers.retry(pod_dir(self.directory, req.id)):
            # Failed, so that the Shutdown behind it is tried again (and the sandboxer keeps the record).
            raise FailedPrecondition(f"pod {req.id}: a task server that died left cgroups of it that are "
                                     "still in use (see the task server's log)")
        pod = self._get(req.id)
        await self.containers.remove_pod_containers(pod.id)
        await self._placement_done(pod)  # (and so before the rmdir too)
        if pod.running:
            os.kill(pod.pid, signal.SIGKILL)
            await asyncio.shield(pod.exit)
        if self.launcher is not None:
            await self.launcher.release_pod(pod.id)
        if pod.cgroup is not None:
            pod.cgroup.remove()
        if pod.shm is not None:
            mounts.unmount_all(pod.shm)
        if self.directory is not None:
            forget_leftovers(pod_dir(self.directory, pod.id))
        del self.pods[pod.id]
        log.info("pod %s removed", pod.id)
        return empty_pb2.Empty()

    async def list(self, req: empty_pb2.Empty, ctx: Context) -> pb.PodList:
        return pb.PodList(pods=[self._status(pod) for pod in self.pods.values()])

    async def stats(self, req: pb.PodRequest, ctx: Context) -> pb.PodStats:
        pod = self._get(req.id)
        if pod.cgroup is not None:
            return pb.PodStats(stats=cgroups.metrics_for_path(pod.cgroup.stats_path()))
        return pb.PodStats(stats=cgroups.metrics_for_pid(pod.pid))


def _exit_message(exited: Exit) -> pb.PodExit:
    message = pb.PodExit(exit_status=exited.status)
    message.exited_at.FromNanoseconds(exited.at_ns)
    return message
