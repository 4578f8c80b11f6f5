"""vmm-sandboxer under a real containerd 2.x through CRI, `io_type = "streaming"`: a QEMU micro-VM
per pod (TCG on this kind of host), its guest agent serving the Task API.

TCG makes every VM boot cost seconds, so there are two boots in all, each carrying a whole story:

1. a CNI-networked pod: two containers, output in the CRI log, the pod IP seen inside the guest,
   a server in the guest reached from the host at the pod IP and through CRI port-forward,
   exec with exit code, stop, remove, sandbox metrics, and nothing left behind;
2. a host-network pod (no NIC) whose QEMU is killed with SIGKILL from outside: the pod is reported
   exited and removing it leaves nothing behind.

The guest image is built (cached) with scripts/build_guest_image.py when missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from kuasar.common.api.containerd.cgroups.v2 import metrics_pb2 as v2
from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2 as sb
from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2_grpc as sb_grpc
from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient, container_config, pod_config
from kuasar.vmagent.imagebuild.builder import default_python
from tests.support import containerd as cd
from tests.support import images
from tests.support.guest_image import build_guest_image
from tests.support.setup_hints import fetched_tool_hint

from .conftest import integration_skip_reason, start_sandboxer, stop_process
from .cri_helpers import (
    cgroups_named,
    check_user_namespace_refused,
    forward_once,
    forward_until_answered,
    hierarchy_of,
    stop_pod_while_stopped,
    wait_log,
    wait_pod_not_ready,
    wait_pod_processes_gone,
    wait_state,
    while_unavailable,
)

pytestmark = pytest.mark.integration

BUSYBOX = "localhost/kuasar/busybox:latest"
HANDLER = "kuasar-vmm"
RUNTIME = {"runtime_type": "io.containerd.kuasar-vmm.v1", "sandboxer": "vmm", "io_type": "streaming"}
TIMEOUT = 180.0  # CRI calls: a VM boot plus runc under TCG
# [hypervisor] guest_kill_timeout of this module's sandboxer: far above a SIGKILL's answer under TCG, below
# the default 30 s, which would make the wedged-guest test slow.
GUEST_KILL_TIMEOUT = 15


@dataclass
class VmStack:
    containerd: cd.ContainerdInstance
    sandboxer: subprocess.Popen
    socket: Path
    directory: Path
    log: Path
    log_dir: Path
    config: Path

    @property
    def address(self) -> str:
        return self.containerd.address


def vm_skip_reason() -> str | None:
    reason = integration_skip_reason()
    if reason:
        return reason
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed (make setup)"
    from kuasar.vmm.config import find_program

    if find_program("vhost-device-vsock") is None:
        return f"vhost-device-vsock not installed ({fetched_tool_hint('vhost-device-vsock')})"
    if default_python() is None:
        return "no /usr/bin/python3 >= 3.11 to put in the guest image"
    for tool in ("/bin/busybox", "nsenter", "tc"):
        if not os.path.exists(tool) and shutil.which(tool) is None:
            return f"{tool} missing"
    return None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmStack]:
    with vm_stack(tmp_path_factory.mktemp("vmm"), bridge="kuasar-vm0", subnet="10.249.0.0/16",
                  extra_config=f"guest_kill_timeout = {GUEST_KILL_TIMEOUT}\n") as current:
        yield current


@contextmanager
def vm_stack(base: Path, *, bridge: str, subnet: str, extra_config: str = "") -> Iterator[VmStack]:
    """containerd + vmm-sandboxer (handler `kuasar-vmm`) with the guest image; skips when it cannot run here."""
    reason = vm_skip_reason()
    if reason:
        pytest.skip(reason)
    kernel, initrd = build_guest_image(timeout=1200)
    short = Path(f"/run/{bridge.replace('kuasar-', 'k')}-{secrets.token_hex(2)}")  # socket paths must stay short
    short.mkdir(mode=0o700)
    socket, directory = short / "vmm.sock", short / "vmm"
    config = base / "vmm.toml"
    config.write_text(f'[hypervisor]\nkernel_path = "{kernel}"\ninitrd_path = "{initrd}"\n'
                      'vcpus = 1\nmemory_in_mb = 512\naccel = "auto"\n' + extra_config)
    image_dir = base / "images"
    busybox_tar = images.build_busybox_image(image_dir / "busybox.tar", ref=BUSYBOX)
    pause_tar = images.build_pause_image(image_dir / "pause.tar")
    instance = cd.ContainerdInstance(base / "containerd", sandboxers={"vmm": str(socket)},
                                     runtimes={HANDLER: RUNTIME}, bridge=bridge, subnet=subnet,
                                     log_level="info")
    instance.sock_dir = short / "cd"
    instance.address = str(instance.sock_dir / "containerd.sock")
    instance.ttrpc_address = str(instance.sock_dir / "containerd.sock.ttrpc")
    instance.start()
    sandboxer = None
    log = base / "vmm-sandboxer.log"
    try:
        instance.import_image(busybox_tar)
        instance.import_image(pause_tar)
        os.environ["KUASAR_VMM_KEEP_LOGS"] = str(base / "vm-logs")  # console, QEMU, proxy logs of each VM
        sandboxer = start_sandboxer(socket, directory, log, instance.ttrpc_address, module="kuasar.vmm.cli",
                                    extra_args=("--config", str(config)))
        current = VmStack(instance, sandboxer, socket, directory, log, base / "logs", config)
        yield current
        sandboxer = current.sandboxer  # a test may have restarted it
    finally:
        instance.stop()
        if sandboxer is not None:
            stop_process(sandboxer)
        for leftover in (directory / "vm").glob("*/*.log"):  # a failed test's VM: keep its logs
            (base / "vm-logs" / leftover.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(leftover, base / "vm-logs" / leftover.parent.name / leftover.name)
        kill_leftovers(directory)
        print(f"\nvmm-sandboxer log tail:\n{log.read_text()[-3000:] if log.exists() else ''}")
        shutil.rmtree(short, ignore_errors=True)
        os.environ.pop("KUASAR_VMM_KEEP_LOGS", None)


def kill_leftovers(directory: Path) -> None:
    """Last resort after a failed test: every process whose command line names our VM directory."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if any(str(directory) in arg for arg in proc.info["cmdline"] or []):
            proc.kill()
    from kuasar.vmm import hostfs

    hostfs.unmount_tree(directory)


