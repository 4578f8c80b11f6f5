"""vm-agent end to end: the real guest image booted under QEMU (TCG) with vhost-device-vsock, driven
from the host over hybrid vsock the way containerd and vmm-sandboxer would.

One VM boot for the whole flow (TCG is slow): READY announcement, Agent.Check and SetupSandbox,
containers created from bundles in the 9p shared directory, their output read through the
streaming service, exec (with stdin), exit codes, kill, stats, delete, events, and a clean poweroff.
Nothing may be left behind: no QEMU, no vhost-device-vsock, no sockets.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from google.protobuf import any_pb2, empty_pb2

from kuasar.common import hvsock
from kuasar.common.api.containerd.cgroups.v2 import metrics_pb2 as cgroups_v2
from kuasar.common.api.containerd.events import task_pb2 as task_events
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.services.streaming.v1 import streaming_pb2
from kuasar.common.api.containerd.types import event_pb2
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.api.containerd.types.transfer import streaming_pb2 as transfer
from kuasar.common.api.kuasar.agent.v1 import agent_pb2 as agent
from kuasar.common.errors import NotFound
from kuasar.common.tools import find_tool
from kuasar.common.ttrpc import TtrpcClient
from kuasar.vmagent.imagebuild.builder import default_python
from kuasar.vmagent.launch import MicroVm, VmConfig
from tests.support.guest_image import build_guest_image
from tests.support.setup_hints import fetched_tool_hint

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "build" / "guest"
TASK = "containerd.task.v3.Task"
AGENT = "kuasar.agent.v1.Agent"
STREAMING = "containerd.services.streaming.v1.Streaming"
NS = {"containerd-namespace-ttrpc": "k8s.io"}
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "cat", "sleep", "hostname", "ls", "true", "env", "stty", "tty")
MAC = "52:54:00:12:34:56"
CALL_TIMEOUT = 60.0  # runc under TCG takes seconds per command


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the VM test needs root (9p export of root-owned bundles, runc in the guest)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed (make setup installs qemu-system-x86)"
    if find_tool("vhost-device-vsock") is None:
        return f"vhost-device-vsock not installed ({fetched_tool_hint('vhost-device-vsock')})"
    if default_python() is None:
        return "no /usr/bin/python3 >= 3.11 to put in the guest image"
    for tool in (str(BUSYBOX), "apt-get", "dpkg-deb"):
        if not os.path.exists(tool) and shutil.which(tool) is None:
            return f"{tool} missing: cannot build the guest image"
    return None


def make_bundle(share: Path, cid: str, args: list[str]) -> None:
    """An OCI bundle in the shared directory: busybox rootfs (read-only) and runc's default spec."""
    bundle = share / cid
    rootfs = bundle / "rootfs"
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"].update(terminal=False, args=args)
    spec["root"] = {"path": "rootfs", "readonly": True}
    spec["hostname"] = cid
    # The guest's network namespace is the pod's: containers share it.
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    (bundle / "config.json").write_text(json.dumps(spec))


def stream_url(uds: str, sid: str) -> str:
    return f"{hvsock.format_address(uds, 1024)}?streaming_id={sid}"


async def open_stream(uds: str, sid: str):
    """What containerd does per stdio stream: its own connection, Stream, StreamInit, wait for the ack."""
    client = await hvsock.connect_ttrpc(uds, 1024)
    stream = await client.open_stream(STREAMING, "Stream")
    init = any_pb2.Any(type_url="containerd.services.streaming.v1.StreamInit",
                       value=streaming_pb2.StreamInit(id=sid).SerializeToString())
    await stream.send(init.SerializeToString())
    ack = any_pb2.Any.FromString(await asyncio.wait_for(stream.recv(), 30))
    assert ack.type_url == "google.protobuf.Empty", ack
    return client, stream


async def read_output(uds: str, sid: str) -> tuple[TtrpcClient, asyncio.Task[bytes]]:
    client, stream = await open_stream(uds, sid)
    window = any_pb2.Any(type_url="containerd.types.transfer.WindowUpdate",
                         value=transfer.WindowUpdate(update=65536).SerializeToString())
    await stream.send(window.SerializeToString())

    async def collect() -> bytes:
        data = b""
        while (message := await stream.recv()) is not None:
            payload = any_pb2.Any.FromString(message)
            assert payload.type_url == "containerd.types.transfer.Data", payload.type_url
            data += transfer.Data.FromString(payload.value).data
        return data

    return client, asyncio.create_task(collect())


