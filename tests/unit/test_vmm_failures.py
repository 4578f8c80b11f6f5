"""vmm-sandboxer on its failure paths: a Start cancelled during boot, a guest that sends garbage or is away
for a while, a teardown that fails, a task proxy that dies (the VM ends with it), a netns that is gone and a
--dir too long for the VM's sockets. QEMU and the guest are fakes here; the integration
tests (test_vmm_cri.py) run the real ones."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from google.protobuf import any_pb2

from kuasar.common import cgroups, hvsock
from kuasar.common.api.containerd.events import task_pb2 as task_events
from kuasar.common.api.containerd.types import event_pb2
from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.config import DaemonConfig
from kuasar.common.errors import InvalidArgument, KuasarError, RuntimeFailure, Unavailable
from kuasar.common.linux import SOCKET_PATH_MAX
from kuasar.common.sandboxer import LOST_EXIT_STATUS, SandboxRecord, SandboxState
from kuasar.common.ttrpc import TtrpcServer
from kuasar.vmm import network
from kuasar.vmm import sandboxer as sandboxer_module
from kuasar.vmm.config import VmmConfig
from kuasar.vmm.hypervisor import VmSpec
from kuasar.vmm.procs import ExitWatch, ProcessRef
from kuasar.vmm.sandboxer import VmmSandboxer, VmPod

TASK = "containerd.task.v3.Task"
AGENT = "kuasar.agent.v1.Agent"


class FakeVm:
    pid = 4242

    def __init__(self) -> None:
        self.exit: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    def exited(self) -> bool:
        return self.exit.done()

    async def wait(self) -> int | None:
        return await asyncio.shield(self.exit)

    async def stop(self, timeout: float) -> None:
        if not self.exit.done():
            self.exit.set_result(0)

    async def close(self) -> None:
        pass

    def process_pids(self) -> list[int]:
        return []


class Events:
    enabled = True

    def __init__(self) -> None:
        self.topics: list[str] = []
        self.published = asyncio.Event()

    def publish(self, topic: str, event: Any, namespace: str) -> None:
        self.topics.append(topic)
        self.published.set()


def bare_sandboxer(**attributes: Any) -> VmmSandboxer:
    """A VmmSandboxer without open(): only what the code under test reads."""
    sandboxer = VmmSandboxer.__new__(VmmSandboxer)
    sandboxer.config, sandboxer.accel, sandboxer.pods = VmmConfig(), "tcg", {}
    for name, value in attributes.items():
        setattr(sandboxer, name, value)
    return sandboxer


def spec_in(directory: Path) -> VmSpec:
    return VmSpec(sandbox_id="p", vm_dir=directory, kernel="", initrd="", vcpus=1, memory_mb=1, accel="tcg",
                  tsc_khz=0, share_fs="none")


def short_dir() -> Path:
    """Unix socket paths are short; pytest's tmp_path may not be."""
    return Path(tempfile.mkdtemp(prefix="vmm", dir="/tmp"))