def sandbox_state(stack: VmStack, pod_id: str) -> dict:
    return json.loads((stack.directory / "sandboxes" / pod_id / "sandbox.json").read_text())


def vm_processes(state: dict) -> list[int]:
    vm = state["extra"]["vm"]
    pids = [vm["hypervisor"]["qemu"]["pid"], vm["proxy"]["pid"]]
    return pids + [h["pid"] for h in vm["hypervisor"]["helpers"].values()]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


async def run_pod(client: CriClient, stack: VmStack, name: str, **kwargs) -> tuple[str, cri.PodSandboxConfig]:
    uid = uuid.uuid4().hex[:12]
    config = pod_config(name, uid=uid, log_directory=str(stack.log_dir / f"{name}-{uid}"), **kwargs)
    response = await client.run_pod_sandbox(config, runtime_handler=HANDLER)
    return response.pod_sandbox_id, config


async def start(client: CriClient, pod_id: str, pod: cri.PodSandboxConfig, name: str, command: list[str],
                mounts: list[cri.Mount] | None = None) -> str:
    config = container_config(name, BUSYBOX, command, log_path=f"{name}.log")
    config.mounts.extend(mounts or [])
    cid = (await client.create_container(pod_id, config, pod)).container_id
    await client.start_container(cid)
    return cid


async def remove_pod_and_check(client: CriClient, stack: VmStack, pod_id: str, pids: list[int],
                               containers: tuple[str, ...] = ()) -> None:
    """StopPodSandbox, then RemoveContainer of `containers` (ones kubelet had not removed yet), then
    RemovePodSandbox; nothing of the pod may be left."""
    await client.stop_pod_sandbox(pod_id)
    for cid in containers:
        await client.remove_container(cid)
    await client.remove_pod_sandbox(pod_id)
    assert_nothing_left(stack, pod_id, pids)


def assert_nothing_left(stack: VmStack, pod_id: str, pids: list[int], netns: str = "") -> None:
    for pid in pids:
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), f"process {pid} ({open(f'/proc/{pid}/cmdline').read()!r}) left running"
    vm_dir = stack.directory / "vm" / pod_id
    assert not mounts_under(vm_dir), mounts_under(vm_dir)
    assert not vm_dir.exists(), list(vm_dir.rglob("*"))
    assert not (stack.directory / "sandboxes" / pod_id).exists()
    if netns:
        assert not os.path.exists(netns), "CRI removes the pod netns (and the tap with it)"


