"""vm-agent's request handling, on the host: the Agent service (setup, clock, exec, events, poweroff),
network command generation, the Task backend's validation, and kernel command-line parsing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from kuasar.common.api.containerd.events import task_pb2 as task_events
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types import event_pb2, mount_pb2
from kuasar.common.api.kuasar.agent.v1 import agent_pb2 as pb
from kuasar.common.errors import DeadlineExceeded, InvalidArgument, NotFound
from kuasar.common.reaper import Reaper
from kuasar.common.streaming_io import StreamHub
from kuasar.common.task_api import register_task_service
from kuasar.common.ttrpc import TtrpcClient, TtrpcServer
from kuasar.vmagent import netconf
from kuasar.vmagent.config import AgentConfig
from kuasar.vmagent.events import EventQueue
from kuasar.vmagent.netconf import NetConfig
from kuasar.vmagent.sandbox import AGENT_SERVICE, AgentService, GuestPaths
from kuasar.vmagent.tasks import GuestTasks
from tests.support.aio import run_bounded

TEST_TIMEOUT = 30.0


def run(coro: Awaitable[None]) -> None:
    run_bounded(coro, TEST_TIMEOUT)


MAC = "52:54:00:aa:bb:cc"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    directory = tempfile.mkdtemp(prefix="vmag", dir="/tmp")
    yield Path(directory)
    shutil.rmtree(directory, ignore_errors=True)


class Guest:
    """An AgentService wired to temporary files and a recording `ip` runner, served over a unix socket."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.etc = root / "etc"
        self.proc_sys = root / "proc/sys"
        self.sys_net = root / "sys/class/net"
        for d in (self.etc, self.proc_sys / "net/ipv4", self.sys_net / "eth0", self.sys_net / "eth1"):
            d.mkdir(parents=True)
        (self.proc_sys / "net/ipv4/ip_forward").write_text("0\n")
        (self.proc_sys / "net/ipv4/conf/eth0.100").mkdir(parents=True)  # a VLAN interface's knobs
        (self.proc_sys / "net/ipv4/conf/eth0.100/rp_filter").write_text("0\n")
        (self.sys_net / "eth0/address").write_text("52:54:00:00:00:01\n")
        (self.sys_net / "eth1/address").write_text(MAC + "\n")
        self.ip_calls: list[list[str]] = []
        self.hostnames: list[str] = []
        self.stopped: list[float] = []
        self.powered_off = asyncio.Event()
        self.reaper = Reaper()
        self.events = EventQueue()
        self.net = NetConfig(self._ip, sys_net=self.sys_net)
        self.service = AgentService(
            self.reaper, self.events, self.net, started_ns=1, share_dir="/run/kuasar/state",
            paths=GuestPaths(etc=self.etc, proc_sys=self.proc_sys, run=root / "run"), sethostname=self.hostnames.append,
            poweroff=self.powered_off.set, stop_containers=self._stop)
        self.server = TtrpcServer()
        self.service.register(self.server)
        self.tasks = GuestTasks(self.reaper, StreamHub(), self.events, root / "state", str(root / "share"),
                                runc_binary="/nonexistent/runc")
        register_task_service(self.server, self.tasks)
        self.client: TtrpcClient | None = None

    async def _ip(self, argv: list[str]) -> tuple[int, str]:
        self.ip_calls.append(argv)
        return (1, "RTNETLINK answers: No such process") if argv[:3] == ["ip", "route", "del"] else (0, "")

    async def _stop(self, grace: float) -> None:
        self.stopped.append(grace)

    async def start(self) -> TtrpcClient:
        self.reaper.install()
        await self.server.start_unix(str(self.root / "agent.sock"))
        self.client = await TtrpcClient.connect_unix(str(self.root / "agent.sock"))
        return self.client

    async def call(self, method: str, request, response_type=None, service: str = AGENT_SERVICE):
        assert self.client is not None
        return await self.client.call(service, method, request, response_type, timeout=20)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        await self.server.close()