def test_a_start_cancelled_during_boot_leaves_no_accept_polling_a_closed_socket() -> None:
    directory = short_dir()

    async def scenario() -> None:
        listener = hvsock.GuestPortListener(str(spec_in(directory).uds), 1025)
        fd = listener._sock.fileno()
        before = set(asyncio.all_tasks())
        waiting = asyncio.create_task(bare_sandboxer()._wait_ready(listener, FakeVm(), spec_in(directory)))
        await asyncio.sleep(0.1)
        waiting.cancel()  # containerd gave up on RunPodSandbox
        await asyncio.gather(waiting, return_exceptions=True)
        listener.close()  # what start() does next
        assert [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()] == []
        first, second = socket.socketpair()  # an unrelated socket, given the same fd number
        if first.fileno() != fd:
            first, second = second, first
        reader, _ = await asyncio.open_unix_connection(sock=first)
        second.sendall(b"hello\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"hello\n"

    asyncio.run(scenario())


def guest_event(kind: type[Any], topic: str, container_id: str, namespace: str = "k8s.io") -> bytes:
    return event_pb2.Envelope(topic=topic, namespace=namespace, event=any_pb2.Any(
        type_url=kind.DESCRIPTOR.full_name, value=kind(container_id=container_id).SerializeToString())
    ).SerializeToString()


def test_event_forwarding_skips_garbage_and_reconnects_to_an_agent_that_was_away() -> None:
    directory = short_dir()
    (directory / "containers").mkdir()
    (directory / "containers" / "c1").write_text("k8s.io")  # the task proxy's record of c1's Create
    (directory / "shared").mkdir()
    (directory / "shared" / ("b" * 64)).mkdir()  # the guest can write to the share: no proof of anything
    # The guest is outside the host's trust: containerd's CRI deletes the task of any container a
    # /tasks/exit names and marks one a /tasks/oom names OOMKilled, whatever pod it is in. These were
    # all forwarded before.
    forged = [guest_event(task_events.TaskOOM, "/tasks/oom", "b" * 64),  # another pod's container
              guest_event(task_events.TaskExit, "/tasks/oom", "c1"),  # a topic not its type's
              guest_event(task_events.TaskExit, "/tasks/exit", "c1", "moby"),  # another namespace
              event_pb2.Envelope(topic="/containers/delete", namespace="k8s.io").SerializeToString()]

    async def scenario() -> None:
        server = TtrpcServer()
        exited = asyncio.Event()

        async def events(stream: Any, ctx: Any) -> None:
            # first of all, c1's exit in a namespace it was not made in (after a restart of the sandboxer
            # the first event the host sees of a container may be any)
            await stream.send(guest_event(task_events.TaskExit, "/tasks/exit", "c1", "moby"))
            await stream.send(guest_event(task_events.TaskCreate, "/tasks/create", "c1"))
            for message in (b"\xff\xff\xff", *forged, guest_event(task_events.TaskExit, "/tasks/exit", "c1")):
                await stream.send(message)
            await exited.wait()
            # c1's Delete: the proxy removes its record, perhaps before the guest's event arrives
            (directory / "containers" / "c1").unlink()
            await stream.send(guest_event(task_events.TaskDelete, "/tasks/delete", "c1"))
            await asyncio.sleep(3600)

        server.add_stream(AGENT, "Events", events)

        async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(b"OK 1024\n")
            await writer.drain()
            await server.serve_connection(reader, writer)

        sandboxer = bare_sandboxer(events=Events())
        pod = VmPod("p1", FakeVm(), directory, str(directory / "vsock.sock"), "address")  # no agent client yet
        forwarding = asyncio.create_task(sandboxer._forward_events(pod))
        await asyncio.sleep(0.2)
        guest_server = await asyncio.start_unix_server(guest, path=pod.uds)  # the guest answers again
        try:
            async with asyncio.timeout(10):
                while sandboxer.events.topics[-1:] != ["/tasks/exit"]:
                    sandboxer.events.published.clear()
                    await sandboxer.events.published.wait()
                exited.set()
                while sandboxer.events.topics[-1:] != ["/tasks/delete"]:
                    sandboxer.events.published.clear()
                    await sandboxer.events.published.wait()
            assert sandboxer.events.topics == ["/tasks/create", "/tasks/exit", "/tasks/delete"]
            assert not forwarding.done()
        finally:
            forwarding.cancel()
            await asyncio.gather(forwarding, return_exceptions=True)
            if pod.agent is not None:
                await pod.agent.close()
            guest_server.close()

    asyncio.run(scenario())


def test_wait_returns_when_the_teardown_after_the_vm_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    async def failing(net: Any) -> None:
        raise RuntimeFailure("tc qdisc del did not finish in 20s")

    monkeypatch.setattr(network, "remove_redirects", failing)

    async def scenario() -> None:
        pod = VmPod("p1", FakeVm(), Path("/nonexistent"), "/nonexistent/u", "a",
                    network=network.PodNetwork("/run/netns/x"))
        monitor = asyncio.create_task(bare_sandboxer()._monitor(pod))
        pod.vm.exit.set_result(137)  # QEMU died
        await asyncio.gather(monitor, return_exceptions=True)
        assert pod.exit.done() and pod.exit.result().exit_status == 137

    asyncio.run(scenario())


def test_a_task_proxy_that_dies_ends_its_vm() -> None:
    # containerd takes every container behind a dropped task connection for exited and deletes it; a
    # proxy started again left them running in the guest beside the copies kubelet then started.
    async def scenario() -> VmPod:
        proxy = subprocess.Popen(["sleep", "0.2"], start_new_session=True)
        pod = VmPod("p1", FakeVm(), Path("/nonexistent"), "/nonexistent/u", "a")
        pod.proxy = ProcessRef.of(proxy.pid)
        pod.proxy_watch = ExitWatch(pod.proxy, proxy)
        sandboxer = bare_sandboxer()
        monitor = asyncio.create_task(sandboxer._monitor(pod))
        async with asyncio.timeout(10):
            await sandboxer._end_with_proxy(pod)
            await monitor
        return pod

    pod = asyncio.run(scenario())
    assert pod.vm.exited() and pod.exit.result().exit_status == LOST_EXIT_STATUS


def test_a_task_proxy_that_died_while_the_sandboxer_was_down_ends_its_vm_at_recovery(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spawned: list[Any] = []
    monkeypatch.setattr(sandboxer_module, "spawn", lambda *args, **kwargs: spawned.append(args))
    monkeypatch.setattr(hvsock, "connect_ttrpc", _agent_away)

    async def scenario() -> VmPod:
        sandboxer = bare_sandboxer(daemon=SimpleNamespace(log_level="info"), hypervisor=_Reattached())
        dead = subprocess.Popen(["true"])
        dead.wait()
        state = {"vm_dir": str(tmp_path), "uds": str(tmp_path / "vsock.sock"), "address": "a", "memory_mb": 512,
                 "hypervisor": {}, "proxy": ProcessRef.of(dead.pid).to_json(), "network": None}
        await sandboxer.recover([SandboxRecord(id="p1", state=SandboxState.READY, extra={"vm": state})])
        pod = sandboxer.pods["p1"]
        async with asyncio.timeout(10):
            await pod.exit
        return pod

    pod = asyncio.run(scenario())
    assert pod.vm.exited() and pod.exit.result().exit_status == LOST_EXIT_STATUS
    assert spawned == []  # no proxy started again


class _Reattached:
    async def reattach(self, state: dict) -> Any:
        return FakeVm()


async def _agent_away(*args: Any, **kwargs: Any) -> Any:
    raise Unavailable("away")


def test_a_netns_that_is_gone_is_a_clear_error_and_leaks_no_fd() -> None:
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(RuntimeFailure, match="does-not-exist"):
        network.call_in_netns("/run/netns/does-not-exist", "creating a tap", lambda: 1)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("mutate", [
    lambda c: setattr(c, "hostname", "bad\nname"),
    lambda c: setattr(c, "hostname", "x" * 65),
    lambda c: c.dns_config.searches.append("svc.local\nnameserver 6.6.6.6"),
    lambda c: c.linux.sysctls.__setitem__("../../etc/x", "1"),
    lambda c: c.linux.sysctls.__setitem__("net.ipv4.ip_forward", "1\n2"),
], ids=["newline-hostname", "long-hostname", "dns-newline", "traversal-sysctl", "two-line-value"])
def test_a_pod_config_a_runc_pod_is_refused_for_is_refused_at_create_before_a_vm_boots(mutate) -> None:
    # Accepted before: the guest refused it once QEMU had booted, or wrote the DNS entry's second line.
    directory = short_dir()
    sandboxer = bare_sandboxer(daemon=DaemonConfig(listen=directory / "s.sock", dir=directory),
                               vm_root=directory / "vm")
    config = cri.PodSandboxConfig()
    config.metadata.name = "p"
    mutate(config)
    record = SandboxRecord(id="a" * 64, pod_config_b64=base64.b64encode(config.SerializeToString()).decode())
    with pytest.raises(InvalidArgument):
        asyncio.run(sandboxer.create(record))
    assert not (directory / "vm").exists()


def test_a_dir_too_long_for_any_of_the_vms_sockets_is_refused_at_create() -> None:
    base = short_dir()
    sandbox_id = "a" * 40
    # vhost-vsock.sock is the longest name: one byte past the limit with it, and room for vsock.sock_1025
    room = SOCKET_PATH_MAX - len(f"/vm/{sandbox_id}/vhost-vsock.sock") + 1
    directory = Path(str(base) + "/" + "x" * (room - len(str(base)) - 1))
    directory.mkdir()
    assert len(str(directory / "vm" / sandbox_id / "vsock.sock_1025")) <= SOCKET_PATH_MAX  # the old check
    sandboxer = bare_sandboxer(daemon=DaemonConfig(listen=directory / "s.sock", dir=directory),
                               vm_root=directory / "vm")
    record = SandboxRecord(id=sandbox_id, pod_config_b64=base64.b64encode(
        cri.PodSandboxConfig().SerializeToString()).decode())
    with pytest.raises(InvalidArgument, match="too long"):
        asyncio.run(sandboxer.create(record))


def test_a_guest_that_is_away_is_a_kuasar_error() -> None:
    # What the event forwarder's retry relies on: not an OSError, which would end it.
    with pytest.raises(KuasarError):
        asyncio.run(hvsock.connect_ttrpc("/nonexistent/vsock.sock", 1024, timeout=1))


def test_a_root_cgroup_parent_gives_the_vm_a_cgroup_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # kubelet without QoS cgroups gives `/`: QEMU and its helpers were moved into the root cgroup.
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids\n")  # a cgroup v2 root
    (root / "cgroup.procs").write_text("")
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", root)

    class Vm(FakeVm):
        def process_pids(self) -> list[int]:
            return [4242]

    pod_config = cri.PodSandboxConfig()
    pod_config.linux.cgroup_parent = "/"

    async def place() -> cgroups.PodCgroup | None:  # a VM lives in a loop
        return bare_sandboxer()._place_in_cgroup("p1", pod_config, Vm())

    cgroup = asyncio.run(place())
    assert (root / "cgroup.procs").read_text() == ""
    assert (root / "p1" / "cgroup.procs").read_text() == "4242"
    assert cgroup is not None and cgroup.created == [str(root / "p1")]


def test_a_vm_that_exits_0_unasked_is_not_reported_as_a_clean_exit() -> None:
    # With panic=-1 and -no-reboot a guest kernel panic ends QEMU with status 0, which Wait reported
    # as the pod's success.
    async def scenario() -> int:
        pod = VmPod("p1", FakeVm(), Path("/nonexistent"), "/nonexistent/u", "a")
        monitor = asyncio.create_task(bare_sandboxer()._monitor(pod))
        pod.vm.exit.set_result(0)
        await monitor
        return pod.exit.result().exit_status

    assert asyncio.run(scenario()) == LOST_EXIT_STATUS


def test_a_recovered_pod_keeps_its_cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A sandboxer restarted forgot the pod's cgroup, which Shutdown then left behind.
    class Watch:
        def __init__(self, *args: Any) -> None:
            self.done = False

        async def wait(self, timeout: float | None = None) -> None:
            await asyncio.sleep(3600)

    monkeypatch.setattr(sandboxer_module, "ExitWatch", Watch)
    monkeypatch.setattr(hvsock, "connect_ttrpc", _agent_away)

    async def scenario() -> VmPod:
        sandboxer = bare_sandboxer(daemon=SimpleNamespace(log_level="info"), hypervisor=_Reattached())
        state = {"vm_dir": str(tmp_path), "uds": str(tmp_path / "vsock.sock"), "address": "a", "memory_mb": 512,
                 "hypervisor": {}, "proxy": ProcessRef.of(os.getpid()).to_json(), "network": None,
                 "cgroup": {"path": "kubepods/podX", "created": []}}
        await sandboxer.recover([SandboxRecord(id="p1", state=SandboxState.READY, extra={"vm": state})])
        pod = sandboxer.pods["p1"]
        for task in list(pod.tasks):
            task.cancel()
        await asyncio.gather(*pod.tasks, return_exceptions=True)
        return pod

    pod = asyncio.run(scenario())
    assert pod.cgroup is not None and pod.cgroup.path == "kubepods/podX"
    assert not pod.vm.exited()


@pytest.mark.parametrize("odd", ["a:b", "a,b"])
def test_a_dir_that_would_split_qemus_or_hvsocks_options_is_refused_up_front(tmp_path: Path, odd: str) -> None:
    # A comma was let through: QEMU's `path=`/`file:` options and vhost-device-vsock's `socket=` split
    # there, and a VM could not start. (The check on ':' came only after the KVM probe.)
    with pytest.raises(InvalidArgument, match="must not contain"):
        VmmSandboxer(DaemonConfig(listen=tmp_path / "s.sock", dir=tmp_path / odd))
    assert not (tmp_path / odd).exists()


def test_kuasars_sandbox_table_is_accepted_and_another_table_refused(tmp_path: Path) -> None:
    # Kuasar's config_qemu_x86_64.toml starts with [sandbox] (log_level): an adapted copy must still load.
    with pytest.raises(InvalidArgument, match="must not contain"):  # gets past the table check
        VmmSandboxer(DaemonConfig(listen=tmp_path / "s.sock", dir=tmp_path / "a,b",
                                  sections={"sandbox": {"log_level": "info"}}))
    with pytest.raises(InvalidArgument, match=r"unknown config table\(s\) \[runc\]"):
        VmmSandboxer(DaemonConfig(listen=tmp_path / "s.sock", dir=tmp_path / "v", sections={"runc": {}}))


def test_a_record_recovery_cannot_read_is_reported_exited_and_the_others_are_recovered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A state another version wrote (a renamed field): the TypeError stopped start-up for every pod, and
    # the sandboxer restarted into it again and again.
    cleaned: list[dict] = []
    closed: list[FakeVm] = []

    class Vm(FakeVm):
        async def close(self) -> None:
            closed.append(self)

    class Hypervisor:
        async def reattach(self, state: dict) -> Any:
            return Vm()

        async def cleanup(self, state: dict) -> None:
            cleaned.append(state)

    monkeypatch.setattr(hvsock, "connect_ttrpc", _agent_away)

    async def scenario() -> tuple[list[SandboxRecord], set[str]]:
        sandboxer = bare_sandboxer(daemon=SimpleNamespace(log_level="info"), hypervisor=Hypervisor())
        records = []
        odd_proxy = subprocess.Popen(["sleep", "300"], start_new_session=True)
        proxies = {"odd": ProcessRef.of(odd_proxy.pid), "fine": ProcessRef.of(os.getpid())}
        for pod_id, net in (("odd", {"netns": "", "routes": [{"renamed_field": 1}]}), ("fine", None)):
            state = {"vm_dir": str(tmp_path), "uds": str(tmp_path / "vsock.sock"), "address": "a",
                     "hypervisor": {"pid": pod_id}, "proxy": proxies[pod_id].to_json(), "network": net}
            records.append(SandboxRecord(id=pod_id, state=SandboxState.READY, extra={"vm": state}))
        monkeypatch.setattr(sandboxer_module, "ExitWatch", lambda *args: SimpleNamespace(wait=asyncio.Event().wait))
        sandboxer.events = SimpleNamespace(enabled=False)
        await sandboxer.recover(records)
        assert odd_proxy.wait(5) is not None  # ended with its VM
        assert len(closed) == 1  # the QMP connection of the VM it could not adopt
        recovered = set(sandboxer.pods)
        await sandboxer._cleanup_by_state(records[0])  # Shutdown's removal goes on past what it cannot read
        for pod in sandboxer.pods.values():
            for task in list(pod.tasks):
                task.cancel()
            await asyncio.gather(*pod.tasks, return_exceptions=True)
        return records, recovered

    records, recovered = asyncio.run(scenario())
    assert recovered == {"fine"}
    assert records[0].state == SandboxState.STOPPED and records[1].state == SandboxState.READY
    assert cleaned == [{"pid": "odd"}] * 2  # its VM is ended: reported exited, it must not run on


def test_vms_are_re_attached_all_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One after the other, each guest that does not answer cost 8 s before the sandboxer served again.
    in_flight, all_in, waited_in_vain = 0, asyncio.Event(), []

    class Hypervisor:
        async def reattach(self, state: dict) -> Any:
            nonlocal in_flight
            in_flight += 1
            if in_flight == 4:
                all_in.set()
            try:
                await asyncio.wait_for(all_in.wait(), 5)
            except TimeoutError:  # one at a time: the first waited here in vain
                waited_in_vain.append(state)
            return None  # (gone: reported exited)

        async def cleanup(self, state: dict) -> None:
            pass

    async def scenario() -> list[SandboxRecord]:
        sandboxer = bare_sandboxer(daemon=SimpleNamespace(log_level="info"), hypervisor=Hypervisor())
        records = [SandboxRecord(id=f"p{i}", state=SandboxState.READY, extra={"vm": {"hypervisor": {"pid": i}}})
                   for i in range(4)]
        await sandboxer.recover(records)
        return records

    assert all(record.state == SandboxState.STOPPED for record in asyncio.run(scenario()))
    assert waited_in_vain == []


def test_a_guest_sending_events_of_other_pods_without_end_does_not_fill_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def forged_without_end() -> None:
        pod = VmPod("p1", FakeVm(), tmp_path, str(tmp_path / "vsock.sock"), "address")
        forged = event_pb2.Envelope(topic="/tasks/oom", namespace="k8s.io")
        for _ in range(1000):
            assert not VmmSandboxer._pods_event(pod, forged, "/tasks/oom", "b" * 64)

    with caplog.at_level("WARNING", logger="kuasar.vmm.sandboxer"):
        asyncio.run(forged_without_end())
    dropped = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == sandboxer_module.LOGGED_DROPPED_EVENTS and "the last one" in dropped[-1].getMessage()


@pytest.mark.parametrize(("status", "said"), [(0, "status 0, the guest shut down or reset"),
                                              (128 + 31, "killed by SIGSYS"), (1, "status 1")])
def test_a_qemu_that_exits_during_boot_is_reported_with_its_status_and_both_logs(status: int, said: str) -> None:
    # It said only "QEMU exited before the guest agent was ready:" and two empty lines: a guest that reset
    # at once (QEMU 10's TCG with microvm's PIT) looked like nothing at all.
    directory = short_dir()
    (directory / "qemu.log").write_text("qemu-system-x86_64: -netdev tap: bad fd\n")

    async def scenario() -> str:
        listener = hvsock.GuestPortListener(str(spec_in(directory).uds), 1025)
        vm = FakeVm()
        vm.exit.set_result(status)
        try:
            with pytest.raises(RuntimeFailure) as failed:
                await bare_sandboxer()._wait_ready(listener, vm, spec_in(directory))
        finally:
            listener.close()
        return failed.value.message

    message = asyncio.run(scenario())
    assert f"QEMU exited ({said}) before the guest agent was ready" in message
    assert "guest console:\n(nothing)" in message and "QEMU said:\nqemu-system-x86_64: -netdev tap: bad fd" in message


def test_a_vm_state_that_is_not_an_object_keeps_nothing_from_going_on(tmp_path: Path) -> None:
    # Its fallback read the same value as a dict: the AttributeError ended recovery (no pod served at
    # all), and Shutdown failed on it every time, so containerd could never remove the sandbox.
    class Hypervisor:
        async def reattach(self, state: dict) -> Any:
            raise AssertionError("nothing to re-attach to")

    async def scenario() -> None:
        sandboxer = bare_sandboxer(daemon=SimpleNamespace(log_level="info"), hypervisor=Hypervisor())
        odd = SandboxRecord(id="odd", state=SandboxState.READY, extra={"vm": "written by hand"})
        await sandboxer.recover([odd])
        assert odd.state == SandboxState.STOPPED  # reported exited: there is no VM it can name
        await sandboxer._cleanup_by_state(odd)
        assert sandboxer.status_info(odd, verbose=True)["task_address"] == odd.address

    asyncio.run(scenario())


def test_a_guest_flooding_events_gets_its_budget_and_no_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its own containers' events passed the ownership check at any rate, into the event queue every VM pod
    # shares, which drops its oldest when full: other pods lost theirs (a /tasks/oom among them).
    now = [1000.0]
    monkeypatch.setattr(sandboxer_module.time, "monotonic", lambda: now[0])

    async def scenario() -> None:
        pod = sandboxer_module.VmPod("p1", FakeVm(), tmp_path, "uds", "address")  # type: ignore[arg-type]
        within = sandboxer_module.VmmSandboxer._within_budget
        assert all(within(pod, "/tasks/exit") for _ in range(sandboxer_module.GUEST_EVENTS_BURST))
        assert not within(pod, "/tasks/exit") and pod.dropped_events == 1
        now[0] += 1.0  # a second later: a second's worth again
        passed = sum(within(pod, "/tasks/exit") for _ in range(1000))
        assert passed == int(sandboxer_module.GUEST_EVENTS_PER_S)

    asyncio.run(scenario())
