"""The shared Sandbox API server and controller, over a real gRPC unix socket, with an in-memory
sandbox type (the runtime side is covered by the integration tests)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2

from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2 as pb
from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.controller import SandboxController
from kuasar.common.errors import Unavailable
from kuasar.common.sandbox_api import SandboxApiServer
from kuasar.common.sandboxer import ExitInfo, Sandboxer, SandboxRecord, StartResult

SID = "a" * 64


class MemorySandboxer(Sandboxer):
    name = "memory"

    def __init__(self) -> None:
        self.exits: dict[str, asyncio.Future[ExitInfo]] = {}
        self.shut: list[str] = []
        self.start_delay = 0.0

    async def create(self, record: SandboxRecord) -> None:
        pass

    async def start(self, record: SandboxRecord) -> StartResult:
        await asyncio.sleep(self.start_delay)
        self.exits[record.id] = asyncio.get_running_loop().create_future()
        return StartResult(pid=4242, address="ttrpc+unix:///run/x/task.sock")

    async def wait(self, record: SandboxRecord) -> ExitInfo:
        return await self.exits[record.id]

    async def stop(self, record: SandboxRecord, timeout: float) -> None:
        future = self.exits.get(record.id)  # none for a sandbox never started: nothing to stop
        if future is not None and not future.done():
            future.set_result(ExitInfo(137))

    async def shutdown(self, record: SandboxRecord) -> None:
        self.shut.append(record.id)

    async def metrics(self, record: SandboxRecord) -> any_pb2.Any:
        return any_pb2.Any(type_url="test.Metrics", value=b"\x08\x01")

    async def recover(self, records: list[SandboxRecord]) -> None:
        for record in records:
            if record.state == "ready":
                self.exits[record.id] = asyncio.get_running_loop().create_future()


def create_request(sandbox_id: str = SID) -> pb.ControllerCreateRequest:
    config = cri.PodSandboxConfig(hostname="h")
    config.metadata.name = "pod"
    request = pb.ControllerCreateRequest(sandbox_id=sandbox_id, sandboxer="memory", netns_path="")
    request.options.type_url = "runtime.v1.PodSandboxConfig"
    request.options.value = config.SerializeToString()
    request.sandbox.extensions["metadata"].value = b'{"Version":"v1"}'
    return request


async def with_server(tmp_path: Path, body, sandboxer: MemorySandboxer | None = None) -> None:
    sandboxer = sandboxer or MemorySandboxer()
    controller = SandboxController(sandboxer, tmp_path / "state")
    await controller.recover()
    server = SandboxApiServer(controller, tmp_path / "api.sock")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix://{tmp_path / 'api.sock'}") as channel:
            await body(pb_grpc.ControllerStub(channel), sandboxer, controller)
    finally:
        await server.stop(0)
        await controller.close()


def run(tmp_path: Path, body, sandboxer: MemorySandboxer | None = None) -> None:
    asyncio.run(with_server(tmp_path, body, sandboxer))


async def expect_code(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value.details()


def test_full_lifecycle_reports_ready_then_exit_137(tmp_path: Path) -> None:
    async def body(stub, sandboxer, controller):
        await stub.Create(create_request())
        started = await stub.Start(pb.ControllerStartRequest(sandbox_id=SID))
        assert (started.pid, started.address, started.version) == (4242, "ttrpc+unix:///run/x/task.sock", 3)
        status = await stub.Status(pb.ControllerStatusRequest(sandbox_id=SID))
        assert status.state == "SANDBOX_READY" and status.version == 3
        platform = await stub.Platform(pb.ControllerPlatformRequest(sandbox_id=SID))
        assert platform.platform.os == "linux" and platform.platform.architecture in ("amd64", "arm64")
        waiter = asyncio.ensure_future(stub.Wait(pb.ControllerWaitRequest(sandbox_id=SID)))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await stub.Stop(pb.ControllerStopRequest(sandbox_id=SID))
        assert (await waiter).exit_status == 137
        status = await stub.Status(pb.ControllerStatusRequest(sandbox_id=SID))
        assert status.state == "SANDBOX_NOTREADY" and status.exited_at.seconds > 0
        await stub.Stop(pb.ControllerStopRequest(sandbox_id=SID))  # idempotent
        metrics = await stub.Metrics(pb.ControllerMetricsRequest(sandbox_id=SID))
        assert metrics.metrics.data.type_url == "test.Metrics"
        await stub.Shutdown(pb.ControllerShutdownRequest(sandbox_id=SID))
        assert sandboxer.shut == [SID]
        await expect_code(stub.Status(pb.ControllerStatusRequest(sandbox_id=SID)), grpc.StatusCode.NOT_FOUND)
        assert list((tmp_path / "state").iterdir()) == []

    run(tmp_path, body)


def test_unknown_ids_not_found_except_stop_and_shutdown(tmp_path: Path) -> None:
    async def body(stub, sandboxer, controller):
        for call in (stub.Start(pb.ControllerStartRequest(sandbox_id=SID)),
                     stub.Status(pb.ControllerStatusRequest(sandbox_id=SID)),
                     stub.Wait(pb.ControllerWaitRequest(sandbox_id=SID)),
                     stub.Platform(pb.ControllerPlatformRequest(sandbox_id=SID)),
                     stub.Metrics(pb.ControllerMetricsRequest(sandbox_id=SID)),
                     stub.Update(pb.ControllerUpdateRequest(sandbox_id=SID))):
            await expect_code(call, grpc.StatusCode.NOT_FOUND)
        await stub.Stop(pb.ControllerStopRequest(sandbox_id=SID))
        await stub.Shutdown(pb.ControllerShutdownRequest(sandbox_id=SID))

    run(tmp_path, body)


@pytest.mark.parametrize("bad", ["../../etc", "a/b", "", "x" * 77, "-lead", "sp ace"])
def test_invalid_ids_are_rejected_and_change_nothing(tmp_path: Path, bad: str) -> None:
    async def body(stub, sandboxer, controller):
        await expect_code(stub.Create(create_request(bad)), grpc.StatusCode.INVALID_ARGUMENT)
        assert list((tmp_path / "state").iterdir()) == []

    run(tmp_path, body)


def test_garbage_pod_config_is_kept_opaque_but_missing_id_is_invalid(tmp_path: Path) -> None:
    async def body(stub, sandboxer, controller):
        await expect_code(stub.Start(pb.ControllerStartRequest()), grpc.StatusCode.INVALID_ARGUMENT)
        bad = create_request()
        bad.sandbox.extensions["metadata"].value = b"{not json"
        await expect_code(stub.Create(bad), grpc.StatusCode.INVALID_ARGUMENT)
        bad.sandbox.extensions["metadata"].value = b"[" * 100_000 + b"]" * 100_000  # deeper than json goes
        await expect_code(stub.Create(bad), grpc.StatusCode.INVALID_ARGUMENT)
        bad.sandbox.extensions["metadata"].value = b'["ID"]'  # what a verbose Status reads is an object
        await expect_code(stub.Create(bad), grpc.StatusCode.INVALID_ARGUMENT)
        assert not (tmp_path / "state").exists() or list((tmp_path / "state").iterdir()) == []

    run(tmp_path, body)


def test_a_verbose_status_carries_containerds_sandbox_info_and_no_pid_once_exited(tmp_path: Path) -> None:
    # `crictl inspectp` shows containerd's own sandboxes' SandboxInfo JSON under "info" (`.info.pid`,
    # `.info.config`); CRI passes a sandboxer's map on as it is. An exited pod's pid may be reused.
    fields = {"ID": SID, "Name": "pod_default_uid_0", "RuntimeHandler": "kuasar-runc",
              "Config": {"metadata": {"name": "pod", "uid": "uid"}, "hostname": "h"}}
    metadata = {"Version": "v1", "Metadata": fields}  # as containerd versions it

    async def body(stub, sandboxer, controller):
        request = create_request()
        request.sandbox.extensions["metadata"].value = json.dumps(metadata).encode()
        await stub.Create(request)
        created = json.loads((await stub.Status(pb.ControllerStatusRequest(sandbox_id=SID, verbose=True))).info["info"])
        assert (created["pid"], created["processStatus"]) == (0, "created")
        await stub.Start(pb.ControllerStartRequest(sandbox_id=SID))
        status = await stub.Status(pb.ControllerStatusRequest(sandbox_id=SID, verbose=True))
        info = json.loads(status.info["info"])
        assert (status.pid, info["pid"], info["processStatus"]) == (4242, 4242, "running")
        assert info["config"] == fields["Config"] and info["runtimeHandler"] == "kuasar-runc"
        assert info["sandboxMetadata"] == metadata and info["netNamespaceClosed"] is False
        assert "info" not in (await stub.Status(pb.ControllerStatusRequest(sandbox_id=SID))).info
        await stub.Stop(pb.ControllerStopRequest(sandbox_id=SID))
        stopped = await stub.Status(pb.ControllerStatusRequest(sandbox_id=SID, verbose=True))
        info = json.loads(stopped.info["info"])
        assert (stopped.state, stopped.pid, info["pid"], info["processStatus"]) == ("SANDBOX_NOTREADY", 0, 0, "stopped")

    run(tmp_path, body)


def test_concurrent_create_of_same_id_has_one_winner(tmp_path: Path) -> None:
    async def body(stub, sandboxer, controller):
        results = await asyncio.gather(*(stub.Create(create_request()) for _ in range(5)),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(errors) == 4
        assert {e.code() for e in errors} == {grpc.StatusCode.ALREADY_EXISTS}

    run(tmp_path, body)


def test_stop_during_start_is_consistent(tmp_path: Path) -> None:
    sandboxer = MemorySandboxer()
    sandboxer.start_delay = 0.2

    async def body(stub, sandboxer, controller):
        await stub.Create(create_request())
        start = asyncio.ensure_future(stub.Start(pb.ControllerStartRequest(sandbox_id=SID)))
        await asyncio.sleep(0.05)
        await stub.Stop(pb.ControllerStopRequest(sandbox_id=SID))
        await start
        status = await stub.Status(pb.ControllerStatusRequest(sandbox_id=SID))
        assert status.state == "SANDBOX_NOTREADY"
        assert (await stub.Wait(pb.ControllerWaitRequest(sandbox_id=SID))).exit_status == 137

    run(tmp_path, body, sandboxer)


def test_socket_is_private_and_state_survives_restart(tmp_path: Path) -> None:
    async def first(stub, sandboxer, controller):
        mode = stat.S_IMODE(os.stat(tmp_path / "api.sock").st_mode)
        assert mode == 0o600
        await stub.Create(create_request())
        await stub.Start(pb.ControllerStartRequest(sandbox_id=SID))

    async def second(stub, sandboxer, controller):
        status = await stub.Status(pb.ControllerStatusRequest(sandbox_id=SID))
        assert status.state == "SANDBOX_READY" and status.pid == 4242
        waiter = asyncio.ensure_future(stub.Wait(pb.ControllerWaitRequest(sandbox_id=SID)))
        await asyncio.sleep(0.05)
        sandboxer.exits[SID].set_result(ExitInfo(3))
        assert (await waiter).exit_status == 3

    run(tmp_path, first)
    run(tmp_path, second)


def test_more_pending_waits_than_http2_default_stream_limit_do_not_block_other_calls(tmp_path: Path) -> None:
    """containerd keeps one Controller.Wait open per pod on its one connection to us: hundreds of pods
    mean hundreds of concurrent streams, and every other call must still get through."""
    pods = 300

    async def body(stub, sandboxer: MemorySandboxer, controller) -> None:
        ids = [f"{n:064x}" for n in range(1, pods + 1)]
        for sandbox_id in ids:
            await stub.Create(create_request(sandbox_id))
            await stub.Start(pb.ControllerStartRequest(sandbox_id=sandbox_id))
        waits = [asyncio.ensure_future(stub.Wait(pb.ControllerWaitRequest(sandbox_id=i))) for i in ids]
        await asyncio.sleep(0.5)
        assert not any(w.done() for w in waits)
        status = await asyncio.wait_for(stub.Status(pb.ControllerStatusRequest(sandbox_id=ids[-1])), 10)
        assert status.state == "SANDBOX_READY"
        for sandbox_id in ids:
            await asyncio.wait_for(stub.Stop(pb.ControllerStopRequest(sandbox_id=sandbox_id)), 10)
        assert {(await w).exit_status for w in waits} == {137}

    run(tmp_path, body)


def test_the_connection_forgets_old_closed_streams(tmp_path: Path) -> None:
    """h2 would remember 65,536 closed streams of containerd's one long-lived connection (~10 MB)."""
    import gc

    from kuasar.common.grpc_h2 import REMEMBERED_CLOSED_STREAMS, GrpcConnection

    async def body(stub, sandboxer: MemorySandboxer, controller) -> None:
        await stub.Create(create_request())
        for _ in range(REMEMBERED_CLOSED_STREAMS + 300):
            await stub.Platform(pb.ControllerPlatformRequest(sandbox_id=SID))
        protocols = [o for o in gc.get_objects() if isinstance(o, GrpcConnection)]
        remembered = [len(p.h2._closed_streams) for p in protocols]
        assert remembered and max(remembered) <= REMEMBERED_CLOSED_STREAMS

    run(tmp_path, body)


