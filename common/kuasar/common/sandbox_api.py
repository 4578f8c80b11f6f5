"""gRPC `containerd.services.sandbox.v1.Controller` on a unix socket, translating to SandboxController."""

from __future__ import annotations

import json
import logging
import os
import platform
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2

from .api.containerd.services.sandbox.v1 import sandbox_pb2 as pb
from .api.containerd.services.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from .api.containerd.types import metrics_pb2, platform_pb2
from .controller import SandboxController, new_record
from .errors import InvalidArgument, KuasarError
from .sandboxer import SandboxRecord, SandboxState

log = logging.getLogger(__name__)

R = TypeVar("R")

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
# containerd stores CRI's own metadata under this extension key (its type_url is a Go type path).
CRI_METADATA_EXTENSION = "metadata"
# Architecture names as Go's GOARCH spells them; containerd compares platforms by these.
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
           "s390x": "s390x", "riscv64": "riscv64"}


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    if ns:
        ts.FromNanoseconds(ns)
    return ts


def _require_id(sandbox_id: str) -> str:
    if not sandbox_id:
        raise InvalidArgument("sandbox_id is required")
    return sandbox_id


def host_platform() -> platform_pb2.Platform:
    machine = platform.machine()
    return platform_pb2.Platform(os="linux", architecture=_GOARCH.get(machine, machine))


