"""The Quark task relay against a stand-in for QVisor's socket that, like QVisor, serves only
`containerd.task.v2.Task`: v3 calls arrive as v2, a Create finds its container laid out in the sandbox
bundle (as QVisor reads it, at `/<id>`), a Delete takes the layout down, and the relay ends with QVisor."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from kuasar.common.task_api import TaskBackend, register_task_service
from kuasar.common.ttrpc import NAMESPACE_KEY, Context, TtrpcClient, TtrpcServer
from kuasar.quark import quark_containers, task_relay

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bind mounts)")


class QVisor(TaskBackend):
    def __init__(self, sandbox_bundle: Path) -> None:
        self.bundle = sandbox_bundle
        self.calls: list[tuple[str, object, str | None]] = []

    async def create(self, req: task.CreateTaskRequest, ctx: Context) -> task.CreateTaskResponse:
        self.calls.append(("Create", req, ctx.namespace))
        laid_out = self.bundle / req.bundle.lstrip("/")
        if not (laid_out / "config.json").is_file() or not (laid_out / "rootfs" / "hello").is_file():
            raise FailedPrecondition(f"nothing laid out at {laid_out}")
        return task.CreateTaskResponse(pid=4242)

    async def exec(self, req: task.ExecProcessRequest, ctx: Context) -> empty_pb2.Empty:
        self.calls.append(("Exec", req, ctx.namespace))
        return empty_pb2.Empty()

    async def state(self, req: task.StateRequest, ctx: Context) -> task.StateResponse:
        self.calls.append(("State", req, ctx.namespace))
        return task.StateResponse(id=req.id, pid=4242)

    async def delete(self, req: task.DeleteRequest, ctx: Context) -> task.DeleteResponse:
        self.calls.append(("Delete", req, ctx.namespace))
        return task.DeleteResponse(pid=4242, exit_status=3)


def host_side(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(QVisor's sandbox bundle, a container's host bundle as containerd writes it, its image layer)."""
    sandbox = tmp_path / "base" / "sandbox"
    sandbox.mkdir(parents=True)
    host_bundle, image = tmp_path / "host-bundle", tmp_path / "image"
    host_bundle.mkdir()
    image.mkdir()
    (image / "hello").write_text("hi")
    (host_bundle / "config.json").write_text(json.dumps({"root": {"path": "rootfs"}, "mounts": []}))
    return sandbox, host_bundle, image


def test_v3_calls_reach_qvisor_as_v2_with_the_container_laid_out_in_its_bundle(tmp_path: Path) -> None:
    sandbox, host_bundle, image = host_side(tmp_path)
    stdout = tmp_path / "stdout"
    os.mkfifo(stdout)
    exec_out = tmp_path / "exec-stdout"
    os.mkfifo(exec_out)
    qvisor = QVisor(sandbox)

    async def scenario() -> None:
        upstream = TtrpcServer()
        register_task_service(upstream, qvisor, services=(task_relay.QUARK_SERVICE,))
        await upstream.start_unix(str(tmp_path / "quark.sock"))
        args = argparse.Namespace(listen=str(tmp_path / "task.sock"), upstream=str(tmp_path / "quark.sock"),
                                  sandbox_bundle=str(sandbox), probe_timeout=5.0)
        relay = asyncio.create_task(task_relay.serve(args))
        while not (tmp_path / "task.sock").exists():  # noqa: ASYNC110 - the relay binds it
            await asyncio.sleep(0.01)
        client = await TtrpcClient.connect_unix(str(tmp_path / "task.sock"))
        meta = {NAMESPACE_KEY: "k8s.io"}
        v3 = task_relay.SERVED_SERVICE
        async with await TtrpcClient.connect_unix(str(tmp_path / "quark.sock")) as direct:
            with pytest.raises(Unimplemented):  # what containerd dialing QVisor itself would get
                await direct.call(v3, "State", task.StateRequest(id="c1"), task.StateResponse)
        created = await client.call(v3, "Create", task.CreateTaskRequest(
            id="c1", bundle=str(host_bundle), stdout=str(stdout),
            rootfs=[{"type": "bind", "source": str(image), "options": ["rbind"]}]), task.CreateTaskResponse,
            metadata=meta)
        assert created.pid == 4242
        name, forwarded, namespace = qvisor.calls[-1]
        assert (name, namespace) == ("Create", "k8s.io")
        assert (forwarded.bundle, list(forwarded.rootfs), forwarded.stdout) == ("/c1", [], "/c1/stdout")
        assert quark_containers.mounts_under(sandbox / "c1")  # rootfs and FIFO bound in QVisor's root
        await client.call(v3, "Exec", task.ExecProcessRequest(id="c1", exec_id="e1", stdout=str(exec_out)),
                          metadata=meta)
        assert qvisor.calls[-1][1].stdout == "/c1/e1-stdout" and (sandbox / "c1" / "e1-stdout").exists()
        await client.call(v3, "Delete", task.DeleteRequest(id="c1", exec_id="e1"), task.DeleteResponse)
        assert not (sandbox / "c1" / "e1-stdout").exists()
        state = await client.call(v3, "State", task.StateRequest(id="c1"), task.StateResponse)
        assert state.pid == 4242
        deleted = await client.call(v3, "Delete", task.DeleteRequest(id="c1"), task.DeleteResponse)
        assert deleted.exit_status == 3
        assert not (sandbox / "c1").exists() and quark_containers.mounts_under(sandbox) == []
        # A Create QVisor refuses leaves nothing laid out.
        (tmp_path / "image" / "hello").unlink()
        with pytest.raises(FailedPrecondition, match="nothing laid out"):
            await client.call(v3, "Create", task.CreateTaskRequest(
                id="c2", bundle=str(host_bundle),
                rootfs=[{"type": "bind", "source": str(image), "options": ["rbind"]}]), task.CreateTaskResponse)
        assert not (sandbox / "c2").exists() and quark_containers.mounts_under(sandbox) == []
        # QVisor dies: the relay ends, and containerd's connection with it.
        await upstream.close()
        await asyncio.wait_for(relay, 5)
        await asyncio.wait_for(client.wait_closed(), 5)

    try:
        asyncio.run(scenario())
    finally:
        quark_containers.unmount_all_under(tmp_path)