def test_a_bug_in_a_sandbox_type_is_unknown_and_names_the_method(tmp_path: Path) -> None:
    class Broken(MemorySandboxer):
        async def metrics(self, record: SandboxRecord) -> any_pb2.Any:
            raise RuntimeError("metrics exploded")

    async def body(stub, sandboxer, controller):
        await stub.Create(create_request())
        details = await expect_code(stub.Metrics(pb.ControllerMetricsRequest(sandbox_id=SID)),
                                    grpc.StatusCode.UNKNOWN)
        assert "Controller/Metrics" in details and "metrics exploded" in details
        assert (await stub.Status(pb.ControllerStatusRequest(sandbox_id=SID))).sandbox_id == SID

    run(tmp_path, body, Broken())


def shim_request(sandbox_id: str, bundle: Path) -> pb.ControllerCreateRequest:
    """A Create as the containerd 1.6/1.7 forwarding shim sends it for its owner container's bundle."""
    request = create_request(sandbox_id)
    request.sandbox.labels["io.kuasar.shim"] = "v2"
    request.sandbox.labels["io.kuasar.shim.bundle"] = str(bundle)
    return request


def test_a_forwarding_shims_sandbox_whose_owners_bundle_is_gone_is_removed(tmp_path: Path) -> None:
    # The owner's `delete` could not reach us (we were down), and containerd removed its bundle after it.
    bundles = tmp_path / "io.containerd.runtime.v2.task" / "k8s.io"
    live, gone, unseen, later = "b" * 64, "c" * 64, "d" * 64, "e" * 64
    for sandbox_id in (live, gone, later):
        (bundles / sandbox_id).mkdir(parents=True)

    async def first(stub, sandboxer, controller):
        # `unseen`: a bundle in a folder we cannot see proves nothing, and is kept
        for sandbox_id, bundle in ((live, bundles / live), (gone, bundles / gone),
                                   (unseen, tmp_path / "elsewhere" / unseen)):
            await stub.Create(shim_request(sandbox_id, bundle))
            await stub.Start(pb.ControllerStartRequest(sandbox_id=sandbox_id))

    async def second(stub, sandboxer, controller):
        assert sandboxer.shut == [gone]
        await expect_code(stub.Status(pb.ControllerStatusRequest(sandbox_id=gone)), grpc.StatusCode.NOT_FOUND)
        for sandbox_id in (live, unseen):
            assert (await stub.Status(pb.ControllerStatusRequest(sandbox_id=sandbox_id))).state == "SANDBOX_READY"
        # One orphaned while we run: the next sandbox the shim makes has it swept, off its own Create.
        (bundles / live).rmdir()
        await stub.Create(shim_request(later, bundles / later))
        for _ in range(100):
            if live in sandboxer.shut:
                break
            await asyncio.sleep(0.02)
        assert sandboxer.shut == [gone, live]
        await expect_code(stub.Status(pb.ControllerStatusRequest(sandbox_id=live)), grpc.StatusCode.NOT_FOUND)

    run(tmp_path, first)
    (bundles / gone).rmdir()
    run(tmp_path, second)


