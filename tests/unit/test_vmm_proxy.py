"""The task proxy between containerd and a VM's agent: the hybrid-vsock handshake on both sides,
Task.Create rewritten after the host side was prepared (rootfs mounted, spec rewritten, volumes bound
into the shared directory), the host side taken down again after Delete, everything else relayed."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from google.protobuf import any_pb2, empty_pb2

from kuasar.common import hvsock
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types import mount_pb2
from kuasar.common.api.ttrpc import request_pb2
from kuasar.common.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, InvalidArgument, Unimplemented
from kuasar.common.ttrpc import Context, TtrpcServer
from kuasar.vmm import hostfs
from kuasar.vmm.proxy import HostPrep, TaskProxy

TASK = "containerd.task.v3.Task"


class FakeAgent:
    """The guest side: answers CONNECT like vhost-device-vsock, then serves a recording Task API."""

    def __init__(self, share: Path) -> None:
        self.share = share
        self.created: list[task.CreateTaskRequest] = []
        self.seen_in_share: dict[str, object] = {}
        self.server = TtrpcServer()
        self.server.add_unary(TASK, "Create", task.CreateTaskRequest, self.create)
        self.server.add_unary(TASK, "Delete", task.DeleteRequest, self.delete)
        self.server.add_unary(TASK, "Pids", task.PidsRequest, self.pids)

    async def create(self, req: task.CreateTaskRequest, ctx: Context) -> task.CreateTaskResponse:
        self.created.append(req)
        host_view = self.share / req.id  # what the guest would see through 9p
        self.seen_in_share = {"config": json.loads((host_view / "config.json").read_text()),
                              "rootfs": sorted(os.listdir(host_view / "rootfs")),
                              "volume": (self.share / ".volumes" / "0" / "v.txt").read_text()}
        return task.CreateTaskResponse(pid=42)

    async def delete(self, req: task.DeleteRequest, ctx: Context) -> task.DeleteResponse:
        return task.DeleteResponse(pid=42, exit_status=0)

    async def pids(self, req: task.PidsRequest, ctx: Context) -> task.PidsResponse:
        return task.PidsResponse()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        assert line == b"CONNECT 1024\n"
        writer.write(b"OK 1024\n")
        await writer.drain()
        await self.server.serve_connection(reader, writer)


@pytest.mark.skipif(os.geteuid() != 0, reason="binds the rootfs and a volume (needs root)")
def test_create_is_prepared_on_the_host_and_rewritten(tmp_path: Path) -> None:
    share = tmp_path / "shared"
    share.mkdir()
    image = tmp_path / "image"
    (image / "bin").mkdir(parents=True)
    (image / "bin" / "sh").write_text("")
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "v.txt").write_text("volume data")
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    spec = {"process": {"args": ["sh"]}, "root": {"path": "rootfs"},
            "mounts": [{"destination": "/data", "type": "bind", "source": str(volume), "options": ["rbind", "ro"]}],
            "linux": {"namespaces": [{"type": "network", "path": "/proc/1/ns/net"}, {"type": "mount"}]}}
    (bundle / "config.json").write_text(json.dumps(spec))
    agent = FakeAgent(share)

    async def scenario() -> None:
        uds = str(tmp_path / "vsock.sock")
        guest = await asyncio.start_unix_server(agent.handle, path=uds)
        proxy = TaskProxy(uds, HostPrep(share, "/run/kuasar/state"))
        listen = str(tmp_path / "task.vsock")
        front = await asyncio.start_unix_server(proxy.handle, path=listen)
        try:
            client = await hvsock.connect_ttrpc(listen, 1024)  # what containerd's hvsock dialer does
            ns = {"containerd-namespace-ttrpc": "k8s.io"}
            created = await client.call(TASK, "Create", task.CreateTaskRequest(
                id="c1", bundle=str(bundle), stdout="ttrpc+hvsock:///x:1024?streaming_id=c1-stdout",
                rootfs=[mount_pb2.Mount(type="bind", source=str(image), options=["rbind", "ro"])]),
                task.CreateTaskResponse, timeout=10, metadata=ns)
            assert created.pid == 42
            # where the guest cannot write: c1 is this pod's, made in k8s.io (only its events are forwarded)
            assert (tmp_path / "containers" / "c1").read_text() == "k8s.io"
            [forwarded] = agent.created
            assert forwarded.bundle == "/run/kuasar/state/c1" and not forwarded.rootfs
            assert forwarded.stdout.endswith("streaming_id=c1-stdout")
            seen = agent.seen_in_share
            assert seen["rootfs"] == ["bin"] and seen["volume"] == "volume data"
            config = seen["config"]
            assert config["root"]["path"] == "rootfs" and config["linux"]["namespaces"] == [{"type": "mount"}]
            assert config["mounts"][0]["source"] == "/run/kuasar/state/.volumes/0"
            assert hostfs.mounts_under(share / "c1")
            # A second Create of a running container is refused before it touches that one's files.
            with pytest.raises(AlreadyExists):
                await client.call(TASK, "Create", task.CreateTaskRequest(id="c1", bundle=str(bundle)),
                                  task.CreateTaskResponse, timeout=10, metadata=ns)
            assert len(agent.created) == 1 and (share / "c1" / "config.json").exists()
            assert hostfs.mounts_under(share / "c1")
            # Other calls pass through untouched.
            await client.call(TASK, "Pids", task.PidsRequest(id="c1"), task.PidsResponse, timeout=10)
            # A refused Create never reaches the guest and leaves nothing behind.
            with pytest.raises(InvalidArgument):
                await client.call(TASK, "Create", task.CreateTaskRequest(id="c2", bundle=str(tmp_path / "nope")),
                                  task.CreateTaskResponse, timeout=10)
            assert len(agent.created) == 1 and not (share / "c2").exists()
            assert not (tmp_path / "containers" / "c2").exists()
            # Delete of the init process takes the host side down.
            await client.call(TASK, "Delete", task.DeleteRequest(id="c1"), task.DeleteResponse, timeout=10)
            for _ in range(100):
                if not (share / "c1").exists():
                    break
                await asyncio.sleep(0.02)
            assert not (share / "c1").exists() and not hostfs.mounts_under(share)
            assert not (tmp_path / "containers" / "c1").exists()
            assert (volume / "v.txt").read_text() == "volume data", "the volume itself is untouched"
            await client.close()
        finally:
            front.close()
            guest.close()
            hostfs.unmount_tree(share)

    asyncio.run(scenario())


def test_handshake_refusals(tmp_path: Path) -> None:
    async def scenario() -> None:
        proxy = TaskProxy(str(tmp_path / "absent.sock"), HostPrep(tmp_path, "/run/kuasar/state"))
        listen = str(tmp_path / "task.vsock")
        server = await asyncio.start_unix_server(proxy.handle, path=listen)
        try:
            # wrong port, junk, a line past the reader's limit: closed without a word
            for line in (b"CONNECT 1025\n", b"HELLO\n", b"x" * (1 << 17) + b"\n"):
                reader, writer = await asyncio.open_unix_connection(listen)
                writer.write(line)
                assert await asyncio.wait_for(reader.read(), 10) == b"", "closed without OK"
                writer.close()
            # the guest absent: refused with a line that has no "OK" in it. containerd's hvsock dialer took
            # the EOF it got before for "not ready yet" and retried for 100 s per container at its start.
            reader, writer = await asyncio.open_unix_connection(listen)
            writer.write(b"CONNECT 1024\n")
            answer = await asyncio.wait_for(reader.read(), 10)
            assert answer.endswith(b"\n") and answer.count(b"\n") == 1 and b"OK" not in answer
            writer.close()
        finally:
            server.close()

    asyncio.run(scenario())


def test_update_and_exec_lose_what_is_the_hosts_on_their_way_to_the_guest(tmp_path: Path) -> None:
    # CRI sends the whole merged LinuxResources on every UpdateContainerResources, a static CPU
    # manager's host cpuset included: the guest's cgroup refused it and kubelet retried for ever. An
    # exec's host security labels go too.
    proxy = TaskProxy(str(tmp_path / "vsock.sock"), HostPrep(tmp_path, "/run/kuasar/state"))
    resources = {"cpu": {"shares": 512, "cpus": "2-3", "mems": "0"}, "memory": {"limit": 1 << 27}}
    update = task.UpdateTaskRequest(id="c1", resources=any_pb2.Any(value=json.dumps(resources).encode()))
    payload = request_pb2.Request(service=TASK, method="Update", payload=update.SerializeToString()).SerializeToString()
    forwarded = request_pb2.Request.FromString(proxy.intercept(1, payload, {}))
    sent = json.loads(task.UpdateTaskRequest.FromString(forwarded.payload).resources.value)
    assert sent == {"cpu": {"shares": 512}, "memory": {"limit": 1 << 27}}
    plain = request_pb2.Request(service=TASK, method="Update", payload=task.UpdateTaskRequest(
        id="c1", resources=any_pb2.Any(value=b'{"memory": {"limit": 1}}')).SerializeToString()).SerializeToString()
    assert proxy.intercept(2, plain, {}) == plain  # nothing of the host's: passed on as it came
    process = {"args": ["sh"], "cwd": "/", "apparmorProfile": "cri-containerd.apparmor.d"}
    exec_req = task.ExecProcessRequest(id="c1", exec_id="e1", spec=any_pb2.Any(value=json.dumps(process).encode()))
    payload = request_pb2.Request(service=TASK, method="Exec", payload=exec_req.SerializeToString()).SerializeToString()
    forwarded = request_pb2.Request.FromString(proxy.intercept(3, payload, {}))
    assert json.loads(task.ExecProcessRequest.FromString(forwarded.payload).spec.value) == {"args": ["sh"], "cwd": "/"}


@pytest.mark.skipif(os.geteuid() != 0, reason="binds rootfs and volumes (needs root)")
def test_a_volume_two_containers_bind_is_shared_into_the_vm_once_until_the_last_is_deleted(tmp_path: Path) -> None:
    # Through a 9p path of its own per container, the guest saw two inodes: a socket or FIFO one
    # container made in an emptyDir the other could not reach.
    share = tmp_path / "shared"
    share.mkdir()
    volume = tmp_path / "emptydir"
    volume.mkdir()
    prep = HostPrep(share, "/run/kuasar/state")

    def create(cid: str, readonly: bool = False) -> str:
        bundle = tmp_path / f"bundle-{cid}"
        (bundle / "rootfs").mkdir(parents=True)
        mount = {"destination": "/data", "type": "bind", "source": str(volume),
                 "options": ["rbind", "ro" if readonly else "rw"]}
        (bundle / "config.json").write_text(json.dumps({"process": {"args": ["sh"]}, "root": {"path": "rootfs"},
                                                        "mounts": [mount]}))
        prep.prepare(task.CreateTaskRequest(id=cid, bundle=str(bundle)))
        config = json.loads((share / cid / "config.json").read_text())
        return next(m["source"] for m in config["mounts"] if m["destination"] == "/data")

    try:
        assert create("a") == create("b") == "/run/kuasar/state/.volumes/0"
        assert create("r", readonly=True) == "/run/kuasar/state/.volumes/1"  # read-only: a bind of its own
        (volume / "made-on-the-host").write_text("x")
        assert (share / ".volumes" / "0" / "made-on-the-host").exists()
        prep.cleanup("a")
        assert (share / ".volumes" / "0" / "made-on-the-host").exists()  # b still uses it
        prep.cleanup("b")
        prep.cleanup("r")
        assert not (share / ".volumes" / "0").exists() and not hostfs.mounts_under(share)
        assert (volume / "made-on-the-host").exists(), "the volume itself is untouched"
    finally:
        hostfs.unmount_tree(share)


def test_host_fifos_for_stdio_are_refused_with_what_to_set(tmp_path: Path) -> None:
    # containerd's default io_type ("fifo") names FIFOs on the host; every container failed with the
    # guest's "No such file or directory" from deep inside its Create.
    proxy = TaskProxy(str(tmp_path / "vsock.sock"), HostPrep(tmp_path, "/run/kuasar/state"))
    fifo = "/run/containerd/io.containerd.grpc.v1.cri/containers/c1/io/1/c1-stdout"
    for method, message in (("Create", task.CreateTaskRequest(id="c1", bundle=str(tmp_path), stdout=fifo)),
                            ("Exec", task.ExecProcessRequest(id="c1", exec_id="e1", stdout=fifo,
                                                             spec=any_pb2.Any(value=b'{"args": ["sh"]}')))):
        payload = request_pb2.Request(service=TASK, method=method, payload=message.SerializeToString())
        with pytest.raises(FailedPrecondition, match='io_type = "streaming"'):
            proxy.intercept(1, payload.SerializeToString(), {})
    assert not (tmp_path / "c1").exists()  # refused before anything was prepared
    streaming = task.ExecProcessRequest(id="c1", exec_id="e1", stdout="ttrpc+hvsock:///x:1024?streaming_id=e1-stdout",
                                        stdin="/dev/null", spec=any_pb2.Any(value=b'{"args": ["sh"]}'))
    payload = request_pb2.Request(service=TASK, method="Exec", payload=streaming.SerializeToString())
    assert proxy.intercept(2, payload.SerializeToString(), {}) == payload.SerializeToString()


def test_a_restore_from_a_checkpoint_is_refused_before_the_host_prepares_anything(tmp_path: Path) -> None:
    # containerd's CRI restores a checkpointed container with a Create naming the checkpoint: the guest
    # would have run a fresh container, which containerd then reports as restored.
    prep = HostPrep(tmp_path, "/run/kuasar/state")
    prepared: list[str] = []
    prep.prepare = lambda create: prepared.append(create.id)  # type: ignore[method-assign]
    proxy = TaskProxy(str(tmp_path / "vsock.sock"), prep)
    create = task.CreateTaskRequest(id="c1", bundle=str(tmp_path), checkpoint="/var/lib/containerd/checkpoint")
    payload = request_pb2.Request(service=TASK, method="Create", payload=create.SerializeToString())
    with pytest.raises(Unimplemented, match="checkpoint"):
        proxy.intercept(1, payload.SerializeToString(), {})
    assert prepared == []


def test_a_delete_with_a_bad_id_is_refused_on_its_stream_and_a_failed_cleanup_is_not_fatal(tmp_path: Path) -> None:
    # The id was checked only by the cleanup after the guest's answer: its error ended the relay of the
    # whole connection (every call on it) and lost the answer.
    proxy = TaskProxy(str(tmp_path / "vsock.sock"), HostPrep(tmp_path, "/run/kuasar/state"))
    pending: dict[int, tuple[str, str]] = {}
    for bad in ("", "../x"):
        payload = request_pb2.Request(service=TASK, method="Delete",
                                      payload=task.DeleteRequest(id=bad).SerializeToString())
        with pytest.raises(InvalidArgument):
            proxy.intercept(1, payload.SerializeToString(), pending)
    assert pending == {}

    def cleanup_fails(container_id: str) -> None:
        raise OSError("disk gone")

    proxy.prep.cleanup = cleanup_fails  # type: ignore[method-assign]
    ok = request_pb2.Response(status=request_pb2.Status(code=0)).SerializeToString()
    proxy.responded(ok, ("delete", "c1"))  # logged, not raised into the relay


def test_a_sigkill_the_guest_does_not_answer_is_answered_and_the_proxy_ends(tmp_path: Path) -> None:
    # A wedged guest held containerd's Kill, and so the pod's stop, until its deadline, at every retry.
    # Now the proxy answers it once kill_timeout has passed and exits (the sandboxer then ends the VM).
    class WedgedAgent(FakeAgent):
        def __init__(self, share: Path) -> None:
            super().__init__(share)
            self.server.add_unary(TASK, "Kill", task.KillRequest, self.kill)

        async def kill(self, req: task.KillRequest, ctx: Context) -> empty_pb2.Empty:
            if req.id == "wedged":
                await asyncio.Event().wait()
            return empty_pb2.Empty()

    async def scenario() -> None:
        uds = str(tmp_path / "vsock.sock")
        guest = await asyncio.start_unix_server(WedgedAgent(tmp_path).handle, path=uds)
        ended = asyncio.Event()
        proxy = TaskProxy(uds, HostPrep(tmp_path, "/run/kuasar/state"), kill_timeout=0.3, on_wedged=ended.set)
        listen = str(tmp_path / "task.vsock")
        front = await asyncio.start_unix_server(proxy.handle, path=listen)
        try:
            client = await hvsock.connect_ttrpc(listen, 1024)
            # answered by the guest in time, or not a container's SIGKILL: the guest's business
            await client.call(TASK, "Kill", task.KillRequest(id="c1", signal=9), empty_pb2.Empty, timeout=5)
            for unbounded in (task.KillRequest(id="wedged", signal=15),
                              task.KillRequest(id="wedged", exec_id="e1", signal=9)):
                with pytest.raises(DeadlineExceeded):
                    await client.call(TASK, "Kill", unbounded, empty_pb2.Empty, timeout=1)
            assert not ended.is_set() and not proxy.wedged
            started = asyncio.get_running_loop().time()
            await client.call(TASK, "Kill", task.KillRequest(id="wedged", signal=9), empty_pb2.Empty, timeout=10)
            assert asyncio.get_running_loop().time() - started < 5
            await asyncio.wait_for(ended.wait(), 5)
            assert proxy.wedged
            await client.close()
        finally:
            front.close()
            guest.close()

    asyncio.run(scenario())