class ControllerService(pb_grpc.ControllerServicer):
    def __init__(self, controller: SandboxController) -> None:
        self.controller = controller

    async def _call(self, name: str, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[R]]) -> R:
        try:
            return await fn()
        except KuasarError as exc:
            log.info("%s failed: %s (%s)", name, exc.message, exc.code.name)
            await context.abort(_STATUS_CODES[int(exc.code)], exc.message)
        except Exception as exc:
            log.exception("%s failed", name)
            await context.abort(grpc.StatusCode.UNKNOWN, f"{name}: {exc}")
        raise AssertionError("unreachable")  # context.abort always raises

    async def Create(self, request: pb.ControllerCreateRequest, context):  # noqa: N802 - gRPC names
        async def run() -> pb.ControllerCreateResponse:
            _require_id(request.sandbox_id)
            metadata: dict[str, Any] = {}
            ext = request.sandbox.extensions.get(CRI_METADATA_EXTENSION)
            if ext is not None and ext.value:
                try:
                    metadata = json.loads(ext.value)
                except ValueError:
                    raise InvalidArgument("sandbox.extensions[metadata] is not JSON") from None
            record = new_record(request.sandbox_id, request.sandboxer, request.netns_path,
                                request.options.value, metadata, dict(request.sandbox.labels),
                                dict(request.annotations))
            await self.controller.create(record)
            return pb.ControllerCreateResponse(sandbox_id=request.sandbox_id)

        return await self._call("Create", context, run)

    async def Start(self, request: pb.ControllerStartRequest, context):  # noqa: N802
        async def run() -> pb.ControllerStartResponse:
            record = await self.controller.start(_require_id(request.sandbox_id))
            return pb.ControllerStartResponse(
                sandbox_id=record.id, pid=record.pid, created_at=_timestamp(record.created_at_ns),
                labels=record.labels, address=record.address, version=record.version)

        return await self._call("Start", context, run)

    async def Platform(self, request: pb.ControllerPlatformRequest, context):  # noqa: N802
        async def run() -> pb.ControllerPlatformResponse:
            self.controller.get(_require_id(request.sandbox_id))
            return pb.ControllerPlatformResponse(platform=host_platform())

        return await self._call("Platform", context, run)

    async def Stop(self, request: pb.ControllerStopRequest, context):  # noqa: N802
        async def run() -> pb.ControllerStopResponse:
            await self.controller.stop(_require_id(request.sandbox_id), request.timeout_secs)
            return pb.ControllerStopResponse()

        return await self._call("Stop", context, run)

    async def Wait(self, request: pb.ControllerWaitRequest, context):  # noqa: N802
        async def run() -> pb.ControllerWaitResponse:
            record = await self.controller.wait(_require_id(request.sandbox_id))
            return pb.ControllerWaitResponse(exit_status=record.exit_status,
                                             exited_at=_timestamp(record.exited_at_ns))

        return await self._call("Wait", context, run)

    async def Status(self, request: pb.ControllerStatusRequest, context):  # noqa: N802
        async def run() -> pb.ControllerStatusResponse:
            record = self.controller.get(_require_id(request.sandbox_id))
            return self._status(record, request.verbose)

        return await self._call("Status", context, run)

    def _status(self, record: SandboxRecord, verbose: bool) -> pb.ControllerStatusResponse:
        ready = record.state == SandboxState.READY
        info = self.controller.sandboxer.status_info(record, verbose)
        if verbose:
            info.setdefault("state", record.state)
            info.setdefault("netns_path", record.netns_path)
        response = pb.ControllerStatusResponse(
            sandbox_id=record.id, pid=record.pid,
            state="SANDBOX_READY" if ready else "SANDBOX_NOTREADY", info=info,
            created_at=_timestamp(record.created_at_ns), address=record.address, version=record.version)
        if record.state == SandboxState.STOPPED:
            response.exited_at.CopyFrom(_timestamp(record.exited_at_ns))
        return response

    async def Shutdown(self, request: pb.ControllerShutdownRequest, context):  # noqa: N802
        async def run() -> pb.ControllerShutdownResponse:
            await self.controller.shutdown(_require_id(request.sandbox_id))
            return pb.ControllerShutdownResponse()

        return await self._call("Shutdown", context, run)

    async def Metrics(self, request: pb.ControllerMetricsRequest, context):  # noqa: N802
        async def run() -> pb.ControllerMetricsResponse:
            record = self.controller.get(_require_id(request.sandbox_id))
            data = await self.controller.sandboxer.metrics(record)
            metric = metrics_pb2.Metric(id=record.id, data=data)
            metric.timestamp.GetCurrentTime()
            return pb.ControllerMetricsResponse(metrics=metric)

        return await self._call("Metrics", context, run)

    async def Update(self, request: pb.ControllerUpdateRequest, context):  # noqa: N802
        async def run() -> pb.ControllerUpdateResponse:
            fields = list(request.fields)

            def apply(record: SandboxRecord) -> None:
                # containerd sends the whole Sandbox; `fields` narrows what changed (empty = labels).
                if not fields or "labels" in fields:
                    record.labels = dict(request.sandbox.labels)
                for key in fields:
                    if key.startswith("extensions."):
                        name = key.split(".", 1)[1]
                        ext = request.sandbox.extensions.get(name)
                        record.extra.setdefault("extensions", {})[name] = (
                            ext.value.decode(errors="replace") if ext is not None else None)

            await self.controller.update(_require_id(request.sandbox_id), apply, fields)
            return pb.ControllerUpdateResponse()

        return await self._call("Update", context, run)


class SandboxApiServer:
    """grpc.aio server bound to the `--listen` unix socket, created 0600 (only root talks to us)."""

    def __init__(self, controller: SandboxController, listen: Path) -> None:
        self.listen = listen
        self.server = grpc.aio.server()
        pb_grpc.add_ControllerServicer_to_server(ControllerService(controller), self.server)

    async def start(self) -> None:
        if not self.listen.parent.exists():
            self.listen.parent.mkdir(parents=True, mode=0o700)  # a directory we make is ours alone
        if self.listen.exists() or self.listen.is_symlink():
            self.listen.unlink()
        old_umask = os.umask(0o177)  # no window in which the socket is reachable by others
        try:
            self.server.add_insecure_port(f"unix://{self.listen}")
            await self.server.start()
        finally:
            os.umask(old_umask)
        os.chmod(self.listen, 0o600)
        log.info("Sandbox API listening on %s", self.listen)

    async def stop(self, grace: float = 1.0) -> None:
        await self.server.stop(grace)
        try:
            self.listen.unlink()
        except FileNotFoundError:
            pass