async def tcp_read(host: str, port: int, timeout: float = 60.0) -> bytes:
    """Everything a TCP server in the pod sends (retried until it listens, bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            break
        except (OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def sandbox_metrics(stack: VmStack, pod_id: str) -> v2.Metrics:
    async with grpc.aio.insecure_channel(f"unix://{stack.socket}") as channel:
        stub = sb_grpc.ControllerStub(channel)
        response = await stub.Metrics(sb.ControllerMetricsRequest(sandbox_id=pod_id), timeout=30)
    assert response.metrics.data.type_url == "io.containerd.cgroups.v2.Metrics"
    return v2.Metrics.FromString(response.metrics.data.value)


def test_vm_pod_with_network_two_containers_exec_and_cleanup(stack: VmStack) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address, timeout=TIMEOUT) as client:
            t0 = time.monotonic()
            pod_id, pod = await run_pod(client, stack, "vmpod", host_network=False, hostname="vmpod")
            ready_s = time.monotonic() - t0
            status = (await client.pod_sandbox_status(pod_id)).status
            assert status.state == cri.SANDBOX_READY
            pod_ip = status.network.ip
            assert pod_ip.startswith("10.249."), pod_ip
            state = sandbox_state(stack, pod_id)
            qemu_pid = state["pid"]
            assert "qemu-system" in open(f"/proc/{qemu_pid}/cmdline").read()
            assert state["address"].startswith("ttrpc+hvsock://") and state["version"] == 3
            netns = state["netns_path"]
            assert os.stat(f"/proc/{qemu_pid}/ns/net").st_ino == os.stat(netns).st_ino, "QEMU runs in the pod netns"
            pids = vm_processes(state)

            # Container 1: output through streaming IO into the CRI log, the pod IP inside the guest,
            # host volumes (read-only in, read-write out) shared into the VM.
            volume_in, volume_out = stack.log_dir.parent / "vol-in", stack.log_dir.parent / "vol-out"
            for d in (volume_in, volume_out):
                d.mkdir(exist_ok=True)
            (volume_in / "greeting").write_text("from-a-host-volume\n")
            # kubelet mounts its own etc-hosts (hostAliases, the pod's FQDN): that one is what the
            # container sees, not the guest's.
            kubelet_hosts = stack.log_dir.parent / "etc-hosts"
            kubelet_hosts.write_text("127.0.0.1 localhost\n10.9.8.7 alias.example\n")
            t1 = time.monotonic()
            hello = await start(client, pod_id, pod, "hello",
                                ["sh", "-c", "echo hello from $(hostname); ip -o -4 addr show eth0; cat /in/greeting; "
                                             "echo low ports from $(cat /proc/sys/net/ipv4/ip_unprivileged_port_start);"
                                             " grep alias /etc/hosts;"
                                             " echo written-in-the-vm > /out/result; echo to-stderr >&2; exit 3"],
                                mounts=[cri.Mount(container_path="/in", host_path=str(volume_in), readonly=True),
                                        cri.Mount(container_path="/out", host_path=str(volume_out)),
                                        cri.Mount(container_path="/etc/hosts", host_path=str(kubelet_hosts))])
            exited = await wait_state(client, hello, cri.CONTAINER_EXITED, timeout=TIMEOUT)
            container_s = time.monotonic() - t1
            assert exited.exit_code == 3
            text = await wait_log(pod, "hello", "to-stderr")
            assert "hello from vmpod" in text, text
            assert f"inet {pod_ip}/16" in text, text
            assert "from-a-host-volume" in text, text
            assert "low ports from 0" in text, "containerd's default sysctls reach the guest"
            assert "10.9.8.7 alias.example" in text, text
            assert (volume_out / "result").read_text() == "written-in-the-vm\n"

            # Container 2 in the same VM: reachable from the host at the pod IP (veth <-> tap <-> guest)
            # and through CRI port-forward (a closed port is reported, not hung), exec with output and
            # exit code, then stop.
            web = "mkdir -p /tmp/www && echo forwarded-from-the-vm > /tmp/www/name && httpd -p 8081 -h /tmp/www"
            sleeper = await start(client, pod_id, pod, "sleeper",
                                  ["sh", "-c", f"{web}; echo pong-from-the-vm | nc -l -p 8080; exec sleep 3600"])
            await wait_state(client, sleeper, cri.CONTAINER_RUNNING, timeout=TIMEOUT)
            assert await tcp_read(pod_ip, 8080) == b"pong-from-the-vm\n"
            answer, error = await forward_until_answered(client, pod_id, 8081, b"GET /name HTTP/1.0\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\n\r\nforwarded-from-the-vm\n"), \
                (answer, error)
            answer, error = await forward_once(await client.port_forward(pod_id, [8082]), 8082, b"x")
            assert not answer and "8082" in error, error
            # `kubectl debug --target=sleeper`: a container in the sleeper's PID namespace (the pod shares
            # none), which CRI names by the sleeper's pid, a guest pid.
            debug = container_config("debugger", BUSYBOX, ["sh", "-c", "cat /proc/[0-9]*/comm; sleep 3600"],
                                     log_path="debugger.log")
            debug.linux.security_context.namespace_options.CopyFrom(cri.NamespaceOption(
                network=cri.POD, pid=cri.TARGET, ipc=cri.POD, target_id=sleeper))
            debugger = (await client.create_container(pod_id, debug, pod)).container_id
            await client.start_container(debugger)
            assert "httpd" in await wait_log(pod, "debugger", "httpd", timeout=60)
            await client.stop_container(debugger, timeout=0)
            await client.remove_container(debugger)
            t2 = time.monotonic()
            result = await client.exec_sync(sleeper, ["sh", "-c", "echo exec-ok; cat /etc/hostname; exit 5"])
            exec_s = time.monotonic() - t2
            assert result.exit_code == 5
            assert result.stdout.decode().split() == ["exec-ok", "vmpod"], result
            # containerd 2.1 dials a connection per exec stream and never closes it: each probe left two
            # open in the task proxy (and the guest agent) until the agent ran out of descriptors.
            proxy_fds = Path(f"/proc/{state['extra']['vm']['proxy']['pid']}/fd")
            before = len(list(proxy_fds.iterdir()))
            for _ in range(8):
                assert (await client.exec_sync(sleeper, ["true"])).exit_code == 0
            for _ in range(100):  # (closed as the streams end, moments after the reply)
                if len(list(proxy_fds.iterdir())) <= before:
                    break
                await asyncio.sleep(0.05)
            assert len(list(proxy_fds.iterdir())) <= before, "exec streams left connections open"
            metrics = await sandbox_metrics(stack, pod_id)
            assert metrics.cpu.usage_usec > 0 and metrics.memory.usage > 0
            assert metrics.pids.current >= 1, "the guest's pod cgroup holds the sleeper"
            await client.stop_container(sleeper, timeout=2)
            stopped = await wait_state(client, sleeper, cri.CONTAINER_EXITED, timeout=TIMEOUT)
            assert stopped.exit_code in (137, 143)
            for cid in (hello, sleeper):
                await client.remove_container(cid)
            assert not mounts_under(stack.directory / "vm" / pod_id / "shared" / hello), \
                "the container's rootfs is unmounted on the host once it is deleted"

            t3 = time.monotonic()
            await client.stop_pod_sandbox(pod_id)
            await client.remove_pod_sandbox(pod_id)
            stop_s = time.monotonic() - t3
            assert_nothing_left(stack, pod_id, pids, netns)
            print(f"\nvm pod figures: ready {ready_s:.2f}s, first container run {container_s:.2f}s, "
                  f"exec {exec_s:.2f}s, stop+remove {stop_s:.2f}s, boot {state['extra']['vm'].get('boot')}")

    asyncio.run(scenario())


def test_sandboxer_restart_then_vm_killed_from_outside(stack: VmStack) -> None:
    """A host-network pod (no NIC) sized by annotations, with a shared PID namespace. The sandboxer is
    killed and restarted: it re-attaches to the VM and containerd's task connections (through the task
    proxy) survive. Then QEMU is SIGKILLed from outside: the pod is reported exited and removing it
    leaves nothing behind."""

    async def scenario() -> None:
        async with CriClient(stack.address, timeout=TIMEOUT) as client:
            pod_id, pod = await run_pod(client, stack, "victim", host_network=True, share_pid=True,
                                        annotations={"io.kuasar.vmm.vcpus": "2", "io.kuasar.vmm.memory_mb": "384"})
            state = sandbox_state(stack, pod_id)
            assert not state["extra"]["vm"]["network"], "a host-network pod gets no NIC"
            argv = open(f"/proc/{state['pid']}/cmdline").read().split("\0")
            assert argv[argv.index("-smp") + 1] == "2" and argv[argv.index("-m") + 1] == "384M"
            assert argv[argv.index("-accel") + 1] in ("kvm", "tcg,thread=single")  # see VmmConfig.tcg_thread
            assert "-netdev" not in argv
            cid = await start(client, pod_id, pod, "sleeper", ["sleep", "3600"])
            await wait_state(client, cid, cri.CONTAINER_RUNNING, timeout=TIMEOUT)
            sizes = await client.exec_sync(cid, ["sh", "-c", "nproc; grep MemTotal /proc/meminfo"])
            assert sizes.stdout.split()[0] == b"2" and 300_000 < int(sizes.stdout.split()[2]) < 393_216, sizes
            # The pod's shared PID namespace is its own: PID 1 is the pod's holder, the agent is out of sight.
            seen = await client.exec_sync(cid, ["sh", "-c", "cat /proc/1/comm; cat /proc/[0-9]*/comm"])
            first, *others = seen.stdout.decode().split()
            assert first == f"pod-{pod_id[:11]}" and "sleep" in others, seen
            assert not any("python" in name or "agent" in name for name in others), seen
            # What a container's init leaves in the shared namespace ends with it, as under containerd's shim.
            parent = await start(client, pod_id, pod, "parent", ["sh", "-c", "sleep 4343 & sleep 0.2; exit 7"])
            assert (await wait_state(client, parent, cri.CONTAINER_EXITED, timeout=TIMEOUT)).exit_code == 7
            await wait_pod_processes_gone(client, cid, "sleep4343", timeout=TIMEOUT)
            await client.remove_container(parent)
            pids = vm_processes(state)

            stop_process(stack.sandboxer, signal.SIGKILL)
            stack.sandboxer = start_sandboxer(stack.socket, stack.directory, stack.log,
                                              stack.containerd.ttrpc_address, module="kuasar.vmm.cli",
                                              extra_args=("--config", str(stack.config)))
            status = (await while_unavailable(lambda: client.pod_sandbox_status(pod_id))).status
            assert status.state == cri.SANDBOX_READY
            result = await client.exec_sync(cid, ["sh", "-c", "echo still-here"])
            assert result.stdout == b"still-here\n" and result.exit_code == 0
            assert (await client.container_status(cid)).status.state == cri.CONTAINER_RUNNING

            os.kill(state["pid"], signal.SIGKILL)
            await wait_pod_not_ready(client, pod_id, "the killed VM was not reported")
            await wait_state(client, cid, cri.CONTAINER_EXITED, timeout=60)
            # A re-attached QEMU is no longer our child: its exit is seen, its status is not.
            assert sandbox_state(stack, pod_id)["exit_status"] in (137, 255)
            await remove_pod_and_check(client, stack, pod_id, pids, (cid,))

    asyncio.run(scenario())


def test_a_sandboxer_killed_during_a_vm_boot_removes_the_vm_when_it_restarts(stack: VmStack) -> None:
    """SIGKILL while the guest boots: containerd's Start fails, and containerd forgets the pod without
    a Stop or Shutdown. The restarted sandboxer removes what that Start had made: QEMU, its helper
    daemons and the task proxy, the VM's cgroup, its files and the record."""
    cgroup_parent = f"kuasar-vmk-{os.getpid()}/booting"

    async def scenario() -> tuple[str, list[int]]:
        async with CriClient(stack.address, timeout=TIMEOUT) as client:
            running = asyncio.ensure_future(run_pod(client, stack, "booting", host_network=True,
                                                    cgroup_parent=cgroup_parent))
            pod_id = await booting_pod(stack, running)
            pids = vm_processes(sandbox_state(stack, pod_id))
            assert all(alive(pid) for pid in pids)
            assert (hierarchy_of("memory") / cgroup_parent).is_dir()
            stop_process(stack.sandboxer, signal.SIGKILL)
            with pytest.raises(grpc.aio.AioRpcError):
                await running
            stack.sandboxer = start_sandboxer(stack.socket, stack.directory, stack.log,
                                              stack.containerd.ttrpc_address, module="kuasar.vmm.cli",
                                              extra_args=("--config", str(stack.config)))
            assert all(p.id != pod_id for p in (await client.list_pod_sandbox()).items)
            return pod_id, pids

    pod_id, pids = asyncio.run(scenario())
    assert_nothing_left(stack, pod_id, pids)
    assert cgroups_named(cgroup_parent.split("/")[0]) == [], "the VM's cgroup is gone from every hierarchy"


