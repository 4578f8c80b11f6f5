"""`containerd.task.v3.Task` (and the byte-identical v2) over ttrpc, dispatching to a TaskBackend.

containerd 2.1 only dials a sandboxer's task address for API version >= 3; v2 is served too so a
caller that downgrades after UNIMPLEMENTED (or an older containerd through a shim) still works.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from .api.containerd.runtime.task.v2 import shim_pb2 as task
from .errors import NotFound, Unimplemented
from .ttrpc import Context, TtrpcServer

TASK_SERVICES = ("containerd.task.v3.Task", "containerd.task.v2.Task")

# Method name -> request type; the backend method is the snake_case name.
TASK_METHODS: dict[str, type[Message]] = {
    "State": task.StateRequest,
    "Create": task.CreateTaskRequest,
    "Start": task.StartRequest,
    "Delete": task.DeleteRequest,
    "Pids": task.PidsRequest,
    "Pause": task.PauseRequest,
    "Resume": task.ResumeRequest,
    "Checkpoint": task.CheckpointTaskRequest,
    "Kill": task.KillRequest,
    "Exec": task.ExecProcessRequest,
    "ResizePty": task.ResizePtyRequest,
    "CloseIO": task.CloseIORequest,
    "Update": task.UpdateTaskRequest,
    "Wait": task.WaitRequest,
    "Stats": task.StatsRequest,
    "Connect": task.ConnectRequest,
    "Shutdown": task.ShutdownRequest,
}


def refuse_restore(req: task.CreateTaskRequest) -> None:
    """containerd's CRI restores a checkpointed container with a Create that names the checkpoint. A
    backend that cannot restore one (see TaskBackend.restores_checkpoints) must say so: creating it
    afresh would run a new container that containerd then reports as restored."""
    if req.checkpoint:
        raise Unimplemented(f"container {req.id}: restoring from a checkpoint is not supported")


def _refusing_restore(create: Callable[[task.CreateTaskRequest, Context], Awaitable[Message]]) -> \
        Callable[[task.CreateTaskRequest, Context], Awaitable[Message]]:
    async def handle(req: task.CreateTaskRequest, ctx: Context) -> Message:
        refuse_restore(req)
        return await create(req, ctx)
    return handle


# What a request names no container in, or does before one exists.
_NO_CONTAINER_YET = ("Create", "Connect", "Shutdown")


def _in_its_namespace(handler: Callable[[Any, Context], Awaitable[Message]],
                      namespace_of: Callable[[str], str | None]) -> Callable[[Any, Context], Awaitable[Message]]:
    async def handle(req: Any, ctx: Context) -> Message:
        # One id in two containerd namespaces (`ctr -n a run ... x`, `ctr -n b run ... x`): b's Delete,
        # Kill or State reached a's container, and containerd 1.6's clean-up after b's refused Create
        # killed it.
        namespace = namespace_of(req.id)
        if namespace is not None and ctx.namespace and namespace != ctx.namespace:
            raise NotFound(f"container {req.id} not found in namespace {ctx.namespace}")
        return await handler(req, ctx)
    return handle


def backend_method_name(name: str) -> str:
    """The TaskBackend method that answers Task API method `name`."""
    return {"ResizePty": "resize_pty", "CloseIO": "close_io"}.get(name, name.lower())


class TaskBackend:
    """Every Task RPC; a sandbox type overrides what it supports, the rest answers UNIMPLEMENTED."""

    # Whether Create handles `checkpoint` (a restore); if not, such a Create is refused before it runs.
    restores_checkpoints = False

    async def _unsupported(self, method: str) -> Message:
        raise Unimplemented(f"Task.{method} is not supported by this sandboxer")

    async def state(self, req: task.StateRequest, ctx: Context) -> task.StateResponse:
        return await self._unsupported("State")

    async def create(self, req: task.CreateTaskRequest, ctx: Context) -> task.CreateTaskResponse:
        return await self._unsupported("Create")

    async def start(self, req: task.StartRequest, ctx: Context) -> task.StartResponse:
        return await self._unsupported("Start")

    async def delete(self, req: task.DeleteRequest, ctx: Context) -> task.DeleteResponse:
        return await self._unsupported("Delete")

    async def pids(self, req: task.PidsRequest, ctx: Context) -> task.PidsResponse:
        return await self._unsupported("Pids")

    async def pause(self, req: task.PauseRequest, ctx: Context) -> empty_pb2.Empty:
        return await self._unsupported("Pause")

    async def resume(self, req: task.ResumeRequest, ctx: Context) -> empty_pb2.Empty:
        return await self._unsupported("Resume")

    async def checkpoint(self, req: task.CheckpointTaskRequest, ctx: Context) -> empty_pb2.Empty:
        return await self._unsupported("Checkpoint")

    async def kill(self, req: task.KillRequest, ctx: Context) -> empty_pb2.Empty:
        return await self._unsupported("Kill")

    async def exec(self, req: task.ExecProcessRequest, ctx: Context) -> empty_pb2.Empty:
        return await self._unsupported("Exec")

    async def resize_pty(self, req: task.ResizePtyRequest, ctx: Context) -> empty_pb2.Empty:
        return await self._unsupported("ResizePty")

    async def close_io(self, req: task.CloseIORequest, ctx: Context) -> empty_pb2.Empty:
        return await self._unsupported("CloseIO")

    async def update(self, req: task.UpdateTaskRequest, ctx: Context) -> empty_pb2.Empty:
        return await self._unsupported("Update")

    async def wait(self, req: task.WaitRequest, ctx: Context) -> task.WaitResponse:
        return await self._unsupported("Wait")

    async def stats(self, req: task.StatsRequest, ctx: Context) -> task.StatsResponse:
        return await self._unsupported("Stats")

    async def connect(self, req: task.ConnectRequest, ctx: Context) -> task.ConnectResponse:
        return await self._unsupported("Connect")

    async def shutdown(self, req: task.ShutdownRequest, ctx: Context) -> empty_pb2.Empty:
        # With API version >= 3 containerd never sends Shutdown; after a downgrade to v2 it sends it on
        # every container delete. The server lives until its sandboxes are gone, so this is a no-op.
        return empty_pb2.Empty()


def register_task_service(server: TtrpcServer, backend: TaskBackend,
                          services: tuple[str, ...] = TASK_SERVICES) -> None:
    namespace_of = getattr(backend, "namespace_of", None)
    for service in services:
        for method, request_type in TASK_METHODS.items():
            handler = getattr(backend, backend_method_name(method))
            if method == "Create" and not backend.restores_checkpoints:
                handler = _refusing_restore(handler)
            if namespace_of is not None and method not in _NO_CONTAINER_YET:
                handler = _in_its_namespace(handler, namespace_of)
            server.add_unary(service, method, request_type, handler)