def test_an_orphan_whose_bundle_is_back_by_its_turn_in_the_sweep_is_kept(tmp_path: Path) -> None:
    # The sweep's list was made once; removing one orphan may take long, and meanwhile the owner of the
    # next (`ctr run` of the same id) may be back and rejoin its ready sandbox.
    bundles = tmp_path / "io.containerd.runtime.v2.task" / "k8s.io"
    first, second = "f" * 64, "0" * 64
    for sandbox_id in (first, second):
        (bundles / sandbox_id).mkdir(parents=True)

    class OwnerReturns(MemorySandboxer):
        async def shutdown(self, record: SandboxRecord) -> None:
            await super().shutdown(record)
            if record.id == first:
                (bundles / second).mkdir()

    async def body(stub, sandboxer, controller):
        for sandbox_id in (first, second):
            await stub.Create(shim_request(sandbox_id, bundles / sandbox_id))
            await stub.Start(pb.ControllerStartRequest(sandbox_id=sandbox_id))
        if controller._orphan_sweep is not None:  # the Creates' own sweeps (nothing orphaned yet)
            await controller._orphan_sweep
        for sandbox_id in (first, second):
            (bundles / sandbox_id).rmdir()
        await controller.remove_shim_orphans()
        assert sandboxer.shut == [first]
        assert (await stub.Status(pb.ControllerStatusRequest(sandbox_id=second))).state == "SANDBOX_READY"

    run(tmp_path, body, OwnerReturns())