async def write_input(uds: str, sid: str, data: bytes) -> TtrpcClient:
    client, stream = await open_stream(uds, sid)
    granted = any_pb2.Any.FromString(await asyncio.wait_for(stream.recv(), 30))
    assert granted.type_url == "containerd.types.transfer.WindowUpdate", granted.type_url
    assert transfer.WindowUpdate.FromString(granted.value).update >= len(data)
    await stream.send(any_pb2.Any(type_url="containerd.types.transfer.Data",
                                  value=transfer.Data(data=data).SerializeToString()).SerializeToString())
    await stream.close_send()
    return client


async def call(client: TtrpcClient, method: str, request, response_type=None, service: str = TASK):
    return await client.call(service, method, request, response_type, timeout=CALL_TIMEOUT, metadata=NS)


def test_vm_agent_end_to_end() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    vmlinux, initrd = build_guest_image(timeout=900)
    build_s = time.monotonic() - t0
    # Short paths: unix socket names (and `<uds>_1025`) must fit in 108 bytes.
    work = Path(tempfile.mkdtemp(prefix="vmagent-", dir="/tmp"))
    share = work / "share"
    share.mkdir()
    make_bundle(share, "hello", ["sh", "-c", "echo hello from $(hostname) in the vm; echo to-stderr >&2; exit 3"])
    make_bundle(share, "sleeper", ["sleep", "3600"])
    config = VmConfig(vmlinux, initrd, work / "vm", share_dir=share, debug_console=True, nics=[MAC],
                      vhost_vsock=find_tool("vhost-device-vsock") or "vhost-device-vsock")
    vm = MicroVm(config)
    figures: dict[str, float] = {"image_build_s": build_s}
    try:
        asyncio.run(scenario(vm, config, figures))
    finally:
        asyncio.run(vm.stop())
        qemu_pid = vm.qemu.pid if vm.qemu else None
        daemon_pid = vm.daemon.pid if vm.daemon else None
        print("\nvm-agent figures:", json.dumps({k: round(v, 3) for k, v in figures.items()}))
        print("console tail:\n" + vm.console_tail(40))
        shutil.rmtree(work, ignore_errors=True)
    for pid in (qemu_pid, daemon_pid):
        assert pid is not None and not Path(f"/proc/{pid}").exists(), f"process {pid} left running"
    assert not work.exists()