async def booting_pod(stack: VmStack, running: asyncio.Future) -> str:
    """The id of the one pod whose VM was launched and saved but is not ready yet."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert not running.done(), "the pod started (or failed) before its boot could be interrupted"
        for entry in (stack.directory / "sandboxes").iterdir():
            with contextlib.suppress(OSError, ValueError):
                state = json.loads((entry / "sandbox.json").read_text())
                if state["state"] == "created" and state.get("extra", {}).get("vm"):
                    return state["id"]
        await asyncio.sleep(0.05)
    raise AssertionError("no VM was launched within 60 s")


def test_a_pod_with_its_own_user_namespace_is_refused_at_run_pod_sandbox(stack: VmStack) -> None:
    """The VM is the pod's isolation; its guest maps no ids. Refused before any VM is started."""
    asyncio.run(check_user_namespace_refused(stack.address, HANDLER, stack.log_dir, "vmm"))


async def sleeping_vm_pod(client: CriClient, stack: VmStack, name: str) -> tuple[str, str, dict, list[int]]:
    """A host-network VM pod with one container running `sleep`: the pod's id, the container's, the
    sandbox's saved state and the VM's processes."""
    pod_id, pod = await run_pod(client, stack, name, host_network=True)
    state = sandbox_state(stack, pod_id)
    cid = await start(client, pod_id, pod, "sleeper", ["sleep", "3600"])
    await wait_state(client, cid, cri.CONTAINER_RUNNING, timeout=TIMEOUT)
    return pod_id, cid, state, vm_processes(state)