class FailingStart(MemorySandboxer):
    async def start(self, record: SandboxRecord) -> StartResult:
        await asyncio.sleep(0.1)
        raise RuntimeError("the pod could not be started")


def test_a_wait_on_a_sandbox_whose_start_failed_ends_with_not_found(tmp_path: Path) -> None:
    # The failed Start removes the sandbox there and then; a Wait made before it hung until its deadline.
    async def body(stub, sandboxer, controller):
        await stub.Create(create_request())
        waiter = asyncio.ensure_future(stub.Wait(pb.ControllerWaitRequest(sandbox_id=SID)))
        await asyncio.sleep(0.05)
        await expect_code(stub.Start(pb.ControllerStartRequest(sandbox_id=SID)), grpc.StatusCode.UNKNOWN)
        details = await expect_code(asyncio.wait_for(waiter, 5), grpc.StatusCode.NOT_FOUND)
        assert "removed" in details
        await expect_code(stub.Wait(pb.ControllerWaitRequest(sandbox_id=SID)), grpc.StatusCode.NOT_FOUND)
    run(tmp_path, body, FailingStart())


class StartAndFirstStopLost(FailingStart):
    """A Start that failed because its helper died under it; the first call of its removal meets the dead
    connection (UNAVAILABLE), the next reaches a new helper."""

    def __init__(self) -> None:
        super().__init__()
        self.stops = 0

    async def stop(self, record: SandboxRecord, timeout: float) -> None:
        self.stops += 1
        if self.stops == 1:
            raise Unavailable("ttrpc connection closed: connection closed by server")


def test_a_failed_starts_removal_tries_again_past_a_lost_connection(tmp_path: Path) -> None:
    # Left to a restart of the sandboxer before: the pod's files and whatever its Start made stayed.
    async def body(stub, sandboxer, controller):
        await stub.Create(create_request())
        await expect_code(stub.Start(pb.ControllerStartRequest(sandbox_id=SID)), grpc.StatusCode.UNKNOWN)
        assert sandboxer.stops == 2 and sandboxer.shut == [SID]
        await expect_code(stub.Status(pb.ControllerStatusRequest(sandbox_id=SID)), grpc.StatusCode.NOT_FOUND)
        assert list((tmp_path / "state").iterdir()) == []
    run(tmp_path, body, StartAndFirstStopLost())