def test_check_and_setup_sandbox(short_dir: Path) -> None:
    async def scenario() -> None:
        guest = Guest(short_dir)
        await guest.start()
        check = await guest.call("Check", pb.CheckRequest(), pb.CheckResponse)
        assert check.agent_version and check.share_dir == "/run/kuasar/state" and check.now_ns > 0
        await guest.call("SetupSandbox", pb.SetupSandboxRequest(
            sandbox_id="p1", hostname="web-0", hosts="127.0.0.1 localhost web-0\n", resolv_conf="nameserver 1.1.1.1\n",
            sysctls={"net.ipv4.ip_forward": "1", "net.ipv4.conf.eth0/100.rp_filter": "2"},
            interfaces=[pb.Interface(hw_addr=MAC.upper(), name="eth0", mtu=1450,
                                     addresses=[pb.IPAddress(cidr="10.88.0.5/16")])],
            routes=[pb.Route(dest="", gateway="10.88.0.1"), pb.Route(dest="10.88.0.0/16", device="eth0", scope=253)]))
        assert guest.hostnames == ["web-0"]
        assert (guest.etc / "hostname").read_text() == "web-0\n"
        assert (guest.etc / "hosts").read_text() == "127.0.0.1 localhost web-0\n"
        assert (guest.etc / "resolv.conf").read_text() == "nameserver 1.1.1.1\n"
        for name in ("hostname", "hosts", "resolv.conf"):  # every user of the guest reads them
            assert (guest.etc / name).stat().st_mode & 0o777 == 0o644, name
        assert (guest.proc_sys / "net/ipv4/ip_forward").read_text() == "1"
        assert (guest.proc_sys / "net/ipv4/conf/eth0.100/rp_filter").read_text() == "2"  # kubelet's dotted name
        calls = [" ".join(c) for c in guest.ip_calls]
        # eth1 (found by MAC) takes the name eth0, which another link holds: that one moves aside first
        assert calls[:3] == ["ip link set dev eth1 down", "ip addr flush dev eth1",
                             "ip link set dev eth0 name eth0-tmp"]
        assert "ip link set dev eth1 name eth0" in calls
        assert "ip link set dev eth0 mtu 1450" in calls and "ip addr add 10.88.0.5/16 dev eth0" in calls
        assert calls.index("ip link set dev eth0 up") > calls.index("ip addr add 10.88.0.5/16 dev eth0")
        # routes without a gateway first
        assert calls[-2:] == ["ip route replace 10.88.0.0/16 dev eth0 scope 253 proto boot",
                              "ip route replace default via 10.88.0.1 proto boot"]
        for bad, error in ((pb.SetupSandboxRequest(hostname="a b"), InvalidArgument),
                           (pb.SetupSandboxRequest(sysctls={"../../etc/x": "1"}), InvalidArgument),
                           # not NOT_FOUND, which CRI reads as an unknown sandbox
                           (pb.SetupSandboxRequest(sysctls={"net.nosuch": "1"}), InvalidArgument),
                           (pb.SetupSandboxRequest(interfaces=[pb.Interface(hw_addr="00:11:22:33:44:55")]), NotFound),
                           (pb.SetupSandboxRequest(interfaces=[pb.Interface(device="eth0",
                                                                            addresses=[pb.IPAddress(cidr="x")])]),
                            InvalidArgument)):
            with pytest.raises(error):
                await guest.call("SetupSandbox", bad)
        await guest.close()

    run(scenario())


def test_setup_sandbox_makes_the_pods_shared_pid_namespace_once(short_dir: Path) -> None:
    async def scenario() -> None:
        guest = Guest(short_dir)
        await guest.start()
        link = short_dir / "run" / "pod-pid-ns"
        for bad in ("relative/pod-pid-ns", str(short_dir / "run/../pod-pid-ns"), str(short_dir / "elsewhere")):
            with pytest.raises(InvalidArgument, match="not under"):
                await guest.call("SetupSandbox", pb.SetupSandboxRequest(sandbox_id="p1", pod_pid_namespace_path=bad))
        assert guest.service.pod_pid_holder == 0 and not (short_dir / "run").exists()
        try:
            for _ in range(2):  # a repeated SetupSandbox keeps the one holder
                await guest.call("SetupSandbox", pb.SetupSandboxRequest(sandbox_id="p1",
                                                                        pod_pid_namespace_path=str(link)))
                holder = guest.service.pod_pid_holder
                assert os.readlink(link) == f"/proc/{holder}/ns/pid"
            assert os.stat(link).st_ino != os.stat("/proc/self/ns/pid").st_ino
            with open(f"/proc/{holder}/status") as f:
                nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
            assert nspid == [str(holder), "1"], "the holder is PID 1 of the new namespace"
        finally:
            if guest.service.pod_pid_holder:
                os.kill(guest.service.pod_pid_holder, signal.SIGKILL)
            await guest.close()

    run(scenario())


