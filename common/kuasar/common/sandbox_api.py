"""gRPC `containerd.services.sandbox.v1.Controller` on a unix socket, translating to SandboxController.

Served by `grpc_h2` (h2's HTTP/2 on our asyncio loop) rather than grpcio, whose core library alone adds
about 11 MB of resident memory and a pool of threads to serve nine unary methods to one local client.
grpcio stays for our gRPC *clients* (kuasar-ctl, the shim v2 helper, the tests), which also checks that
the two implementations interoperate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from .api.containerd.services.sandbox.v1 import sandbox_pb2 as pb
from .api.containerd.types import metrics_pb2, platform_pb2
from .controller import SandboxController, new_record
from .errors import InvalidArgument, KuasarError
from .grpc_h2 import GrpcError, GrpcServer, Method, ReplyNow
from .sandboxer import SandboxRecord, SandboxState

log = logging.getLogger(__name__)

SERVICE = "containerd.services.sandbox.v1.Controller"
# How long in-flight calls get to finish when the sandboxer is stopped.
STOP_GRACE = 1.0
# containerd stores CRI's own metadata under this extension key (its type_url is a Go type path).
CRI_METADATA_EXTENSION = "metadata"
# Where containerd's own sandboxes put their SandboxInfo JSON in a verbose Status; CRI hands the map on
# as it is, and `crictl inspectp` users read `.info.pid` and `.info.config` there.
CRI_INFO_KEY = "info"
# SandboxInfo's processStatus: containerd's task status names.
PROCESS_STATUS = {SandboxState.CREATED: "created", SandboxState.READY: "running", SandboxState.STOPPED: "stopped"}
# Architecture names as Go's GOARCH spells them; containerd compares platforms by these.
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
           "s390x": "s390x", "riscv64": "riscv64"}


def cri_sandbox_info(record: SandboxRecord, pid: int) -> str:
    """The fields of containerd's SandboxInfo a sandboxer knows: the process, and CRI's own metadata
    of the pod (its config, runtime handler and CNI result as of Create); no runtime spec, as a pod
    here is no container."""
    # containerd versions the JSON of its Metadata ({"Version": "v1", "Metadata": {...}}), and so shows it.
    metadata = record.cri_metadata if isinstance(record.cri_metadata, dict) else {}  # older records took any JSON
    fields = metadata.get("Metadata")
    fields = fields if isinstance(fields, dict) else {}
    return json.dumps({
        "pid": pid,
        "processStatus": PROCESS_STATUS.get(record.state, "unknown"),
        "netNamespaceClosed": bool(record.netns_path) and not os.path.exists(record.netns_path),
        "runtimeHandler": fields.get("RuntimeHandler", ""),
        "config": fields.get("Config"),
        "cniResult": fields.get("CNIResult"),
        "sandboxMetadata": metadata,
    })


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
    machine = os.uname().machine
    return platform_pb2.Platform(os="linux", architecture=_GOARCH.get(machine, machine))


# Method name -> (request type, response type), as the service is declared in sandbox.proto.
METHODS: dict[str, tuple[type[Message], type[Message]]] = {
    name: (getattr(pb, f"Controller{name}Request"), getattr(pb, f"Controller{name}Response"))
    for name in ("Create", "Start", "Platform", "Stop", "Wait", "Status", "Shutdown", "Metrics", "Update")
}


# Answered without waiting for anything (see grpc_h2.Method); containerd makes five Status calls and one
# Platform call per pod start, all on the pod's critical path.
ANSWERED_FROM_MEMORY = frozenset({"Status", "Platform"})
# Replied to before the call is done (SandboxController.create and .start): whether the reply got out
# decides what happens to the sandbox.
REPLIED_EARLY = frozenset({"Create", "Start"})


def _start_response(record: SandboxRecord) -> pb.ControllerStartResponse:
    return pb.ControllerStartResponse(
        sandbox_id=record.id, pid=record.pid, created_at=_timestamp(record.created_at_ns),
        labels=record.labels, address=record.address, version=record.version)


def _grpc_error(name: str, exc: KuasarError) -> GrpcError:
    log.info("%s failed: %s (%s)", name, exc.message, exc.code.name)
    return GrpcError(exc.code, exc.message)


class ControllerService:
    """The nine Controller methods, by the paths gRPC calls them."""

    def __init__(self, controller: SandboxController) -> None:
        self.controller = controller

    def methods(self) -> dict[str, Method]:
        return {f"/{SERVICE}/{name}": (Method(request, answer=self._answer(name)) if name in ANSWERED_FROM_MEMORY
                                       else Method(request, self._unary(name), replies_early=name in REPLIED_EARLY))
                for name, (request, _) in METHODS.items()}

    def _unary(self, name: str) -> Callable[..., Awaitable[Message]]:
        method = getattr(self, name)

        async def handle(request: Message, *reply_now: ReplyNow) -> Message:
            # Any other exception is grpc_h2's to log and answer as UNKNOWN, naming the method.
            try:
                return await method(request, *reply_now)
            except KuasarError as exc:
                raise _grpc_error(name, exc) from None

        return handle

    def _answer(self, name: str) -> Callable[[Message], Message]:
        method = getattr(self, name)

        def answer(request: Message) -> Message:
            try:
                return method(request)
            except KuasarError as exc:
                raise _grpc_error(name, exc) from None

        return answer

    async def Create(self, request: pb.ControllerCreateRequest,  # noqa: N802
                     reply_now: ReplyNow) -> pb.ControllerCreateResponse:
        _require_id(request.sandbox_id)
        metadata: dict[str, Any] = {}
        ext = request.sandbox.extensions.get(CRI_METADATA_EXTENSION)
        if ext is not None and ext.value:
            try:
                metadata = json.loads(ext.value)
            except (ValueError, RecursionError):  # RecursionError: nested deeper than json can follow
                raise InvalidArgument("sandbox.extensions[metadata] is not JSON") from None
            if not isinstance(metadata, dict):
                raise InvalidArgument("sandbox.extensions[metadata] is not a JSON object")
        record = new_record(request.sandbox_id, request.sandboxer, request.netns_path,
                            request.options.value, metadata, dict(request.sandbox.labels),
                            dict(request.annotations))
        response = pb.ControllerCreateResponse(sandbox_id=request.sandbox_id)
        await self.controller.create(record, lambda _: reply_now(response))
        return response

    async def Start(self, request: pb.ControllerStartRequest,  # noqa: N802
                    reply_now: ReplyNow) -> pb.ControllerStartResponse:
        record = await self.controller.start(_require_id(request.sandbox_id),
                                             lambda started: reply_now(_start_response(started)))
        return _start_response(record)  # sent only if not sent already (a sandbox started before)

    def Platform(self, request: pb.ControllerPlatformRequest) -> pb.ControllerPlatformResponse:  # noqa: N802
        self.controller.get(_require_id(request.sandbox_id))
        return pb.ControllerPlatformResponse(platform=host_platform())

    async def Stop(self, request: pb.ControllerStopRequest) -> pb.ControllerStopResponse:  # noqa: N802
        await self.controller.stop(_require_id(request.sandbox_id), request.timeout_secs)
        return pb.ControllerStopResponse()

    async def Wait(self, request: pb.ControllerWaitRequest) -> pb.ControllerWaitResponse:  # noqa: N802
        record = await self.controller.wait(_require_id(request.sandbox_id))
        return pb.ControllerWaitResponse(exit_status=record.exit_status,
                                         exited_at=_timestamp(record.exited_at_ns))

    def Status(self, request: pb.ControllerStatusRequest) -> pb.ControllerStatusResponse:  # noqa: N802
        record = self.controller.get(_require_id(request.sandbox_id))
        return self._status(record, request.verbose)

    def _status(self, record: SandboxRecord, verbose: bool) -> pb.ControllerStatusResponse:
        ready = record.state == SandboxState.READY
        # No pid once it exited, as containerd's own sandboxes: CRI builds a container's namespace paths
        # from this pid, which may be another process's by then.
        pid = 0 if record.state == SandboxState.STOPPED else record.pid
        info = self.controller.sandboxer.status_info(record, verbose)
        if verbose:
            info.setdefault("state", record.state)
            info.setdefault("netns_path", record.netns_path)
            info.setdefault(CRI_INFO_KEY, cri_sandbox_info(record, pid))
        response = pb.ControllerStatusResponse(
            sandbox_id=record.id, pid=pid,
            state="SANDBOX_READY" if ready else "SANDBOX_NOTREADY", info=info,
            created_at=_timestamp(record.created_at_ns), address=record.address, version=record.version)
        if record.state == SandboxState.STOPPED:
            response.exited_at.CopyFrom(_timestamp(record.exited_at_ns))
        return response

    async def Shutdown(self, request: pb.ControllerShutdownRequest) -> pb.ControllerShutdownResponse:  # noqa: N802
        await self.controller.shutdown(_require_id(request.sandbox_id))
        return pb.ControllerShutdownResponse()

    async def Metrics(self, request: pb.ControllerMetricsRequest) -> pb.ControllerMetricsResponse:  # noqa: N802
        record = self.controller.get(_require_id(request.sandbox_id))
        data = await self.controller.sandboxer.metrics(record)
        metric = metrics_pb2.Metric(id=record.id, data=data)
        metric.timestamp.GetCurrentTime()
        return pb.ControllerMetricsResponse(metrics=metric)

    async def Update(self, request: pb.ControllerUpdateRequest) -> pb.ControllerUpdateResponse:  # noqa: N802
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


class SandboxApiServer:
    """The gRPC server bound to the `--listen` unix socket, created 0600 (only root talks to us)."""

    def __init__(self, controller: SandboxController, listen: Path, ready: asyncio.Event | None = None) -> None:
        self.listen = listen
        self.server = GrpcServer(ControllerService(controller).methods(), ready)

    async def start(self) -> None:
        # A directory we make is ours alone; /run/kuasar is shared by every type's sandboxer, which
        # systemd may start at once.
        self.listen.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.listen.lstat().st_mode):  # a dead sandboxer's (daemon._check_listen)
                self.listen.unlink()
        await self.server.start(self.listen)
        log.info("Sandbox API listening on %s", self.listen)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        await self.server.stop(grace)  # calls still running then (a Wait may block forever) are cancelled
        try:
            self.listen.unlink()
        except FileNotFoundError:
            pass
