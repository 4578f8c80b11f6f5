"""The task backend of wasm-sandboxer's pods: WebAssembly containers, and Linux containers beside them.

A pod of WebAssembly services often needs an ordinary container too (a service-mesh proxy, a log
shipper), and runwasi's shims run one: an image whose entrypoint is no WebAssembly module runs as a
Linux container. So does ours, with runc (kuasar.common.host_runc_tasks, as runc-sandboxer's pods),
in the same pod: its namespaces, cgroup, /dev/shm and /etc files.

Create asks the wasm backend first; it refuses with NotAModule, before it has made anything, when
`args[0]` names no WebAssembly file in the rootfs (a program to look up in $PATH, an ELF binary, a
script). Every other request goes to the backend that holds the container. Both share the task
server's reaper, events and directory; each sweeps what its own containers left after a crash.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.message import Message

from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.errors import AlreadyExists, FailedPrecondition, KuasarError, from_code
from kuasar.common.host_runc_tasks import RuncTasks
from kuasar.common.task_api import TASK_METHODS, TaskBackend, backend_method_name, refuse_restore
from kuasar.common.task_table import host_bundle, read_bundle_spec
from kuasar.common.ttrpc import Context

from .module import NotAModule
from .tasks import WasmTasks

log = logging.getLogger(__name__)

# Requests that name no container held yet (Create), or none at all (Shutdown).
NOT_ROUTED = ("Create", "Shutdown")


class WasmPodTasks(TaskBackend):
    # A restore is a Linux container's: a module cannot be checkpointed (WasmTasks answers Checkpoint
    # UNIMPLEMENTED), so CRIU images can only be runc's.
    restores_checkpoints = True

    def __init__(self, wasm: WasmTasks, linux: RuncTasks | None) -> None:
        self.wasm = wasm
        self.linux = linux  # None: Linux containers are turned off ([wasm] linux_containers = false)
        self.attach_warmer = wasm.attach_warmer
        self._creating: set[str] = set()

    @property
    def containers(self) -> dict[str, Any]:
        """Every container of either kind (the task server counts them to know whether it has work)."""
        if self.linux is None or not self.linux.containers:
            return self.wasm.containers
        return {**self.wasm.containers, **self.linux.containers}

    def backend_of(self, container_id: str) -> WasmTasks | RuncTasks:
        """The backend holding the container; the wasm one for an unknown id (it answers NOT_FOUND)."""
        if self.linux is not None and container_id in self.linux.containers:
            return self.linux
        return self.wasm

    def namespace_of(self, container_id: str) -> str | None:
        return self.backend_of(container_id).namespace_of(container_id)

    async def create(self, req: task.CreateTaskRequest, ctx: Context) -> task.CreateTaskResponse:
        # One id is one container across both backends, also while either is still creating it.
        if req.id in self._creating or req.id in self.containers:
            raise AlreadyExists(f"container {req.id} already exists")
        self._creating.add(req.id)
        try:
            if req.checkpoint:
                if self.linux is None:
                    refuse_restore(req)
                reason = "a restore of a checkpoint (only a Linux container has one)"
            else:
                try:
                    return await self.wasm.create(req, ctx)
                except NotAModule as not_wasm:
                    if self.linux is None:
                        raise
                    reason = str(not_wasm)
            assert self.linux is not None  # (without one, both ways above raise)
            if shutil.which(self.linux.runc.binary) is None:
                raise FailedPrecondition(f"container {req.id}: {reason}; it would run as a Linux container, but "
                                         f"runc {self.linux.runc.binary!r} is not installed (PATH or [wasm] runc)")
            refuse_the_hosts_pid_namespace(read_bundle_spec(host_bundle(req.bundle)), req.id)
            log.info("container %s: %s: a Linux container, run with runc", req.id, reason)
            try:
                return await self.linux.create(req, ctx)
            except KuasarError as failed:  # both reasons: the image may have been meant as a wasm one
                raise from_code(failed.code, f"{reason}; as a Linux container: {failed}") from None
        finally:
            self._creating.discard(req.id)

    # -- pod hooks (kuasar.common.pod_service.PodContainers): both kinds ---------------------------------
    def _backends(self) -> list[WasmTasks | RuncTasks]:
        return [self.wasm] if self.linux is None else [self.wasm, self.linux]

    def pod_container_ids(self, pod_id: str) -> list[str]:
        return [cid for backend in self._backends() for cid in backend.pod_container_ids(pod_id)]

    async def kill_pod_containers(self, pod_id: str, sig: int) -> None:
        for backend in self._backends():
            await backend.kill_pod_containers(pod_id, sig)

    async def wait_pod_containers(self, pod_id: str, timeout: float) -> bool:
        waits = [backend.wait_pod_containers(pod_id, timeout) for backend in self._backends()]
        return all(await asyncio.gather(*waits))

    async def remove_pod_containers(self, pod_id: str) -> None:
        for backend in self._backends():
            await backend.remove_pod_containers(pod_id)

    async def sweep_leftovers(self) -> None:
        for backend in self._backends():
            await backend.sweep_leftovers()


def refuse_the_hosts_pid_namespace(spec: dict[str, Any], container_id: str) -> None:
    """A Linux container may not join a PID namespace by path that is the host's. CRI gives it the PID
    namespace of its target container (`kubectl debug --target`), and a WebAssembly container's process
    lives in the host's (the task server's): joining it would show the container every process of the
    node, which no pod without hostPID may see."""
    namespaces = (spec.get("linux") or {}).get("namespaces") or []
    path = next((str(ns.get("path") or "") for ns in namespaces if isinstance(ns, dict) and ns.get("type") == "pid"),
                "")
    if not path:
        return
    try:
        joined, ours = os.stat(path), os.stat("/proc/self/ns/pid")
    except OSError:
        return  # runc says what is wrong with it
    if (joined.st_dev, joined.st_ino) == (ours.st_dev, ours.st_ino):
        raise FailedPrecondition(
            f"container {container_id}: its PID namespace ({path}) is the host's: WebAssembly containers run "
            "in the host's PID namespace, so a Linux container cannot share a module's processes (kubectl "
            "debug --target a wasm container); debug without --target to see the pod's own")


def _routed(method: str) -> Callable[[WasmPodTasks, Any, Context], Awaitable[Message]]:
    async def call(self: WasmPodTasks, req: Any, ctx: Context) -> Message:
        handler: Callable[[Any, Context], Awaitable[Message]] = getattr(self.backend_of(req.id), method)
        return await handler(req, ctx)
    call.__name__ = call.__qualname__ = method
    return call


# Every other Task API request names its container (req.id): the backend holding it answers.
for _method in TASK_METHODS:
    if _method not in NOT_ROUTED:
        setattr(WasmPodTasks, backend_method_name(_method), _routed(backend_method_name(_method)))