def test_a_task_proxy_killed_ends_its_vm_and_the_pod(stack: VmStack) -> None:
    """containerd takes every container behind a dropped task connection for exited (255); the VM that
    would run them on is ended too, so the pod reads as exited (kubelet makes it anew) instead of the
    guest running each container beside the copy kubelet then starts. Removing it leaves nothing."""

    async def scenario() -> None:
        async with CriClient(stack.address, timeout=TIMEOUT) as client:
            pod_id, cid, state, pids = await sleeping_vm_pod(client, stack, "proxied")
            os.kill(state["extra"]["vm"]["proxy"]["pid"], signal.SIGKILL)
            await wait_state(client, cid, cri.CONTAINER_EXITED, timeout=60)
            await wait_pod_not_ready(client, pod_id, "the VM of the dead proxy was not ended")
            assert not Path(f"/proc/{state['pid']}").exists(), "QEMU still runs"
            await remove_pod_and_check(client, stack, pod_id, pids, (cid,))

    asyncio.run(scenario())


def test_a_guest_that_stops_answering_is_ended_by_the_pods_stop(stack: VmStack) -> None:
    """containerd's StopPodSandbox kills each container first and waits for the answer: a wedged guest
    (here QEMU stopped) held it until the client's deadline, at every retry. The task proxy answers a
    SIGKILL the guest leaves unanswered for guest_kill_timeout and exits, which ends the VM."""

    async def scenario() -> None:
        async with CriClient(stack.address, timeout=TIMEOUT) as client:
            pod_id, cid, state, pids = await sleeping_vm_pod(client, stack, "wedged")
            took = await stop_pod_while_stopped(client, pod_id, state["pid"])  # QEMU: the guest answers nothing
            assert GUEST_KILL_TIMEOUT <= took < GUEST_KILL_TIMEOUT + 60, took
            status = (await client.container_status(cid)).status
            assert (status.state, status.exit_code) == (cri.CONTAINER_EXITED, 255)
            assert not Path(f"/proc/{state['pid']}").exists(), "QEMU still runs"
            await remove_pod_and_check(client, stack, pod_id, pids, (cid,))

    asyncio.run(scenario())