def test_update_routes_replaces_only_what_the_agent_added(short_dir: Path) -> None:
    async def scenario() -> None:
        guest = Guest(short_dir)
        await guest.start()
        await guest.call("UpdateRoutes", pb.UpdateRoutesRequest(routes=[
            pb.Route(gateway="10.0.0.1"), pb.Route(dest="192.168.1.0/24", gateway="10.0.0.1")]))
        guest.ip_calls.clear()
        await guest.call("UpdateRoutes", pb.UpdateRoutesRequest(routes=[pb.Route(gateway="10.0.0.1")]))
        assert guest.ip_calls == [["ip", "route", "del", "192.168.1.0/24", "via", "10.0.0.1"],
                                  ["ip", "route", "replace", "default", "via", "10.0.0.1", "proto", "boot"]]
        with pytest.raises(InvalidArgument):
            await guest.call("UpdateRoutes", pb.UpdateRoutesRequest(routes=[pb.Route(gateway="nope")]))
        await guest.close()

    run(scenario())


def test_sync_clock_stamps_guest_times(short_dir: Path) -> None:
    async def scenario() -> None:
        guest = Guest(short_dir)
        await guest.start()
        sent = time.time_ns()
        reply = await guest.call("SyncClock", pb.SyncClockPacket(client_send_time=sent), pb.SyncClockPacket)
        assert reply.client_send_time == sent
        assert sent <= reply.client_arrive_time <= reply.server_send_time <= time.time_ns()
        await guest.close()

    run(scenario())


def test_exec_vm_process(short_dir: Path) -> None:
    async def scenario() -> None:
        guest = Guest(short_dir)
        await guest.start()
        cat = await guest.call("ExecVMProcess", pb.ExecVMProcessRequest(args=["cat"], stdin=b"piped"),
                               pb.ExecVMProcessResponse)
        assert (cat.exit_status, cat.stdout, cat.stderr) == (0, b"piped", b"")
        failing = await guest.call("ExecVMProcess", pb.ExecVMProcessRequest(
            args=["sh", "-c", "echo $VMAGENT_TEST >&2; exit 4"], env=["VMAGENT_TEST=from-env"]),
            pb.ExecVMProcessResponse)
        assert (failing.exit_status, failing.stderr) == (4, b"from-env\n")
        marker = short_dir / "survived"
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="killed"):
            await guest.call("ExecVMProcess", pb.ExecVMProcessRequest(
                args=["sh", "-c", f"sleep 1; touch {marker}"], timeout_ms=300))
        assert time.monotonic() - t0 < 1
        with pytest.raises(InvalidArgument):
            await guest.call("ExecVMProcess", pb.ExecVMProcessRequest())
        with pytest.raises(NotFound):
            await guest.call("ExecVMProcess", pb.ExecVMProcessRequest(args=["/no/such/program"]))
        await asyncio.sleep(1.5)
        assert not marker.exists(), "the timed-out command's session was not killed"
        await guest.close()

    run(scenario())


def test_exec_vm_process_cancelled_by_the_callers_deadline_kills_the_command(short_dir: Path) -> None:
    # Only ExecVMProcess's own timeout killed the command's session: when the caller's ttrpc deadline
    # cancelled the call first, the command ran on with nobody waiting for it.
    async def scenario() -> None:
        guest = Guest(short_dir)
        client = await guest.start()
        pid_file = short_dir / "pid"
        with pytest.raises(DeadlineExceeded):
            await client.call(AGENT_SERVICE, "ExecVMProcess", pb.ExecVMProcessRequest(
                args=["sh", "-c", f"echo $$ > {pid_file}; exec sleep 30"]), pb.ExecVMProcessResponse, timeout=0.5)
        pid = int(pid_file.read_text())
        try:
            for _ in range(100):  # killed, then reaped by the agent's reaper
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the command outlived its cancelled ExecVMProcess call")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await guest.close()

    run(scenario())


def test_events_stream_delivers_backlog_then_live_and_hands_over(short_dir: Path) -> None:
    async def scenario() -> None:
        guest = Guest(short_dir)
        client = await guest.start()
        guest.events.publish("/tasks/exit", task_events.TaskExit(container_id="c1", exit_status=3))
        first = await client.open_stream(AGENT_SERVICE, "Events", payload=b"", client_streaming=False)
        envelope = event_pb2.Envelope.FromString(await first.recv())
        assert envelope.topic == "/tasks/exit" and envelope.namespace == "k8s.io"
        assert task_events.TaskExit.FromString(envelope.event.value).exit_status == 3
        guest.events.publish("/tasks/oom", task_events.TaskOOM(container_id="c1"), "other-ns")
        live = event_pb2.Envelope.FromString(await first.recv())
        assert (live.topic, live.namespace) == ("/tasks/oom", "other-ns")
        second = await client.open_stream(AGENT_SERVICE, "Events", payload=b"", client_streaming=False)
        assert await first.recv() is None  # the newer consumer took over
        guest.events.publish("/tasks/delete", task_events.TaskDelete(container_id="c1"))
        assert event_pb2.Envelope.FromString(await second.recv()).topic == "/tasks/delete"
        assert len(guest.events) == 0
        await guest.close()

    run(scenario())


