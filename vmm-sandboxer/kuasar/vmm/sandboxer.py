"""vmm-sandboxer: one micro-VM per pod (QEMU today), its agent serving the Task API inside.

Start of a pod (RunPodSandbox -> Controller.Start):

1. `<dir>/vm/<id>/` with the shared directory `shared/`; the pod's vCPUs and memory from its
   resources/annotations within the configured bounds;
2. the pod network (if CNI gave the pod a netns): a tap per veth, tc redirects (network.py);
3. listen on `<uds>_1025`, then the driver starts vhost-device-vsock and QEMU in the netns;
4. the task proxy (proxy.py) on `<vm dir>/task.vsock`, the address containerd gets; with a pod netns
   it also carries CRI port-forward connections into the guest (portforward.py);
5. the guest announces itself (`READY` on port 1025: no CONNECT polling during boot, which can wedge
   vhost-device-vsock), one hybrid-vsock connection to port 1024, `Agent/Check`, then
   `Agent/SetupSandbox` (hostname, hosts, resolv.conf, sysctls, interfaces, routes, the pod's shared
   PID namespace) and a clock sync;
6. Start returns the QEMU pid (it runs in the pod netns) and `ttrpc+hvsock://<vm dir>/task.vsock:1024`
   with task API version 3.

Wait completes when QEMU exits for whatever reason (pidfd). Stop asks the agent to power off, then
QMP `quit`, then SIGKILL; Shutdown removes processes, taps' redirects, the port-forward rule, mounts
and files. Everything needed to find the VM again is persisted in the record, so a restarted
sandboxer re-attaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from kuasar.common import cgroups, hvsock
from kuasar.common.api.containerd.cgroups.v2 import metrics_pb2 as v2
from kuasar.common.api.containerd.types import event_pb2
from kuasar.common.api.kuasar.agent.v1 import agent_pb2 as agent
from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.config import DaemonConfig
from kuasar.common.errors import InvalidArgument, KuasarError, RuntimeFailure
from kuasar.common.events import TASK_EVENT_TOPICS, EventPublisher
from kuasar.common.ids import validate_id
from kuasar.common.linux import SOCKET_PATH_MAX
from kuasar.common.pod_files import HOST_RESOLV_CONF, check_names, pod_resolv_conf
from kuasar.common.pod_sandboxer import decode_pod_config, pod_names, refuse_user_namespace
from kuasar.common.pod_sysctls import check_sysctls, with_containerd_defaults
from kuasar.common.sandboxer import LOST_EXIT_STATUS, ExitInfo, Sandboxer, SandboxRecord, SandboxState, StartResult
from kuasar.common.strays import kill_strays, owner_env
from kuasar.common.task_server import helper_argv
from kuasar.common.ttrpc import TtrpcClient

from . import accel, hostfs, network, portforward, vm_logs
from .config import VmmConfig, parse_config
from .hypervisor import (
    AGENT_PORT,
    GUEST_SHARE_DIR,
    NOTIFY_PORT,
    TASK_SOCKET,
    NicDevice,
    Vm,
    VmSpec,
    make_hypervisor,
)
from .procs import ExitWatch, ProcessRef, spawn, terminate
from .proxy import KNOWN_CONTAINERS_DIR
from .spec import GUEST_CGROUP_PARENT, GUEST_POD_PID_NS

log = logging.getLogger(__name__)

AGENT = "kuasar.agent.v1.Agent"
AGENT_CALL_TIMEOUT = 30.0
AGENT_CONNECT_TIMEOUT = 5.0
PROXY_START_TIMEOUT = 20.0
POWEROFF_WAIT = 10.0
CLOCK_SYNC_INTERVAL = 60.0
CLOCK_TOLERANCE_NS = 10_000_000
MiB = 1 << 20
# Pod annotations that size the VM (Kata's names are honoured too).
VCPU_ANNOTATIONS = ("io.kuasar.vmm.vcpus", "io.katacontainers.config.hypervisor.default_vcpus")
MEMORY_ANNOTATIONS = ("io.kuasar.vmm.memory_mb", "io.katacontainers.config.hypervisor.default_memory")
# Dropped guest events logged per pod: a few tell what happened, a guest sending them without end
# would otherwise fill the host's log.
LOGGED_DROPPED_EVENTS = 10
# What one guest may publish through the sandboxer's one event queue (shared by every VM pod, dropping
# its oldest when full): a burst, then a steady rate. A container's life is a handful of events; a guest
# flooding its own containers' events evicted other pods' (their /tasks/oom among them).
GUEST_EVENTS_BURST = 256
GUEST_EVENTS_PER_S = 50.0
# What a guest may publish, by type: the topic containerd's own shims give each. Anything else from
# the guest (another topic, TaskIO with no container id) is dropped: the guest is outside the host's trust.
GUEST_EVENTS: dict[str, tuple[type[Any], str]] = {
    kind.DESCRIPTOR.full_name: (kind, topic) for kind, topic in TASK_EVENT_TOPICS.items()}


def vm_resources(config: VmmConfig, pod: cri.PodSandboxConfig) -> tuple[int, int]:
    """(vCPUs, memory MiB): annotations, else the pod's resources (+ overhead), else the defaults;
    always within [1, default_max_vcpus] and [min_memory_in_mb, max_memory_in_mb]."""
    vcpus, memory = config.vcpus, config.memory_in_mb
    res = pod.linux.resources
    if res.cpu_quota > 0 and res.cpu_period > 0:
        vcpus = math.ceil(res.cpu_quota / res.cpu_period)
    if res.memory_limit_in_bytes > 0:
        memory = math.ceil(res.memory_limit_in_bytes / MiB) + config.memory_overhead_in_mb
    for key in VCPU_ANNOTATIONS:
        if key in pod.annotations:
            vcpus = _positive_int(key, pod.annotations[key])
            break
    for key in MEMORY_ANNOTATIONS:
        if key in pod.annotations:
            memory = _positive_int(key, pod.annotations[key])
            break
    vcpus = min(max(vcpus, 1), max(config.default_max_vcpus, 1))
    memory = min(max(memory, config.min_memory_in_mb), config.max_memory_in_mb)
    return vcpus, memory


def _positive_int(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InvalidArgument(f"annotation {key}={value!r} is not a number") from None
    if number <= 0:
        raise InvalidArgument(f"annotation {key}={value!r} must be positive")
    return number


def hosts_file(hostname: str, addresses: list[str]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{addr}\t{hostname}" for addr in addresses if hostname]
    return "\n".join(lines) + "\n"


def resolv_conf(dns: cri.DNSConfig, host_file: Path = HOST_RESOLV_CONF) -> str:
    return pod_resolv_conf((list(dns.servers), list(dns.searches), list(dns.options)),
                           host_file).decode(errors="replace")


def is_host_network(pod: cri.PodSandboxConfig, netns: str) -> bool:
    return pod.linux.security_context.namespace_options.network == cri.NODE or not netns


@dataclass
class VmPod:
    id: str
    vm: Vm
    vm_dir: Path
    uds: str
    address: str
    memory_mb: int = 0
    proxy: ProcessRef | None = None
    proxy_watch: ExitWatch | None = None
    network: network.PodNetwork | None = None
    cgroup: cgroups.PodCgroup | None = None
    agent: TtrpcClient | None = None
    containers: dict[str, str] = field(default_factory=dict)  # id -> namespace, of events from the guest
    dropped_events: int = 0  # from the guest, not about one of this pod's containers, or over its budget
    event_budget: float = GUEST_EVENTS_BURST
    event_budget_at: float = field(default_factory=lambda: time.monotonic())
    stopping: bool = False
    exit: asyncio.Future[ExitInfo] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def background(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=f"{name}-{self.id[:12]}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class VmmSandboxer(Sandboxer):
    name = "vmm"

    def __init__(self, daemon: DaemonConfig) -> None:
        self.daemon = daemon
        # [sandbox] is Kuasar's (its log_level): accepted so that an adapted Kuasar file still loads.
        daemon.check_tables("hypervisor", "sandbox")
        self.config = parse_config(daemon.section("hypervisor"))
        self.hypervisor = make_hypervisor(self.config)
        self.vm_root = daemon.dir / "vm"
        # Refused before anything is started: every VM's sockets and files live under it.
        for separator, where in ((":", "hvsock addresses split there"),
                                 (",", "QEMU's and vhost-device-vsock's options split there")):
            if separator in str(self.vm_root):
                raise InvalidArgument(f"--dir {daemon.dir} must not contain {separator!r} ({where})")
        self.events = EventPublisher(daemon.events_address)
        self.pods: dict[str, VmPod] = {}
        self.accel = "tcg"
        self.tsc_khz = 0

    # -- daemon lifecycle --------------------------------------------------------------------------
    async def open(self) -> None:
        for warning in await self.hypervisor.check():
            log.warning("%s", warning)
        self.tsc_khz = accel.read_tsc_khz(self.config.tsc_khz)
        choice = await accel.detect(self.config.accel, getattr(self.hypervisor, "qemu", self.config.qemu_path),
                                    self.config.kernel_path, self.config.machine_type, self.tsc_khz,
                                    self.config.kernel_is_pvm_guest, self.config.kvm_probe_timeout)
        self.accel = choice.accel
        self.vm_root.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def close(self) -> None:
        for pod in self.pods.values():
            for task in list(pod.tasks):
                task.cancel()
            await asyncio.gather(*pod.tasks, return_exceptions=True)
            if pod.agent is not None:
                await pod.agent.close()
            await pod.vm.close()
        await self.events.close()

    # -- Sandbox API -------------------------------------------------------------------------------
    async def create(self, record: SandboxRecord) -> None:
        pod = decode_pod_config(record)
        refuse_user_namespace(pod, self.name)  # the VM is the pod's isolation; the guest has no id mapping
        # As for a runc pod: refused now, not by the guest once the VM has booted. Any sysctl is the
        # pod's own in its VM, so only names and values are checked here.
        check_names(*pod_names(pod))
        check_sysctls(pod.linux.sysctls)
        network.validate_netns(record.netns_path)
        vm_resources(self.config, pod)  # annotations are checked now, not at start
        cgroups.pod_parent_path(pod.linux.cgroup_parent)  # so is a slice name
        sockets = VmSpec(sandbox_id=record.id, vm_dir=self.vm_root / record.id, kernel="", initrd="", vcpus=1,
                         memory_mb=0, accel="tcg", tsc_khz=0, share_fs="9p").socket_paths()  # paths only
        longest = max(sockets, key=lambda path: len(str(path)))
        if len(str(longest)) > SOCKET_PATH_MAX:
            raise InvalidArgument(f"--dir {self.daemon.dir} is too long for the VM's unix sockets "
                                  f"({len(str(longest))} > {SOCKET_PATH_MAX} bytes)")

    async def start(self, record: SandboxRecord) -> StartResult:
        pod_config = decode_pod_config(record)
        vcpus, memory = vm_resources(self.config, pod_config)
        vm_dir = self.vm_root / record.id
        if os.path.lexists(vm_dir):  # left by a sandboxer that died while starting this pod
            await kill_strays(vm_dir)
            hostfs.remove_tree(vm_dir)
        vm_dir.mkdir(mode=0o700)
        spec = VmSpec(sandbox_id=record.id, vm_dir=vm_dir, kernel=self.config.kernel_path,
                      initrd=self.config.initrd_path, vcpus=vcpus, memory_mb=memory, accel=self.accel,
                      tsc_khz=self.tsc_khz, share_fs=self.config.share_fs, debug=self.config.task_debug,
                      agent_log_level=self.config.task_log_level, cache_9p=self.config.cache_9p)
        if spec.share_fs != "none":
            spec.share_source.mkdir(mode=0o711)
            hostfs.read_only_view(spec.share_source, spec.share_dir)
        net: network.PodNetwork | None = None
        tap_fds: dict[str, int] = {}
        listener: hvsock.GuestPortListener | None = None
        vm: Vm | None = None
        pod: VmPod | None = None
        t0 = time.monotonic()
        try:
            if not is_host_network(pod_config, record.netns_path):
                spec.netns = record.netns_path
                net = await network.discover(record.netns_path)
                tap_fds = await network.create_taps(net)
                spec.nics = [NicDevice(id=f"net{i}", mac=nic.mac, fd=tap_fds[nic.tap])
                             for i, nic in enumerate(net.nics)]
            listener = hvsock.GuestPortListener(str(spec.uds), NOTIFY_PORT)
            vm = await self.hypervisor.launch(spec)
            for fd in tap_fds.values():
                os.close(fd)
            tap_fds = {}
            address = hvsock.format_address(str(vm_dir / TASK_SOCKET), AGENT_PORT)
            pod = VmPod(record.id, vm, vm_dir, str(spec.uds), address, memory_mb=memory, network=net)
            pod.cgroup = self._place_in_cgroup(record.id, pod_config, vm)
            self._start_proxy(pod, spec)
            record.extra["vm"] = self._state(pod, spec)
            # Saved before the boot is waited for (seconds under TCG): a sandboxer killed meanwhile
            # finds the VM's processes and cgroup by it, and removes them (SandboxController.recover).
            self.persist(record)
            t_launched = time.monotonic()
            await self._wait_ready(listener, vm, spec)
            t_ready = time.monotonic()
            pod.agent = await hvsock.connect_ttrpc(str(spec.uds), AGENT_PORT, timeout=AGENT_CONNECT_TIMEOUT)
            check = await pod.agent.call(AGENT, "Check", agent.CheckRequest(), agent.CheckResponse, timeout=10)
            if spec.share_fs != "none" and check.share_dir != GUEST_SHARE_DIR:
                raise RuntimeFailure(f"the guest did not mount the shared directory ({spec.share_fs}); "
                                     f"see {spec.console_log}")
            await pod.agent.call(AGENT, "SetupSandbox", self._setup_request(record.id, pod_config, net),
                                 timeout=AGENT_CALL_TIMEOUT)
            await self._sync_clock(pod.agent)
            await self._wait_proxy(pod)
        except BaseException as err:
            for fd in tap_fds.values():
                os.close(fd)
            await self._abort_start(record, pod, vm, net, vm_dir)
            if isinstance(err, KuasarError | asyncio.CancelledError):
                raise
            raise RuntimeFailure(f"starting the VM: {err}") from err
        finally:
            if listener is not None:
                listener.close()
        self.pods[record.id] = pod
        self._background(pod)
        record.extra["vm"]["boot"] = {"launch_s": round(t_launched - t0, 3), "ready_s": round(t_ready - t0, 3),
                                      "total_s": round(time.monotonic() - t0, 3),
                                      "guest_ready_s": round(check.agent_ready_ns / 1e9, 3)}
        log.info("sandbox %s: VM pid %d (%s, %d vCPU, %d MiB) ready in %.2fs (guest agent at %.2fs of boot)",
                 record.id, vm.pid, self.accel, vcpus, memory, time.monotonic() - t0, check.agent_ready_ns / 1e9)
        return StartResult(pid=vm.pid, address=pod.address, version=3)

    async def wait(self, record: SandboxRecord) -> ExitInfo:
        pod = self.pods.get(record.id)
        if pod is None:
            return ExitInfo(record.exit_status or LOST_EXIT_STATUS)
        return await asyncio.shield(pod.exit)

    async def stop(self, record: SandboxRecord, timeout: float) -> None:
        pod = self.pods.get(record.id)
        if pod is None:
            await self._cleanup_by_state(record)
            return
        pod.stopping = True
        if not pod.vm.exited() and pod.agent is not None and not pod.agent.closed:
            try:
                await pod.agent.call(AGENT, "Poweroff", agent.PoweroffRequest(grace_ms=int(timeout * 1000)),
                                     timeout=timeout + POWEROFF_WAIT)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POWEROFF_WAIT):
                        await pod.vm.wait()
            except KuasarError as err:
                log.info("sandbox %s: agent poweroff: %s; stopping QEMU", record.id, err.message)
        await pod.vm.stop(timeout=3.0)
        await self._teardown_helpers(pod)

    async def shutdown(self, record: SandboxRecord) -> None:
        pod = self.pods.pop(record.id, None)
        if pod is not None:
            if not pod.vm.exited():
                pod.stopping = True
                await pod.vm.stop(timeout=0)
            await self._teardown_helpers(pod)
            for task in list(pod.tasks):
                task.cancel()
            await asyncio.gather(*pod.tasks, return_exceptions=True)
        else:
            await self._cleanup_by_state(record)
        await kill_strays(self.vm_root / record.id)  # before the cgroup: a cgroup with processes stays
        state = _vm_state(record)
        # Taken from the record as it is removed: a Shutdown tried again must not count it gone twice,
        # which would let a parent it shares go with a pod that still needs it.
        saved_cgroup = state.pop("cgroup", None)
        if saved_cgroup:
            with contextlib.suppress(OSError):
                cgroups.PodCgroup.from_record(saved_cgroup).remove()
        self._keep_logs(record.id)
        hostfs.remove_tree(self.vm_root / record.id)

    def _keep_logs(self, sandbox_id: str) -> None:
        """With $KUASAR_VMM_KEEP_LOGS set, a removed VM's logs are copied there (post-mortems, tests)."""
        keep = os.environ.get("KUASAR_VMM_KEEP_LOGS")
        vm_dir = self.vm_root / sandbox_id
        if not keep or not vm_dir.is_dir():
            return
        target = Path(keep) / sandbox_id
        target.mkdir(parents=True, exist_ok=True)
        for path in [*vm_dir.glob("*.log"), *vm_dir.glob("*.log.1")]:
            with contextlib.suppress(OSError):
                shutil.copyfile(path, target / path.name)

    async def metrics(self, record: SandboxRecord) -> any_pb2.Any:
        pod = self.pods.get(record.id)
        metrics = v2.Metrics()
        if pod is not None:
            host_metrics(pod, metrics)
            if pod.agent is not None and not pod.agent.closed and not pod.vm.exited():
                with contextlib.suppress(KuasarError):
                    await guest_metrics(pod.agent, metrics)
        return any_pb2.Any(type_url=cgroups.V2_TYPE_URL, value=metrics.SerializeToString())

    async def recover(self, records: list[SandboxRecord]) -> None:
        for record in records:  # whatever their state: each one's Shutdown removes its cgroup
            cgroups.adopt(_vm_state(record).get("cgroup"))
        # All VMs at once: a guest that does not answer costs its agent's connect and Check timeouts
        # (8 s), and the sandboxer serves nothing until recovery is done (a containerd restarting
        # meanwhile takes its pods for unknown).
        await asyncio.gather(*(self._recover_one(record) for record in records))

    async def _recover_one(self, record: SandboxRecord) -> None:
        if record.state != SandboxState.READY or not record.extra.get("vm"):
            return
        try:
            state = record.extra["vm"]
            if not isinstance(state, dict):
                raise TypeError(f"its VM state is a {type(state).__name__}, not an object")
            await self._reattach(record, state)
        except Exception as exc:  # noqa: BLE001 - one record we cannot read must not stop the others
            # (a state an older or newer sandboxer wrote, a file edited by hand): a sandboxer that
            # never starts serves no pod at all, and containerd could not even remove this one.
            log.error("sandbox %s: cannot re-attach to its VM (%r); ending it and reporting it exited",
                      record.id, exc)
            record.found_gone()
            await self._cleanup_by_state(record)

    async def _reattach(self, record: SandboxRecord, state: dict[str, Any]) -> None:
        vm = await self.hypervisor.reattach(state.get("hypervisor") or {})
        if vm is None:
            log.warning("sandbox %s: its VM is gone; reporting it exited", record.id)
            record.found_gone()
            await self._cleanup_by_state(record)
            return
        try:
            await self._adopt(record, state, vm)
        except BaseException:
            await vm.close()  # its QMP connection; the VM itself is ended by the caller
            raise

    async def _adopt(self, record: SandboxRecord, state: dict[str, Any], vm: Vm) -> None:
        net = network.PodNetwork.from_json(state["network"]) if state.get("network") else None
        pod = VmPod(record.id, vm, Path(state["vm_dir"]), state["uds"], state["address"],
                    memory_mb=int(state.get("memory_mb", 0)), network=net)
        if state.get("cgroup"):  # what Shutdown removes
            pod.cgroup = cgroups.PodCgroup.from_record(state["cgroup"])
        pod.proxy = ProcessRef.from_json(state.get("proxy"))
        if pod.proxy is not None and pod.proxy.alive():
            pod.proxy_watch = ExitWatch(pod.proxy)
        else:  # _end_with_proxy ends the VM at once
            pod.proxy = None
        try:
            pod.agent = await hvsock.connect_ttrpc(pod.uds, AGENT_PORT, timeout=3.0)
            await pod.agent.call(AGENT, "Check", agent.CheckRequest(), agent.CheckResponse, timeout=5)
        except KuasarError as err:
            log.warning("sandbox %s: agent not reachable after restart: %s", record.id, err.message)
        self.pods[record.id] = pod
        self._background(pod)
        record.pid, record.address = vm.pid, pod.address
        log.info("sandbox %s: re-attached to VM pid %d", record.id, vm.pid)

    def status_info(self, record: SandboxRecord, verbose: bool) -> dict[str, str]:
        if not verbose:
            return {}
        state = _vm_state(record)
        info = {"task_address": record.address, "hypervisor": self.config.driver, "accel": self.accel}
        for key in ("vcpus", "memory_mb", "vm_dir"):
            if key in state:
                info[key] = str(state[key])
        if "vm_dir" in state:
            info["console_log"] = str(Path(state["vm_dir"]) / "console.log")
        if "boot" in state:
            info["boot"] = str(state["boot"])
        return info

    # -- helpers -----------------------------------------------------------------------------------
    def _background(self, pod: VmPod) -> None:
        pod.background(self._monitor(pod), "monitor")
        pod.background(self._forward_events(pod), "events")
        pod.background(self._clock_loop(pod), "clock")
        pod.background(self._end_with_proxy(pod), "proxy")

    async def _end_with_proxy(self, pod: VmPod) -> None:
        """The task proxy holds containerd's task connections. When it dies, containerd takes every
        container of the pod for exited (255) and deletes it, while in the guest they would run on (and
        kubelet would start a second copy of each beside the first): the VM is ended with it, so the
        pod reads as exited too and kubelet makes it anew, as a runc pod ends with its task server."""
        if pod.proxy_watch is not None:
            await pod.proxy_watch.wait()
        if pod.stopping or pod.vm.exited():
            return
        log.error("sandbox %s: the task proxy exited (see %s); ending the VM, whose containers containerd "
                  "now takes for exited", pod.id, pod.vm_dir / "proxy.log")
        await pod.vm.stop(timeout=0)

    def _state(self, pod: VmPod, spec: VmSpec) -> dict[str, Any]:
        return {"vm_dir": str(pod.vm_dir), "uds": pod.uds, "address": pod.address, "accel": spec.accel,
                "vcpus": spec.vcpus, "memory_mb": spec.memory_mb, "share_fs": spec.share_fs,
                "hypervisor": pod.vm.to_json(), "proxy": pod.proxy.to_json() if pod.proxy else None,
                "network": pod.network.to_json() if pod.network else None,
                "cgroup": pod.cgroup.recorded() if pod.cgroup else None}

    def _place_in_cgroup(self, pod_id: str, pod_config: cri.PodSandboxConfig, vm: Vm) -> cgroups.PodCgroup | None:
        return cgroups.place_in_pod_cgroup(pod_id, pod_config.linux.cgroup_parent, vm.process_pids(), "the VM")

    def _start_proxy(self, pod: VmPod, spec: VmSpec) -> None:
        listen = pod.vm_dir / TASK_SOCKET
        with contextlib.suppress(FileNotFoundError):
            listen.unlink()
        argv = helper_argv("vmm-sandboxer", "task-proxy", "kuasar.vmm.proxy") + [
            "--listen", str(listen), "--uds", pod.uds, "--share", str(spec.share_dir),
            *(["--share-source", str(spec.share_source)] if spec.share_source.is_dir() else []),
            "--guest-share", GUEST_SHARE_DIR, "--sandbox", pod.id, "--sandbox-pid", str(pod.vm.pid),
            "--log-dir", str(pod.vm_dir), "--log-limit", str(self.config.log_file_limit_in_kb << 10),
            "--kill-timeout", str(self.config.guest_kill_timeout),
            "--log-level", self.daemon.log_level]
        if pod.network is not None and pod.network.netns:
            argv += ["--netns", pod.network.netns]
        proc = spawn(argv, pod.vm_dir / "proxy.log", executable=sys.executable, env=owner_env(pod.vm_dir))
        pod.proxy = ProcessRef.of(proc.pid)
        pod.proxy_watch = ExitWatch(pod.proxy, proc)
        if pod.cgroup is not None:
            with contextlib.suppress(OSError):
                pod.cgroup.add(proc.pid)

    async def _wait_proxy(self, pod: VmPod) -> None:
        listen = pod.vm_dir / TASK_SOCKET
        deadline = time.monotonic() + PROXY_START_TIMEOUT
        while not listen.exists():
            if pod.proxy_watch is not None and pod.proxy_watch.done:
                raise RuntimeFailure(f"the task proxy exited; see {pod.vm_dir / 'proxy.log'}")
            if time.monotonic() > deadline:
                raise RuntimeFailure(f"the task proxy did not listen within {PROXY_START_TIMEOUT:g}s")
            await asyncio.sleep(0.01)

    async def _wait_ready(self, listener: hvsock.GuestPortListener, vm: Vm, spec: VmSpec) -> None:
        """The guest's READY (the agent connects to host port 1025); fails early if QEMU dies."""
        ready = asyncio.create_task(listener.accept_line(timeout=self.config.agent_ready_timeout))
        exited = asyncio.create_task(vm.wait())
        try:
            await asyncio.wait([ready, exited], return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also when Start itself is cancelled: an accept still pending on the listener that the
            # caller closes next would leave the loop polling a dead fd, which the next socket reuses.
            for task in (ready, exited):
                if not task.done():
                    task.cancel()
            await asyncio.gather(ready, exited, return_exceptions=True)
        if ready.cancelled():
            status = exited.result() if exited.done() and not exited.cancelled() else None
            raise RuntimeFailure(f"QEMU exited ({_exit_text(status)}) before the guest agent was ready; "
                                 f"guest console:\n{vm_logs.tail(spec.console_log) or '(nothing)'}\n"
                                 f"QEMU said:\n{vm_logs.tail(spec.vm_dir / 'qemu.log') or '(nothing)'}")
        try:
            line = ready.result()
        except KuasarError as err:
            raise RuntimeFailure(f"{err.message}; guest console:\n{vm_logs.tail(spec.console_log)}") from None
        if line.strip() != b"READY":
            raise RuntimeFailure(f"unexpected announcement from the guest: {line[:64]!r}")

    def _setup_request(self, sandbox_id: str, pod: cri.PodSandboxConfig,
                       net: network.PodNetwork | None) -> agent.SetupSandboxRequest:
        host_net = net is None
        hostname = pod.hostname or (socket.gethostname() if host_net else sandbox_id[:12])
        addresses = [a.cidr.split("/")[0] for nic in (net.nics if net else []) for a in nic.addresses]
        request = agent.SetupSandboxRequest(sandbox_id=sandbox_id, hostname=hostname,
                                            hosts=hosts_file(hostname, addresses),
                                            resolv_conf=resolv_conf(pod.dns_config),
                                            sysctls=with_containerd_defaults(pod.linux.sysctls, not host_net))
        if pod.linux.security_context.namespace_options.pid == cri.POD:
            request.pod_pid_namespace_path = GUEST_POD_PID_NS
        for nic in net.nics if net else []:
            request.interfaces.append(agent.Interface(
                name=nic.name, hw_addr=nic.mac, mtu=nic.mtu, raw_flags=nic.flags,
                addresses=[agent.IPAddress(cidr=a.cidr) for a in nic.addresses]))
        for route in net.routes if net else []:
            request.routes.append(agent.Route(dest=route.dest, gateway=route.gateway, device=route.device,
                                              source=route.source, scope=route.scope, family=route.family))
        return request

    async def _sync_clock(self, client: TtrpcClient) -> None:
        sent = time.time_ns()
        reply = await client.call(AGENT, "SyncClock", agent.SyncClockPacket(client_send_time=sent),
                                  agent.SyncClockPacket, timeout=5)
        back = time.time_ns()
        offset = ((reply.client_arrive_time - sent) + (reply.server_send_time - back)) // 2
        if abs(offset) > CLOCK_TOLERANCE_NS:
            await client.call(AGENT, "SyncClock", agent.SyncClockPacket(delta=-offset), agent.SyncClockPacket,
                              timeout=5)
            log.debug("guest clock corrected by %.3f ms", -offset / 1e6)

    async def _clock_loop(self, pod: VmPod) -> None:
        while not pod.vm.exited():
            await asyncio.sleep(CLOCK_SYNC_INTERVAL)
            if pod.agent is not None and not pod.agent.closed:
                with contextlib.suppress(KuasarError):
                    await self._sync_clock(pod.agent)

    async def _forward_events(self, pod: VmPod) -> None:
        """The guest's task events (exit, oom, ...) to containerd's Events/Forward."""
        if not self.events.enabled:
            return
        while not pod.vm.exited():
            try:
                client = await self._agent(pod)
                stream = await client.open_stream(AGENT, "Events", payload=agent.EventsRequest().SerializeToString(),
                                                  client_streaming=False)
                while (message := await stream.recv()) is not None:
                    try:
                        envelope = event_pb2.Envelope.FromString(message)
                        kind, topic = GUEST_EVENTS.get(envelope.event.type_url.rsplit("/", 1)[-1], (None, ""))
                        event = kind.FromString(envelope.event.value) if kind is not None else None
                    except DecodeError as err:  # one bad message must not end the forwarding
                        log.warning("sandbox %s: undecodable event from the guest skipped: %s", pod.id, err)
                        continue
                    if event is not None and self._pods_event(pod, envelope, topic, event.container_id) \
                            and self._within_budget(pod, envelope.topic):
                        self.events.publish(topic, event, envelope.namespace)
            except KuasarError as err:
                log.debug("sandbox %s: event stream ended: %s", pod.id, err.message)
            await asyncio.sleep(1.0)

    @staticmethod
    def _within_budget(pod: VmPod, topic: str) -> bool:
        """A token of the pod's event budget (GUEST_EVENTS_BURST, refilled at GUEST_EVENTS_PER_S)."""
        now = time.monotonic()
        pod.event_budget = min(GUEST_EVENTS_BURST,
                               pod.event_budget + max(0.0, now - pod.event_budget_at) * GUEST_EVENTS_PER_S)
        pod.event_budget_at = now
        if pod.event_budget >= 1:
            pod.event_budget -= 1
            return True
        pod.dropped_events += 1
        if pod.dropped_events <= LOGGED_DROPPED_EVENTS:
            log.warning("sandbox %s: guest event %s dropped: the guest sends more than %d per second",
                        pod.id, topic[:64], GUEST_EVENTS_PER_S)
        return False

    @staticmethod
    def _pods_event(pod: VmPod, envelope: Any, topic: str, container_id: str) -> bool:
        """Whether a guest's event is about one of its pod's containers, in the namespace that container
        was made in: containerd acts on a /tasks/exit or /tasks/oom of any container it names (CRI
        deletes an exited one's task), so a guest must not speak for another pod's."""
        known = pod.containers.get(container_id)
        if known is None and container_id:
            # The task proxy records each container at Create, outside what the guest can write, with
            # the namespace containerd made it in. Kept in memory as well: the record goes at Delete,
            # perhaps before that container's last events arrive.
            try:
                known = (pod.vm_dir / KNOWN_CONTAINERS_DIR / validate_id(container_id, "container id")).read_text()
            except (OSError, UnicodeDecodeError, KuasarError):
                known = None
            else:
                pod.containers[container_id] = known
        if envelope.topic == topic and known is not None and known == envelope.namespace:
            return True
        pod.dropped_events += 1
        if pod.dropped_events <= LOGGED_DROPPED_EVENTS:  # a hostile guest must not fill the host's log
            log.warning("sandbox %s: guest event %s for container %r in namespace %r dropped: not one of this "
                        "pod's%s", pod.id, envelope.topic[:64], container_id[:80], envelope.namespace[:64],
                        " (the last one logged)" if pod.dropped_events == LOGGED_DROPPED_EVENTS else "")
        return False

    async def _agent(self, pod: VmPod) -> TtrpcClient:
        """The guest agent's client, connected again if it was lost (an agent restarted, or not yet
        reachable when the sandboxer re-attached after its own restart)."""
        if pod.agent is None or pod.agent.closed:
            pod.agent = await hvsock.connect_ttrpc(pod.uds, AGENT_PORT, timeout=AGENT_CONNECT_TIMEOUT)
        return pod.agent

    async def _monitor(self, pod: VmPod) -> None:
        status = await pod.vm.wait()
        if status is None:
            status = 0 if pod.stopping else LOST_EXIT_STATUS
        if not pod.stopping:
            log.warning("sandbox %s: VM (QEMU %d) exited unexpectedly with status %d", pod.id, pod.vm.pid, status)
            if status == 0:
                # QEMU's clean exit: the guest powered off or, with -no-reboot, panicked and rebooted. A
                # pod's VM does neither unless asked: its exit is not the success 0 would report.
                status = LOST_EXIT_STATUS
        try:
            await self._teardown_helpers(pod)
        finally:  # a teardown that fails must not keep Wait waiting for an exit already seen
            if not pod.exit.done():
                pod.exit.set_result(ExitInfo(status))

    async def _teardown_helpers(self, pod: VmPod) -> None:
        """What must not outlive the VM: its daemons, the proxy, the tc redirects, the agent client."""
        if pod.agent is not None:
            await pod.agent.close()
        await terminate(pod.proxy, pod.proxy_watch, grace=1.0)
        await pod.vm.stop(timeout=0)
        if pod.network is not None:
            await _undo_netns_setup(pod.network)

    async def _abort_start(self, record: SandboxRecord, pod: VmPod | None, vm: Vm | None,
                           net: network.PodNetwork | None, vm_dir: Path) -> None:
        try:
            if pod is not None:
                pod.stopping = True
                await self._teardown_helpers(pod)
                if pod.cgroup is not None:
                    with contextlib.suppress(OSError):
                        pod.cgroup.remove()
                    # Gone: the Shutdown that follows must not count it gone a second time (a parent it
                    # shares would go with a pod that still needs it).
                    if isinstance(record.extra.get("vm"), dict):
                        record.extra["vm"]["cgroup"] = None
            elif vm is not None:
                await vm.stop(timeout=0)
            if net is not None:
                await _undo_netns_setup(net)
            hostfs.remove_tree(vm_dir)
        except Exception:  # noqa: BLE001 - the start error is what matters
            # The VM's state stays: the removal that follows a failed Start finds by it what is left.
            log.exception("sandbox %s: cleaning up a failed start", record.id)
            return
        record.extra.pop("vm", None)

    async def _cleanup_by_state(self, record: SandboxRecord) -> None:
        """A sandbox whose VM we do not hold (dead before a restart, or a state we cannot read): kill
        leftovers by recorded pid. Each step on its own: a part of the state we cannot read must not keep
        the rest (or Shutdown's removal of the pod's files and cgroup) from happening."""
        state = _vm_state(record)
        if state.get("hypervisor"):
            await _best_effort(record.id, "the VM", lambda: self.hypervisor.cleanup(state["hypervisor"]))
        if state.get("proxy"):
            await _best_effort(record.id, "the task proxy", lambda: _terminate_recorded(state["proxy"]))
        if state.get("network"):
            await _best_effort(record.id, "the pod's network",
                               lambda: _undo_netns_setup(network.PodNetwork.from_json(state["network"])))


async def _best_effort(sandbox_id: str, what: str, step: Callable[[], Awaitable[None]]) -> None:
    try:
        await step()
    except Exception as exc:  # noqa: BLE001 - the caller's other steps still run
        log.error("sandbox %s: ending %s from its saved state: %r", sandbox_id, what, exc)


async def _terminate_recorded(saved: Any) -> None:
    proxy = ProcessRef.from_json(saved)
    if proxy is not None:
        await terminate(proxy, None, grace=0.5)


async def _undo_netns_setup(net: network.PodNetwork) -> None:
    """What we added to the pod's netns (CRI deletes the netns itself): tc redirects, the port-forward rule."""
    await network.remove_redirects(net)
    await portforward.remove_redirect(net.netns)


def host_metrics(pod: VmPod, metrics: v2.Metrics) -> None:
    """CPU and memory of the VM's host processes (QEMU, its daemons, the proxy); tap traffic."""
    pids = pod.vm.process_pids() + ([pod.proxy.pid] if pod.proxy else [])
    user = system = rss = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            times = proc.cpu_times()
            user, system = user + times.user, system + times.system
            rss += proc.memory_info().rss
        except psutil.Error:
            continue
    metrics.cpu.user_usec = int(user * 1e6)
    metrics.cpu.system_usec = int(system * 1e6)
    metrics.cpu.usage_usec = metrics.cpu.user_usec + metrics.cpu.system_usec
    metrics.memory.usage = int(rss)
    metrics.memory.usage_limit = pod.memory_mb * MiB
    if pod.network is not None:
        counters = _netdev(pod.vm.pid)
        for nic in pod.network.nics:
            stats = counters.get(nic.tap)
            if stats:
                # The tap's receive side is what the guest sent.
                metrics.network.append(v2.NetworkStat(name=nic.name, rx_bytes=stats[8], rx_packets=stats[9],
                                                      tx_bytes=stats[0], tx_packets=stats[1], rx_errors=stats[10],
                                                      tx_errors=stats[2], rx_dropped=stats[11], tx_dropped=stats[3]))


def _netdev(pid: int) -> dict[str, list[int]]:
    out = {}
    try:
        lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    except OSError:
        return out
    for line in lines:
        name, _, rest = line.partition(":")
        with contextlib.suppress(ValueError):
            out[name.strip()] = [int(v) for v in rest.split()]
    return out


async def guest_metrics(client: TtrpcClient, metrics: v2.Metrics) -> None:
    """The guest's pod cgroup (`/kuasar`, every container's parent): memory, pids, CPU used inside."""
    base = f"/sys/fs/cgroup{GUEST_CGROUP_PARENT}"
    result = await client.call(AGENT, "ExecVMProcess", agent.ExecVMProcessRequest(
        args=["/bin/busybox", "head", "-n", "100", f"{base}/memory.current", f"{base}/memory.stat",
              f"{base}/pids.current", f"{base}/cpu.stat"], timeout_ms=5000), agent.ExecVMProcessResponse, timeout=10)
    section, values = "", {}
    for line in result.stdout.decode(errors="replace").splitlines():
        if line.startswith("==> "):
            section = line[4:].split(" <==")[0].rsplit("/", 1)[-1]
            continue
        words = line.split()
        if len(words) == 1 and words[0].isdigit():
            values[section] = int(words[0])
        elif len(words) == 2 and words[1].isdigit():
            values[f"{section}:{words[0]}"] = int(words[1])
    metrics.pids.current = values.get("pids.current", 0)
    metrics.memory.anon = values.get("memory.stat:anon", 0)
    metrics.memory.file = values.get("memory.stat:file", 0)
    metrics.memory.inactive_file = values.get("memory.stat:inactive_file", 0)
    metrics.memory.active_file = values.get("memory.stat:active_file", 0)
    metrics.memory.shmem = values.get("memory.stat:shmem", 0)


def _exit_text(status: int | None) -> str:
    """QEMU's exit as said to a person (ExitWatch's shell convention: 128 + n for a death by signal n)."""
    if status is None:
        return "status unknown"
    if status > 128:
        try:
            return f"killed by {signal.Signals(status - 128).name}"
        except ValueError:
            return f"killed by signal {status - 128}"
    # 0 with -no-reboot: the guest shut down, or reset (a triple fault early in boot says nothing)
    return f"status {status}{', the guest shut down or reset' if status == 0 else ''}"


def _vm_state(record: SandboxRecord) -> dict[str, Any]:
    """The record's VM state; none when it is not an object (a record edited by hand, another version's):
    it must not keep recovery, Status or Shutdown from going on."""
    state = record.extra.get("vm")
    return state if isinstance(state, dict) else {}
