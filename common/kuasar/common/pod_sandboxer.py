"""A Sandboxer whose pods are namespace-holding processes kept by a task server (runc, wasm).

The sandbox type only says how its task server is launched; pod lifecycle is the same for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2, empty_pb2

from . import cgroups
from .api.kuasar.pods.v1 import pods_pb2 as pods
from .api.runtime.v1 import api_pb2 as cri
from .config import DaemonConfig
from .errors import AlreadyExists, InvalidArgument, NotFound, Unimplemented
from .pod_files import SHM, check_names, pod_dir, pod_file_contents, write_pod_files
from .pod_sysctls import pod_sysctls
from .sandboxer import LOST_EXIT_STATUS, ExitInfo, Sandboxer, SandboxRecord, SandboxState, StartResult
from .task_server import TaskServerHandle, TaskServerLaunch

log = logging.getLogger(__name__)


def decode_pod_config(record: SandboxRecord) -> cri.PodSandboxConfig:
    config = cri.PodSandboxConfig()
    try:
        config.ParseFromString(record.pod_config_bytes)
    except Exception:
        raise InvalidArgument("options is not a runtime.v1.PodSandboxConfig") from None
    return config


def wants_user_namespace(config: cri.PodSandboxConfig) -> bool:
    """Whether CRI asks for a pod-level user namespace (kubelet's `hostUsers: false`). An unset
    userns_options reads as mode POD (the enum's zero), so its presence is what says it."""
    ns = config.linux.security_context.namespace_options
    return ns.HasField("userns_options") and ns.userns_options.mode == cri.POD


def refuse_user_namespace(config: cri.PodSandboxConfig, sandbox_type: str) -> None:
    """For types whose containers cannot enter a pod's user namespace: say so at RunPodSandbox rather
    than let every container of the pod fail, or run in the host's user namespace."""
    if wants_user_namespace(config):
        raise Unimplemented(f"pods with their own user namespace (hostUsers: false) are not supported "
                            f"by the {sandbox_type} sandboxer")


def pod_names(config: cri.PodSandboxConfig) -> tuple[str, tuple[list[str], list[str], list[str]] | None]:
    """The pod's hostname and CRI DNSConfig (servers, searches, options), or None without one."""
    dns = config.dns_config
    return config.hostname, ((list(dns.servers), list(dns.searches), list(dns.options))
                             if config.HasField("dns_config") else None)


def pod_request(record: SandboxRecord, config: cri.PodSandboxConfig, shm_size: int = 0) -> pods.CreatePodRequest:
    """Translate CRI's namespace options into what the pod process must unshare or join, and the
    sysctls it sets there (INVALID_ARGUMENT for one its namespaces do not scope); a pod with its own
    IPC namespace also gets its own /dev/shm of `shm_size` bytes (if not 0)."""
    ns = config.linux.security_context.namespace_options
    host_network = ns.network == cri.NODE or not record.netns_path
    userns = wants_user_namespace(config)
    sysctls = pod_sysctls(config.linux.sysctls, own_net=not host_network, own_ipc=ns.ipc != cri.NODE,
                          own_uts=not host_network, userns=userns)
    return pods.CreatePodRequest(
        id=record.id, netns_path=record.netns_path, userns=userns, sysctls=sysctls,
        new_ipc=ns.ipc != cri.NODE,
        new_uts=not host_network,
        new_pid=ns.pid == cri.POD,
        hostname=config.hostname if not host_network else "",
        cgroup_parent=config.linux.cgroup_parent,
        shm_size=shm_size if ns.ipc != cri.NODE else 0)


class PodSandboxer(Sandboxer):
    def __init__(self, config: DaemonConfig, task_server: TaskServerLaunch, pod_shm_size: int = 0,
                 pod_files: bool = False, user_namespaces: bool = False) -> None:
        self.config = config
        # Whether the type's containers can join a pod's user namespace (runc's, through their spec).
        self.user_namespaces = user_namespaces
        self.pod_shm_size = pod_shm_size  # bytes of each pod's /dev/shm, for types whose containers see one
        # Whether the type's containers mount the pod's /etc/hostname, hosts and resolv.conf (pod_files):
        # only then are they written, into the pod's directory, which other types may use for themselves.
        self.pod_files = pod_files
        self.task_server = TaskServerHandle(config.dir, task_server)
        # Pod processes being started for a Create, by sandbox id, until Start (or Shutdown) collects them.
        self._launches: dict[str, asyncio.Task[int]] = {}

    def prepare(self) -> None:
        self.task_server.hold_lock()
        asyncio.run(self.task_server.replace_if_outdated())  # (before the sandboxer's loop exists)
        self.task_server.fork_if_absent()

    async def open(self) -> None:
        self.task_server.hold_lock()
        await self.task_server.replace_if_outdated()  # when prepare() did not run (a frozen binary: no fork)
        await self.task_server.connect()

    async def close(self) -> None:
        for launch in self._launches.values():
            launch.cancel()
        await self.task_server.close()

    async def create(self, record: SandboxRecord) -> None:
        # Reject garbage before anything is made; the host's files are read only for a type that uses them.
        config = decode_pod_config(record)
        cgroups.pod_parent_path(config.linux.cgroup_parent)  # a malformed slice name is refused now
        if not self.user_namespaces:
            refuse_user_namespace(config, self.name)
        elif wants_user_namespace(config) and not record.netns_path:
            # containerd makes a user-namespaced pod's netns inside its user namespace; the pod joins
            # that one, so a pod without a netns of its own has none to join (Kubernetes refuses
            # hostNetwork with hostUsers: false for the same reason).
            raise InvalidArgument("a pod with its own user namespace needs its own network namespace")
        names = pod_names(config)
        files = pod_file_contents(*names) if self.pod_files else None
        if files is None:
            check_names(*names)
        # The pod's files and process are made now rather than in Start: containerd's own work between
        # the two calls hides that time. Start (or Shutdown) collects the outcome. The request is
        # written before Create saves the record and answers; the files while the task server works.
        self._launches[record.id] = asyncio.ensure_future(self._launch(record, config, files))

    def _launch(self, record: SandboxRecord, config: cri.PodSandboxConfig | None = None,
                files: dict[str, bytes] | None = None) -> Coroutine[Any, Any, int]:
        if config is None:  # no Create in this process decoded it (a record a restart could not remove)
            config = decode_pod_config(record)
        if self.pod_files and files is None:
            files = pod_file_contents(*pod_names(config))
        creating = self.task_server.begin_call("Create", pod_request(record, config, self.pod_shm_size),
                                               pods.CreatePodResponse)
        return self._launched_pid(record, creating, files)

    async def _launched_pid(self, record: SandboxRecord, creating: Coroutine[Any, Any, Any],
                            files: dict[str, bytes] | None) -> int:
        try:
            if files is not None:  # nothing reads them before the pod's first container
                write_pod_files(pod_dir(self.config.dir, record.id), files)
        except BaseException:
            with contextlib.suppress(Exception):
                await creating  # Shutdown removes what it made
            raise
        try:
            response = await creating
        except AlreadyExists:
            # Launched before a restart of ours that could not remove this sandbox: the pod is ours.
            status = await self.task_server.call("Status", pods.PodRequest(id=record.id), pods.PodStatus)
            return status.pid
        return response.pid

    async def _launched(self, record: SandboxRecord) -> None:
        """Let a launch still under way finish (its outcome is Start's to report)."""
        launch = self._launches.pop(record.id, None)
        if launch is not None:
            await asyncio.gather(launch, return_exceptions=True)

    async def start(self, record: SandboxRecord) -> StartResult:
        launch = self._launches.pop(record.id, None)
        if launch is None:
            launch = asyncio.ensure_future(self._launch(record))
        try:
            pid = await asyncio.shield(launch)
        except asyncio.CancelledError:
            # A cancelled call is not cancelled in the task server (ttrpc sends nothing): its pod is made
            # all the same. Kept for Stop and Shutdown, which wait for it, so that they remove that pod.
            self._launches[record.id] = launch
            raise
        return StartResult(pid=pid, address=self.task_server.address, version=3)

    async def wait(self, record: SandboxRecord) -> ExitInfo:
        try:
            exit_ = await self.task_server.call("Wait", pods.PodRequest(id=record.id), pods.PodExit,
                                                timeout=None)
        except NotFound:
            return ExitInfo(LOST_EXIT_STATUS)
        return ExitInfo(exit_.exit_status, exit_.exited_at.ToNanoseconds())

    async def stop(self, record: SandboxRecord, timeout: float) -> None:
        await self._launched(record)
        try:
            await self.task_server.call("Kill", pods.KillPodRequest(id=record.id, signal=9, containers=True,
                                                                   timeout_secs=int(timeout)),
                                        empty_pb2.Empty)
        except NotFound:
            pass

    async def shutdown(self, record: SandboxRecord) -> None:
        await self._launched(record)
        try:
            await self.task_server.call("Delete", pods.PodRequest(id=record.id), empty_pb2.Empty)
        except NotFound:
            pass
        path = pod_dir(self.config.dir, record.id)
        if os.path.ismount(path / SHM):  # its task server did not unmount it (it was restarted)
            from .mounts import unmount_all  # only here: the sandboxer keeps ctypes out otherwise

            unmount_all(path / SHM)
        shutil.rmtree(path, ignore_errors=True)

    async def metrics(self, record: SandboxRecord) -> any_pb2.Any:
        response = await self.task_server.call("Stats", pods.PodRequest(id=record.id), pods.PodStats)
        return response.stats

    async def recover(self, records: list[SandboxRecord]) -> None:
        listed = await self.task_server.call("List", empty_pb2.Empty(), pods.PodList)
        alive = {pod.id for pod in listed.pods}
        for record in records:
            if record.state == SandboxState.READY and record.id not in alive:
                log.warning("sandbox %s: its pod process is gone; reporting it exited", record.id)
                record.found_gone()
            elif record.state == SandboxState.READY:
                record.address = self.task_server.address

    def status_info(self, record: SandboxRecord, verbose: bool) -> dict[str, str]:
        return {"task_address": record.address} if verbose else {}

    async def remove_unrecorded(self, recorded: set[str]) -> None:
        """Pods, and pod files, of sandboxes with no state at all: the pod's Create goes to the task
        server before the sandbox's record is saved, and we died in between. containerd's Create failed
        with us, so nothing would ever ask for them. A pod still being made is waited for by Delete."""
        listed = await self.task_server.call("List", empty_pb2.Empty(), pods.PodList)
        root = pod_dir(self.config.dir, "x").parent
        with_files = {path.name for path in root.iterdir() if path.is_dir()} if root.is_dir() else set()
        for orphan in sorted(({pod.id for pod in listed.pods} | with_files) - recorded):
            log.warning("pod %s: no sandbox of ours has it (a Create cut short); removing it", orphan)
            try:
                with contextlib.suppress(NotFound):
                    await self.task_server.call("Delete", pods.PodRequest(id=orphan), empty_pb2.Empty)
                self._remove_pod_files(root / orphan)
            except Exception as exc:  # noqa: BLE001 - one pod must not keep the others (or us) from going on
                log.error("pod %s: removing it: %s", orphan, exc)

    def _remove_pod_files(self, path: Path) -> None:
        if not path.is_dir():
            return
        from .mounts import mount_points_under, unmount_all  # only here: the sandboxer keeps ctypes out otherwise

        if os.path.ismount(path / SHM):  # its task server did not unmount it (the pod is gone with it)
            unmount_all(path / SHM)
        if mount_points_under(path):  # never remove files through a mount that is not ours to empty
            log.error("pod %s: something is still mounted under %s; leaving it", path.name, path)
            return
        shutil.rmtree(path, ignore_errors=True)