def restart_sandboxer(stack: VmStack, config: Path) -> None:
    stop_process(stack.sandboxer)
    stack.sandboxer = start_sandboxer(stack.socket, stack.directory, stack.log, stack.containerd.ttrpc_address,
                                      module="kuasar.vmm.cli", extra_args=("--config", str(config)))


def test_the_guest_console_log_is_rotated_at_its_limit(stack: VmStack, tmp_path: Path) -> None:
    """The guest writes its console for the VM's whole life (the agent logs every request): the task
    proxy rotates the log QEMU appends to. With a 4 KiB limit and a guest kernel printing every message
    (ignore_loglevel), the boot alone overflows it: its last 4 KiB are in console.log.1, console.log is
    back under the limit, and removing the pod removes both."""
    limit = 4096
    small = tmp_path / "vmm-small-console.toml"
    small.write_text(stack.config.read_text() + 'log_file_limit_in_kb = 4\nkernel_params = "ignore_loglevel"\n')

    async def scenario() -> None:
        async with CriClient(stack.address, timeout=TIMEOUT) as client:
            pod_id, pod = await run_pod(client, stack, "chatty", host_network=True)
            state = sandbox_state(stack, pod_id)
            argv = open(f"/proc/{state['pid']}/cmdline").read().split("\0")
            assert "ignore_loglevel" in argv[argv.index("-append") + 1]
            log = stack.directory / "vm" / pod_id / "console.log"
            old = log.with_name("console.log.1")
            deadline = time.monotonic() + 10
            while not (old.exists() and log.stat().st_size <= limit) and time.monotonic() < deadline:  # noqa: ASYNC110 - files another process rotates
                await asyncio.sleep(0.1)
            assert old.exists(), f"never rotated: console.log has {log.stat().st_size} bytes"
            assert len(old.read_bytes()) == limit and log.stat().st_size <= limit
            # What the guest writes after a rotation starts the file again: the agent logs the container.
            cid = await start(client, pod_id, pod, "sleeper", ["sleep", "3600"])
            deadline = time.monotonic() + 60
            while cid.encode() not in (text := log.read_bytes()) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            assert cid.encode() in text, "the agent's lines about the container never reached console.log"
            assert b"\0" not in text, "QEMU wrote at its old offset, leaving a hole"
            await remove_pod_and_check(client, stack, pod_id, vm_processes(state), (cid,))

    restart_sandboxer(stack, small)
    try:
        asyncio.run(scenario())
    finally:
        restart_sandboxer(stack, stack.config)