def test_event_queue_is_bounded() -> None:
    async def scenario() -> None:
        queue = EventQueue(limit=3)
        for i in range(5):
            queue.publish("/tasks/exit", task_events.TaskExit(exit_status=i))
        assert len(queue) == 3 and queue.dropped == 2
        token = queue.take_over()
        first = await queue.get(token)
        assert task_events.TaskExit.FromString(first.event.value).exit_status == 2

    run(scenario())


def test_poweroff_stops_containers_then_powers_off_after_answering(short_dir: Path) -> None:
    async def scenario() -> None:
        guest = Guest(short_dir)
        await guest.start()
        reply = await guest.call("Poweroff", pb.PoweroffRequest(grace_ms=2500), empty_pb2.Empty)
        assert isinstance(reply, empty_pb2.Empty) and guest.stopped == [2.5]
        assert not guest.powered_off.is_set()  # only after the reply left
        await asyncio.wait_for(guest.powered_off.wait(), 2)
        await guest.call("Poweroff", pb.PoweroffRequest())  # a second request is harmless
        assert guest.stopped == [2.5]
        await guest.close()

    run(scenario())


def test_task_backend_validation(short_dir: Path) -> None:
    async def scenario() -> None:
        guest = Guest(short_dir)
        await guest.start()
        share = short_dir / "share"
        (share / "c1").mkdir(parents=True)
        (share / "c1" / "config.json").write_text("{}")
        other = short_dir / "elsewhere"
        other.mkdir()
        (other / "config.json").write_text("{}")
        assert guest.tasks.resolve_bundle("c1", "/host/path/that/is/not/in/the/guest") == share / "c1"
        # Least privilege: the host may only point the agent at what it shared with the guest.
        with pytest.raises(InvalidArgument, match="outside the sandbox's shared directory"):
            guest.tasks.resolve_bundle("c1", str(other))
        (share / "link").symlink_to(other)
        with pytest.raises(InvalidArgument, match="outside the sandbox's shared directory"):
            guest.tasks.resolve_bundle("c1", str(share / "link"))
        (share / "nested" / "b").mkdir(parents=True)
        (share / "nested" / "b" / "config.json").write_text("{}")
        assert guest.tasks.resolve_bundle("c3", str(share / "nested" / "b")) == (share / "nested" / "b").resolve()
        with pytest.raises(InvalidArgument, match="rootfs source"):
            guest.tasks._check_rootfs_paths([mount_pb2.Mount(type="bind", source=str(other))])
        with pytest.raises(InvalidArgument, match="rootfs lowerdir"):
            guest.tasks._check_rootfs_paths([mount_pb2.Mount(
                type="overlay", source="overlay", options=[f"lowerdir={share}:{other}"])])
        guest.tasks._check_rootfs_paths([mount_pb2.Mount(type="bind", source=str(share / "nested"))])
        with pytest.raises(InvalidArgument, match="no config.json"):
            guest.tasks.resolve_bundle("c2", "")
        tsvc = "containerd.task.v3.Task"
        with pytest.raises(InvalidArgument, match="no bundle"):
            await guest.call("Create", task.CreateTaskRequest(id="c2"), service=tsvc)
        with pytest.raises(InvalidArgument, match="not a valid identifier"):
            await guest.call("Create", task.CreateTaskRequest(id="../x"), service=tsvc)
        with pytest.raises(NotFound, match="runc"):  # runc missing: the failure is reported, nothing is kept
            await guest.call("Create", task.CreateTaskRequest(id="c1"), service=tsvc)
        assert guest.tasks.containers == {}
        for method, request in (("State", task.StateRequest(id="c1")), ("Wait", task.WaitRequest(id="c1")),
                                ("Kill", task.KillRequest(id="c1", signal=9)),
                                ("Delete", task.DeleteRequest(id="c1"))):
            with pytest.raises(NotFound):
                await guest.call(method, request, service=tsvc)
        await guest.close()

    run(scenario())