async def scenario(vm: MicroVm, config: VmConfig, figures: dict[str, float]) -> None:
    uds = str(config.uds)
    # -- boot: the guest announces itself, then exactly one CONNECT ------------------------------------
    await vm.start(ready_timeout=90)
    figures["boot_to_ready_s"] = vm.times.to_ready
    client = await vm.connect()
    check = await call(client, "Check", agent.CheckRequest(), agent.CheckResponse, service=AGENT)
    assert check.share_dir == "/run/kuasar/state"
    assert check.kernel_release == json.loads((IMAGE / "manifest.json").read_text())["kernel"]["release"]
    figures["guest_init_s"] = check.agent_started_ns / 1e9
    figures["guest_agent_ready_s"] = check.agent_ready_ns / 1e9

    # -- sandbox setup and clock ------------------------------------------------------------------------
    await call(client, "SetupSandbox", agent.SetupSandboxRequest(
        sandbox_id="pod1", hostname="pod1-vm", hosts="127.0.0.1 localhost pod1-vm\n",
        resolv_conf="nameserver 10.0.0.53\n", sysctls={"net.ipv4.ip_forward": "1"},
        interfaces=[agent.Interface(hw_addr=MAC.upper(), name="pod0", mtu=1400,
                                    addresses=[agent.IPAddress(cidr="10.0.2.15/24")])],
        routes=[agent.Route(gateway="10.0.2.2"), agent.Route(dest="192.168.77.0/24", gateway="10.0.2.2")]),
        service=AGENT)
    probe = await call(client, "ExecVMProcess", agent.ExecVMProcessRequest(
        args=["/bin/sh", "-c", "hostname; cat /etc/resolv.conf /proc/sys/net/ipv4/ip_forward; read x; echo $x"],
        stdin=b"stdin-ok\n"), agent.ExecVMProcessResponse, service=AGENT)
    assert probe.exit_status == 0, probe.stderr
    assert probe.stdout.decode().split() == ["pod1-vm", "nameserver", "10.0.0.53", "1", "stdin-ok"]
    net = await call(client, "ExecVMProcess", agent.ExecVMProcessRequest(args=["ip", "-o", "addr", "show", "pod0"]),
                     agent.ExecVMProcessResponse, service=AGENT)
    assert "inet 10.0.2.15/24" in net.stdout.decode(), net
    link = await call(client, "ExecVMProcess", agent.ExecVMProcessRequest(args=["ip", "-o", "link", "show", "pod0"]),
                      agent.ExecVMProcessResponse, service=AGENT)
    assert "mtu 1400" in link.stdout.decode() and "UP" in link.stdout.decode(), link
    routes = (await call(client, "ExecVMProcess", agent.ExecVMProcessRequest(args=["ip", "route"]),
                         agent.ExecVMProcessResponse, service=AGENT)).stdout.decode()
    assert "default via 10.0.2.2 dev pod0" in routes and "192.168.77.0/24 via 10.0.2.2 dev pod0" in routes, routes

    # -- the debug console (a shell on a pty over vsock port 1025) -----------------------------------------
    reader, writer = await hvsock.connect(uds, 1025)
    writer.write(b"echo console-$((6*7))\nexit\n")
    seen = b""
    while b"console-42" not in seen:
        chunk = await asyncio.wait_for(reader.read(4096), 30)
        assert chunk, f"debug console closed early: {seen!r}"
        seen += chunk
    writer.close()
    now = time.time_ns()
    clock = await call(client, "SyncClock", agent.SyncClockPacket(client_send_time=now), agent.SyncClockPacket,
                       service=AGENT)
    assert clock.client_send_time == now and clock.server_send_time > 0

    events = await client.open_stream(AGENT, "Events", payload=agent.EventsRequest().SerializeToString(),
                                      client_streaming=False)

    # -- container 1: output through the streaming service, exit code ------------------------------------
    out_client, stdout = await read_output(uds, "hello-stdout")
    err_client, stderr = await read_output(uds, "hello-stderr")
    t_run = time.monotonic()
    created = await call(client, "Create", task.CreateTaskRequest(
        id="hello", bundle="/run/kuasar/state/hello", stdout=stream_url(uds, "hello-stdout"),
        stderr=stream_url(uds, "hello-stderr")), task.CreateTaskResponse)
    assert created.pid > 0
    figures["runc_create_s"] = time.monotonic() - t_run
    waiting = asyncio.create_task(call(client, "Wait", task.WaitRequest(id="hello"), task.WaitResponse))
    await call(client, "Start", task.StartRequest(id="hello"), task.StartResponse)
    waited = await waiting
    figures["container_run_s"] = time.monotonic() - t_run
    assert waited.exit_status == 3
    assert await asyncio.wait_for(stdout, 30) == b"hello from hello in the vm\n"
    assert await asyncio.wait_for(stderr, 30) == b"to-stderr\n"
    state = await call(client, "State", task.StateRequest(id="hello"), task.StateResponse)
    assert state.status == types.STOPPED and state.exit_status == 3
    deleted = await call(client, "Delete", task.DeleteRequest(id="hello"), task.DeleteResponse)
    assert deleted.exit_status == 3
    for c in (out_client, err_client):
        await c.close()

    # -- container 2: exec with stdin, exec exit code, stats, pids, kill -----------------------------------
    await call(client, "Create", task.CreateTaskRequest(id="sleeper", bundle=""), task.CreateTaskResponse)
    started = await call(client, "Start", task.StartRequest(id="sleeper"), task.StartResponse)
    pids = await call(client, "Pids", task.PidsRequest(id="sleeper"), task.PidsResponse)
    assert started.pid in [p.pid for p in pids.processes]
    await call(client, "Update", task.UpdateTaskRequest(id="sleeper", resources=any_pb2.Any(
        type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
        value=json.dumps({"pids": {"limit": 77}}).encode())))
    stats = await call(client, "Stats", task.StatsRequest(id="sleeper"), task.StatsResponse)
    assert stats.stats.type_url == "io.containerd.cgroups.v2.Metrics"
    metrics = cgroups_v2.Metrics.FromString(stats.stats.value)
    assert metrics.pids.limit == 77 and metrics.pids.current >= 1

    exec_out_client, exec_out = await read_output(uds, "cat1-stdout")
    exec_in_client = await write_input(uds, "cat1-stdin", b"piped through the guest\n")
    spec = {"args": ["cat"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}
    t_exec = time.monotonic()
    await call(client, "Exec", task.ExecProcessRequest(
        id="sleeper", exec_id="cat1", stdin=stream_url(uds, "cat1-stdin"), stdout=stream_url(uds, "cat1-stdout"),
        spec=any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                         value=json.dumps(spec).encode())))
    await call(client, "Start", task.StartRequest(id="sleeper", exec_id="cat1"), task.StartResponse)
    exec_wait = await call(client, "Wait", task.WaitRequest(id="sleeper", exec_id="cat1"), task.WaitResponse)
    figures["exec_s"] = time.monotonic() - t_exec
    assert exec_wait.exit_status == 0
    assert await asyncio.wait_for(exec_out, 30) == b"piped through the guest\n"
    await call(client, "Delete", task.DeleteRequest(id="sleeper", exec_id="cat1"), task.DeleteResponse)
    for c in (exec_out_client, exec_in_client):
        await c.close()

    # A terminal exec: the size asked for before the console exists is applied when it arrives.
    tty_client, tty_out = await read_output(uds, "tty1-stdout")
    spec = {"args": ["sh", "-c", "sleep 1; stty size; tty"], "cwd": "/", "env": ["PATH=/bin"],
            "user": {"uid": 0, "gid": 0}, "terminal": True}
    await call(client, "Exec", task.ExecProcessRequest(id="sleeper", exec_id="tty1", terminal=True,
                                                       stdout=stream_url(uds, "tty1-stdout"), spec=any_pb2.Any(
        type_url="types.containerd.io/opencontainers/runtime-spec/1/Process", value=json.dumps(spec).encode())))
    await call(client, "ResizePty", task.ResizePtyRequest(id="sleeper", exec_id="tty1", width=100, height=40))
    await call(client, "Start", task.StartRequest(id="sleeper", exec_id="tty1"), task.StartResponse)
    tty_wait = await call(client, "Wait", task.WaitRequest(id="sleeper", exec_id="tty1"), task.WaitResponse)
    assert tty_wait.exit_status == 0
    assert (await asyncio.wait_for(tty_out, 30)).split() == [b"40", b"100", b"/dev/pts/0"]
    await call(client, "Delete", task.DeleteRequest(id="sleeper", exec_id="tty1"), task.DeleteResponse)
    await tty_client.close()

    # A terminal exec that leaves a child on its pty (`kubectl exec -it`, `sleep 300 &`, `exit`): its
    # output still ends at its exit, with all it wrote (the child ignores the pty's hang-up, as an
    # interactive shell's background job is not in the group that gets it).
    tty_client, tty_out = await read_output(uds, "tty2-stdout")
    spec = {"args": ["sh", "-c", "trap '' HUP; sleep 300 & echo left a child; exit 4"], "cwd": "/",
            "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}, "terminal": True}
    await call(client, "Exec", task.ExecProcessRequest(id="sleeper", exec_id="tty2", terminal=True,
                                                       stdout=stream_url(uds, "tty2-stdout"), spec=any_pb2.Any(
        type_url="types.containerd.io/opencontainers/runtime-spec/1/Process", value=json.dumps(spec).encode())))
    await call(client, "Start", task.StartRequest(id="sleeper", exec_id="tty2"), task.StartResponse)
    tty_wait = await call(client, "Wait", task.WaitRequest(id="sleeper", exec_id="tty2"), task.WaitResponse)
    assert tty_wait.exit_status == 4
    assert (await asyncio.wait_for(tty_out, 30)).replace(b"\r\n", b"\n") == b"left a child\n"
    await call(client, "Delete", task.DeleteRequest(id="sleeper", exec_id="tty2"), task.DeleteResponse)
    await tty_client.close()

    await call(client, "Pause", task.PauseRequest(id="sleeper"))
    paused = await call(client, "State", task.StateRequest(id="sleeper"), task.StateResponse)
    assert paused.status == types.PAUSED
    await call(client, "Resume", task.ResumeRequest(id="sleeper"))

    # CloseIO: stdin ends without containerd half-closing its stream.
    open_in_client, _open_in = await open_stream(uds, "cat2-stdin")
    spec = {"args": ["cat"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}
    await call(client, "Exec", task.ExecProcessRequest(
        id="sleeper", exec_id="cat2", stdin=stream_url(uds, "cat2-stdin"),
        spec=any_pb2.Any(value=json.dumps(spec).encode())))
    await call(client, "Start", task.StartRequest(id="sleeper", exec_id="cat2"), task.StartResponse)
    await call(client, "CloseIO", task.CloseIORequest(id="sleeper", exec_id="cat2", stdin=True))
    closed = await call(client, "Wait", task.WaitRequest(id="sleeper", exec_id="cat2"), task.WaitResponse)
    assert closed.exit_status == 0
    await call(client, "Delete", task.DeleteRequest(id="sleeper", exec_id="cat2"), task.DeleteResponse)
    await open_in_client.close()

    spec = {"args": ["sh", "-c", "exit 7"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}
    await call(client, "Exec", task.ExecProcessRequest(id="sleeper", exec_id="seven", spec=any_pb2.Any(
        type_url="types.containerd.io/opencontainers/runtime-spec/1/Process", value=json.dumps(spec).encode())))
    await call(client, "Start", task.StartRequest(id="sleeper", exec_id="seven"), task.StartResponse)
    seven = await call(client, "Wait", task.WaitRequest(id="sleeper", exec_id="seven"), task.WaitResponse)
    assert seven.exit_status == 7
    await call(client, "Delete", task.DeleteRequest(id="sleeper", exec_id="seven"), task.DeleteResponse)

    await call(client, "Kill", task.KillRequest(id="sleeper", signal=signal.SIGKILL, all=True))
    killed = await call(client, "Wait", task.WaitRequest(id="sleeper"), task.WaitResponse)
    assert killed.exit_status == 128 + signal.SIGKILL
    await call(client, "Delete", task.DeleteRequest(id="sleeper"), task.DeleteResponse)
    with pytest.raises(NotFound):
        await call(client, "State", task.StateRequest(id="sleeper"), task.StateResponse)

    # -- events: the host sees every exit --------------------------------------------------------------------
    exits = []
    while len(exits) < 7:
        envelope = event_pb2.Envelope.FromString(await asyncio.wait_for(events.recv(), 30))
        if envelope.topic == "/tasks/exit":
            exits.append(task_events.TaskExit.FromString(envelope.event.value))
    assert sorted((e.container_id, e.id, e.exit_status) for e in exits) == sorted([
        ("hello", "hello", 3), ("sleeper", "cat1", 0), ("sleeper", "seven", 7), ("sleeper", "sleeper", 137),
        ("sleeper", "tty1", 0), ("sleeper", "tty2", 4), ("sleeper", "cat2", 0)])

    # -- nothing left in the guest, then a clean poweroff ------------------------------------------------------
    leftovers = await call(client, "ExecVMProcess", agent.ExecVMProcessRequest(
        args=["/bin/sh", "-c", "ls /run/vmagent/runc; ls /run/vmagent | grep -v runc; true"]),
        agent.ExecVMProcessResponse, service=AGENT)
    assert leftovers.stdout == b"", leftovers.stdout
    await call(client, "Poweroff", agent.PoweroffRequest(grace_ms=1000), empty_pb2.Empty, service=AGENT)
    status = await vm.wait_exit(30)
    assert status == 0, f"QEMU did not exit after poweroff (status {status}):\n{vm.console_tail()}"
    await client.close()