class StrictQVisor(QVisor):
    """Refuses a second Create of an id, and answers NotFound for a Delete of one it does not have."""

    def __init__(self, sandbox_bundle: Path) -> None:
        super().__init__(sandbox_bundle)
        self.created: set[str] = set()

    async def create(self, req: task.CreateTaskRequest, ctx: Context) -> task.CreateTaskResponse:
        if req.id in self.created:
            raise AlreadyExists(f"container {req.id} exists")
        reply = await super().create(req, ctx)
        self.created.add(req.id)
        return reply

    async def delete(self, req: task.DeleteRequest, ctx: Context) -> task.DeleteResponse:
        if req.id not in self.created:
            raise NotFound(f"container {req.id} not found")
        if not req.exec_id:
            self.created.discard(req.id)
        return await super().delete(req, ctx)


def test_duplicates_reserved_ids_and_deletes_qvisor_does_not_know(tmp_path: Path) -> None:
    sandbox, host_bundle, image = host_side(tmp_path)
    (sandbox / "rootfs").mkdir()
    fifo = tmp_path / "exec-stdout"
    os.mkfifo(fifo)
    qvisor = StrictQVisor(sandbox)
    rootfs = [{"type": "bind", "source": str(image), "options": ["rbind"]}]

    async def scenario() -> None:
        upstream = TtrpcServer()
        register_task_service(upstream, qvisor, services=(task_relay.QUARK_SERVICE,))
        await upstream.start_unix(str(tmp_path / "quark.sock"))
        quark = await TtrpcClient.connect_unix(str(tmp_path / "quark.sock"))
        relay = task_relay.QuarkTaskRelay(quark, sandbox)
        server = TtrpcServer()
        relay.register(server)
        await server.start_unix(str(tmp_path / "task.sock"))
        client = await TtrpcClient.connect_unix(str(tmp_path / "task.sock"))
        v3 = task_relay.SERVED_SERVICE

        async def create(cid: str) -> None:
            await client.call(v3, "Create", task.CreateTaskRequest(id=cid, bundle=str(host_bundle), rootfs=rootfs),
                              task.CreateTaskResponse)

        await create("c1")
        # A second Create of a running container: it tore the running container's layout down.
        with pytest.raises(AlreadyExists):
            await create("c1")
        assert (sandbox / "c1" / "rootfs" / "hello").is_file()
        await client.call(v3, "Exec", task.ExecProcessRequest(id="c1", exec_id="e1", stdout=str(fifo)))
        with pytest.raises(AlreadyExists):  # it re-bound the FIFO and lost the first exec's record
            await client.call(v3, "Exec", task.ExecProcessRequest(id="c1", exec_id="e1", stdout=str(fifo)))
        assert (sandbox / "c1" / "e1-stdout").exists()
        # An id that names the sandbox bundle's own rootfs: its Delete removed QVisor's root.
        with pytest.raises(InvalidArgument, match="reserved"):
            await create("rootfs")
        assert (sandbox / "rootfs").is_dir()
        # QVisor forgot c1 (or never had it): containerd takes NotFound for deleted, the layout goes too.
        qvisor.created.clear()
        with pytest.raises(NotFound):
            await client.call(v3, "Delete", task.DeleteRequest(id="c1"), task.DeleteResponse)
        assert not (sandbox / "c1").exists() and quark_containers.mounts_under(sandbox) == []
        await client.close()
        await server.close()
        await quark.close()
        await upstream.close()

    try:
        asyncio.run(scenario())
    finally:
        quark_containers.unmount_all_under(tmp_path)


def test_a_qvisor_whose_vm_never_comes_up_fails_the_relay_with_the_reason(tmp_path: Path) -> None:
    # `quark sandbox` returns once QVisor has bound its socket, before the VM runs: without KVM it dies
    # then, and Start reported a ready sandbox whose first Create failed.
    async def scenario(answer: str) -> str:
        async def qvisor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if answer == "close":
                writer.close()
                return
            await reader.read()  # "hang": reads, never answers

        path = tmp_path / f"{answer}.sock"
        upstream = await asyncio.start_unix_server(qvisor, str(path))
        args = argparse.Namespace(listen=str(tmp_path / f"{answer}-task.sock"), upstream=str(path),
                                  sandbox_bundle=str(tmp_path / "sandbox"), probe_timeout=0.5)
        try:
            with pytest.raises(RuntimeError, match="does not answer") as info:
                await asyncio.wait_for(task_relay.serve(args), 10)
        finally:
            upstream.close()
        assert not (tmp_path / f"{answer}-task.sock").exists()  # containerd never got an address
        return str(info.value)

    assert "deadline" in asyncio.run(scenario("hang"))
    assert "closed" in asyncio.run(scenario("close"))