def test_route_and_interface_commands() -> None:
    assert netconf.route_command("fd00::/64", "", "eth0", "", 0, 0) == [
        "ip", "-6", "route", "replace", "fd00::/64", "dev", "eth0", "proto", "boot"]
    assert netconf.route_command("", "10.0.0.1", "", "10.0.0.5", 0, 0) == [
        "ip", "route", "replace", "default", "via", "10.0.0.1", "src", "10.0.0.5", "proto", "boot"]
    assert netconf.delete_command(["ip", "route", "replace", "default", "via", "10.0.0.1", "proto", "boot"]) == [
        "ip", "route", "del", "default", "via", "10.0.0.1"]
    with pytest.raises(InvalidArgument):
        netconf.route_command("", "", "eth0; rm -rf /", "", 0, 0)
    cmds = netconf.interface_commands("eth0", "", ["10.0.0.5/24"], 0, netconf.IFF_NOARP, taken=False)
    assert ["ip", "link", "set", "dev", "eth0", "arp", "off"] in cmds
    assert not any("name" in c for c in cmds)


def test_config_from_kernel_cmdline() -> None:
    config, problems = AgentConfig.from_cmdline(
        "console=ttyS0 quiet task.debug task.log_level=debug task.notify_port=2000 task.sharefs_type=virtiofs "
        "task.no_pivot=false task.port=abc task.bogus=1 task.sharefs_type=nfs")
    assert config.debug is True and config.log_level == "debug" and config.notify_port == 2000
    assert config.no_pivot is False
    assert config.port == 1024 and config.sharefs_type == "9p"  # bad values keep the defaults
    assert any("task.port" in p for p in problems) and any("task.bogus" in p for p in problems)
    assert any("nfs" in p for p in problems)
    defaults, none = AgentConfig.from_cmdline("console=ttyS0 panic=-1")
    assert defaults == AgentConfig() and none == []
    flag, _ = AgentConfig.from_cmdline("task.debug=0 task.no_pivot=yes")
    assert flag.debug is False and flag.no_pivot is True


def test_forward_port_is_settable_and_never_shares_a_port() -> None:
    assert AgentConfig().forward_port == 1026
    moved, none = AgentConfig.from_cmdline("task.forward_port=3000")
    assert moved.forward_port == 3000 and none == []
    off, _ = AgentConfig.from_cmdline("task.forward_port=0")
    assert off.forward_port == 0
    # A second listener on the Task API's or the debug console's port would stop the agent: forwarding goes.
    for cmdline in ("task.forward_port=1024", "task.debug task.forward_port=1025", "task.debug task.debug_port=1026"):
        clash, problems = AgentConfig.from_cmdline(cmdline)
        assert clash.forward_port == 0 and any("forward_port" in p for p in problems), (cmdline, problems)
    no_debug, none = AgentConfig.from_cmdline("task.forward_port=1025")  # the console is off: no clash
    assert no_debug.forward_port == 1025 and none == []


def test_module_set_loads_dependencies_once(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kuasar.vmagent import pid1

    table = short_dir / "modules"
    table.write_text("# comment\nvirtio_mmio a/virtio_ring.ko a/virtio.ko a/virtio_mmio.ko\n"
                     "9p a/virtio_ring.ko a/9pnet.ko a/9p.ko\n")
    loaded: list[str] = []

    def fake_finit(path: str) -> None:
        if path.endswith("9pnet.ko"):
            raise OSError(8, "Exec format error")
        loaded.append(path)

    monkeypatch.setattr(pid1, "finit_module", fake_finit)
    modules = pid1.ModuleSet.from_file(str(table), release="6.1.0-test")
    modules.load(["virtio_mmio", "9p", "unknown"])
    assert loaded == [f"/lib/modules/6.1.0-test/a/{m}.ko" for m in ("virtio_ring", "virtio", "virtio_mmio", "9p")]
    assert modules.failed == [("a/9pnet.ko", "[Errno 8] Exec format error")]
    assert os.path.basename(loaded[-1]) == "9p.ko"


def test_a_poweroff_whose_container_stop_failed_still_cuts_the_power() -> None:
    """The host's Poweroff may be cancelled (its deadline) while containers stop; a second one answers
    at once, so the first must have scheduled the power cut anyway."""
    from kuasar.vmagent import sandbox as agent_sandbox

    async def scenario() -> None:
        cut: list[int] = []

        async def stop_containers(grace: float) -> None:
            await asyncio.sleep(3600)  # e.g. a runc delete that hangs

        service = agent_sandbox.AgentService(None, None, None, started_ns=0, poweroff=lambda: cut.append(1),
                                             stop_containers=stop_containers)
        first = asyncio.create_task(service.power_off(pb.PoweroffRequest(grace_ms=100), None))
        await asyncio.sleep(0.05)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await service.power_off(pb.PoweroffRequest(grace_ms=100), None)  # the host asks again
        await asyncio.sleep(agent_sandbox.POWEROFF_DELAY + 0.3)
        assert cut == [1]

    asyncio.run(scenario())

