"""sd_notify: READY=1 on $NOTIFY_SOCKET (path and abstract sockets), the watchdog, and the daemon's use of it."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2

from kuasar.common import sd_notify
from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2 as pb
from kuasar.common.config import DaemonConfig
from kuasar.common.daemon import prepare, serve
from kuasar.common.sandbox_api import SERVICE
from kuasar.common.sandboxer import ExitInfo, Sandboxer, SandboxRecord, StartResult


def receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(10)
    return sock


def test_socket_address_forms() -> None:
    assert sd_notify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert sd_notify.socket_address("@abstract/name") == "\0abstract/name"
    for unusable in ("", "@", "relative/path", "vsock:2:1234"):
        assert sd_notify.socket_address(unusable) is None


def test_ready_on_a_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with receiver(path) as sock:
        assert sd_notify.ready("serving /x.sock", {"NOTIFY_SOCKET": path})
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving /x.sock"


def test_ready_on_an_abstract_socket() -> None:
    name = f"kuasar-test-{secrets.token_hex(6)}"
    with receiver("\0" + name) as sock:
        assert sd_notify.ready(env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"
        assert sd_notify.stopping({"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


def test_no_socket_is_a_no_op(tmp_path: Path) -> None:
    assert not sd_notify.ready(env={})
    assert not sd_notify.ready(env={"NOTIFY_SOCKET": "vsock:2:999"})
    # A socket that is gone: a warning, not an exception (the daemon keeps serving).
    assert not sd_notify.ready(env={"NOTIFY_SOCKET": str(tmp_path / "missing")})


def test_take_environment_removes_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "@x")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    taken = sd_notify.take_environment()
    assert taken == {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"}
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ


def test_watchdog_interval() -> None:
    assert sd_notify.watchdog_interval({}) is None
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0
    # The PyInstaller bootloader (our parent) is what systemd started: accepted too.
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getppid())}) == 1.0
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None


def test_watchdog_pings() -> None:
    name = f"kuasar-test-{secrets.token_hex(6)}"
    env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "100000"}

    async def run() -> None:
        task = sd_notify.start_watchdog(env)
        assert task is not None
        await asyncio.sleep(0.18)
        task.cancel()

    with receiver("\0" + name) as sock:
        asyncio.run(run())
        assert sock.recv(100) == b"WATCHDOG=1"
        assert sock.recv(100) == b"WATCHDOG=1"


class IdleSandboxer(Sandboxer):
    name = "idle"

    async def create(self, record: SandboxRecord) -> None: ...

    async def start(self, record: SandboxRecord) -> StartResult:
        return StartResult(pid=1, address="ttrpc+unix:///nowhere")

    async def wait(self, record: SandboxRecord) -> ExitInfo:
        await asyncio.Event().wait()
        raise AssertionError

    async def stop(self, record: SandboxRecord, timeout: float) -> None: ...

    async def shutdown(self, record: SandboxRecord) -> None: ...

    async def metrics(self, record: SandboxRecord) -> any_pb2.Any:
        return any_pb2.Any()


def test_daemon_notifies_ready_once_listening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"kuasar-test-{secrets.token_hex(6)}"
    listen = tmp_path / "sandboxer.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    config = DaemonConfig(listen=listen, dir=tmp_path / "state")
    seen: list[bytes] = []

    async def run(sock: socket.socket) -> None:
        sandboxer, systemd = prepare(config, lambda _config: IdleSandboxer())
        server = asyncio.create_task(serve(config, sandboxer, systemd))
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        seen.append(await asyncio.wait_for(loop.sock_recv(sock, 4096), 20))
        # Ready means the Sandbox API socket accepts connections, and children will not inherit it.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(listen))
        probe.close()
        assert "NOTIFY_SOCKET" not in os.environ
        os.kill(os.getpid(), signal.SIGTERM)  # serve() handles it on this loop
        seen.append(await asyncio.wait_for(loop.sock_recv(sock, 4096), 20))
        await asyncio.wait_for(server, 20)

    with receiver("\0" + name) as sock:
        asyncio.run(run(sock))
    assert seen == [f"READY=1\nSTATUS=serving {listen}".encode(), b"STOPPING=1"]


def test_calls_that_come_while_the_daemon_recovers_wait_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The socket used to be bound only after recovery: a containerd restarting meanwhile could not get
    # its pods' Status and took them for UNKNOWN, so kubelet made every one of them anew.
    name = f"kuasar-test-{secrets.token_hex(6)}"
    listen = tmp_path / "sandboxer.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    config = DaemonConfig(listen=listen, dir=tmp_path / "state")

    class SlowRecovery(IdleSandboxer):
        def __init__(self) -> None:
            self.recovering, self.release = asyncio.Event(), asyncio.Event()

        async def recover(self, records: list[SandboxRecord]) -> None:
            self.recovering.set()
            await self.release.wait()

    async def run(sock: socket.socket) -> None:
        sandboxer, systemd = prepare(config, lambda _config: SlowRecovery())
        assert isinstance(sandboxer, SlowRecovery)
        server = asyncio.create_task(serve(config, sandboxer, systemd))
        await asyncio.wait_for(sandboxer.recovering.wait(), 20)
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        async with grpc.aio.insecure_channel(f"unix://{listen}") as channel:
            platform = channel.unary_unary(f"/{SERVICE}/Platform",
                                           request_serializer=pb.ControllerPlatformRequest.SerializeToString,
                                           response_deserializer=pb.ControllerPlatformResponse.FromString)
            status = channel.unary_unary(f"/{SERVICE}/Status",
                                         request_serializer=pb.ControllerStatusRequest.SerializeToString,
                                         response_deserializer=pb.ControllerStatusResponse.FromString)
            calls = [asyncio.ensure_future(platform(pb.ControllerPlatformRequest(sandbox_id="s" * 64))),
                     asyncio.ensure_future(status(pb.ControllerStatusRequest(sandbox_id="s" * 64)))]
            done, _ = await asyncio.wait(calls, timeout=0.5)
            assert not done, "answered before the sandboxes were recovered"
            with pytest.raises(BlockingIOError):
                sock.recv(4096)  # nor has systemd heard READY
            sandboxer.release.set()
            for call in calls:  # no such sandbox: NOT_FOUND, from the recovered state
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await asyncio.wait_for(call, 20)
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert (await asyncio.wait_for(loop.sock_recv(sock, 4096), 20)).startswith(b"READY=1")
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(server, 20)

    with receiver("\0" + name) as sock:
        asyncio.run(run(sock))