def test_containers_share_a_volume_through_one_path_of_the_vm_and_the_pods_dev_shm(stack: VmStack) -> None:
    """Two containers of a pod bind one host directory (an emptyDir): the VM gets it once, so both see
    the one guest inode, as on a host (through a 9p path each, a socket or FIFO one made there was
    another inode to the other; this machine's 9p refuses FIFOs and sockets outright, so the test
    compares the mounted path itself)."""

    async def scenario() -> None:
        async with CriClient(stack.address, timeout=TIMEOUT) as client:
            pod_id, pod = await run_pod(client, stack, "sharing", host_network=True)
            state = sandbox_state(stack, pod_id)
            pids = vm_processes(state)
            empty_dir = stack.log_dir.parent / f"empty-dir-{pod_id[:8]}"
            empty_dir.mkdir()
            volume = [cri.Mount(container_path="/data", host_path=str(empty_dir))]
            # Each also leaves a file in /dev/shm, which the pod's containers share as a runc pod's do (each
            # had a tmpfs of its own).
            show = ("echo from-$HOSTNAME > /data/$0; touch /dev/shm/$0; ls /dev/shm | tr '\\n' ' '; echo;"
                    " grep ' /data ' /proc/self/mountinfo | cut -d' ' -f4")
            one = await start(client, pod_id, pod, "one", ["sh", "-c", show + "; exec sleep 3600", "one"],
                              mounts=volume)
            roots = [(await wait_log(pod, "one", "/")).split()[-1]]
            two = await start(client, pod_id, pod, "two", ["sh", "-c", show, "two"], mounts=volume)
            assert (await wait_state(client, two, cri.CONTAINER_EXITED, timeout=TIMEOUT)).exit_code == 0
            roots.append((await wait_log(pod, "two", "/")).split()[-1])
            await client.stop_container(one, timeout=0)
            for cid in (one, two):
                await client.remove_container(cid)
            assert roots[0] == roots[1] and ".volumes" in roots[0], roots
            assert sorted(p.name for p in empty_dir.iterdir()) == ["one", "two"]
            assert "one two" in await wait_log(pod, "two", "one two"), "/dev/shm is the pod's"
            await remove_pod_and_check(client, stack, pod_id, pids)

    asyncio.run(scenario())
