"""QEMU driver: command line from the configuration, vhost-device-vsock for the guest's vsock, QMP
(through the `qemu.qmp` library) for control.

Launch (see the micro-VM reference, section 12): start `vhost-device-vsock` and wait for its
vhost-user socket; start QEMU in the pod's netns (`nsenter --net=<netns>` execs QEMU, so the pid we
get is QEMU's) with the taps' descriptors; connect QMP. QEMU stays our child (no -daemonize) so its
exit status is known; it and its helpers run in sessions of their own and outlive a sandboxer restart,
after which `reattach` finds them again by pid + start time and reconnects QMP.

Devices: guest memory is a shared memfd (vhost-user needs it), vsock is `vhost-user-vsock-*`, the
shared directory is 9p served by QEMU itself (`multidevs=remap`: the share holds other mounts) or
virtio-fs through virtiofsd, NICs are `virtio-net-*` on the taps. microvm uses the virtio-mmio
variants (`-device`), pc/q35 the PCI ones. microvm under TCG needs `tsc_early_khz` on the kernel
command line (the kernel cannot calibrate its TSC there and hangs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import time
from typing import Any

from qemu.qmp import QMPClient

from kuasar.common.errors import FailedPrecondition, RuntimeFailure
from kuasar.common.strays import owner_env

from .config import VmmConfig, find_program, machine_option
from .hypervisor import GUEST_CID, SHARE_TAG, Hypervisor, Vm, VmSpec
from .procs import ExitWatch, ProcessRef, cmdline, spawn, terminate

log = logging.getLogger(__name__)
logging.getLogger("qemu.qmp").setLevel(logging.WARNING)

SOCKET_WAIT = 10.0
QMP_CONNECT_TIMEOUT = 10.0
QMP_CALL_TIMEOUT = 5.0


def _devices(machine: str) -> dict[str, str]:
    mmio = machine == "microvm"
    suffix = "device" if mmio else "pci"
    return {"vsock": f"vhost-user-vsock-{suffix}", "9p": f"virtio-9p-{suffix}", "fs": f"vhost-user-fs-{suffix}",
            "net": f"virtio-net-{suffix}"}


def kernel_cmdline(config: VmmConfig, spec: VmSpec) -> str:
    params = ["console=ttyS0", "quiet", "panic=-1", "cryptomgr.notests"]
    if config.machine_type == "microvm" or spec.accel == "tcg":
        params.append(f"tsc_early_khz={spec.tsc_khz}")
    params += spec.agent_params()
    if config.kernel_params:
        params += config.kernel_params.split()
    return " ".join(params)


def qemu_command(config: VmmConfig, spec: VmSpec, qemu: str) -> list[str]:
    """QEMU's argv for `spec` (pure: unit-tested)."""
    dev = _devices(config.machine_type)
    mem = f"{spec.memory_mb}M"
    machine = f"{machine_option(config.machine_type)},memory-backend=mem"
    if config.machine_accelerators:
        machine += f",{config.machine_accelerators}"
    cpu = config.cpu_model or ("host" if spec.accel == "kvm" else "max")
    if config.cpu_features:
        cpu += f",{config.cpu_features}"
    accel = f"tcg,thread={config.tcg_thread}" if spec.accel == "tcg" else spec.accel
    argv = [qemu, "-name", f"sandbox-{spec.sandbox_id},debug-threads=on",
            "-machine", machine, "-accel", accel, "-cpu", cpu,
            "-smp", str(spec.vcpus), "-m", mem,
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-no-reboot", "-no-user-config", "-nodefaults", "-display", "none",
            # append=on: the task proxy empties the file when it rotates it (vm_logs.py)
            "-chardev", f"file,id=console,path={spec.console_log},append=on", "-serial", "chardev:console",
            "-qmp", f"unix:{spec.qmp_socket},server=on,wait=off"]
    if config.seccomp_sandbox:
        argv += ["-sandbox", config.seccomp_sandbox]
    if config.firmware_path:
        argv += ["-bios", config.firmware_path]
    argv += ["-chardev", f"socket,id=vsock,path={spec.vhost_socket}",
             "-device", f"{dev['vsock']},chardev=vsock"]
    if spec.share_fs == "9p":
        fsdev = f"local,id=share,path={spec.share_dir},security_model=none"
        if config.virtio_9p_multidevs:
            fsdev += f",multidevs={config.virtio_9p_multidevs}"
        argv += ["-fsdev", fsdev, "-device", f"{dev['9p']},fsdev=share,mount_tag={SHARE_TAG}"]
    elif spec.share_fs == "virtio-fs":
        argv += ["-chardev", f"socket,id=fs,path={spec.virtiofs_socket}",
                 "-device", f"{dev['fs']},chardev=fs,tag={SHARE_TAG}"]
    for nic in spec.nics:
        argv += ["-netdev", f"tap,id={nic.id},fd={nic.fd},vhost=off",
                 "-device", f"{dev['net']},netdev={nic.id},mac={nic.mac}"]
    argv += ["-kernel", spec.kernel, "-initrd", spec.initrd, "-append", kernel_cmdline(config, spec)]
    return argv


def vhost_vsock_command(binary: str, spec: VmSpec) -> list[str]:
    return [binary, "--vm", f"guest-cid={GUEST_CID},socket={spec.vhost_socket},uds-path={spec.uds}"]


def virtiofsd_command(binary: str, config: VmmConfig, spec: VmSpec) -> list[str]:
    # --sandbox=none: it stays in the host's mount namespace and so sees the rootfs and volume
    # mounts made in the shared directory after it started.
    argv = [binary, "--shared-dir", str(spec.share_dir), "--socket-path", str(spec.virtiofs_socket),
            f"--cache={config.virtiofsd.cache}", "--sandbox=none"]
    if config.virtiofsd.thread_pool_size:
        argv.append(f"--thread-pool-size={config.virtiofsd.thread_pool_size}")
    return argv


async def _wait_for_socket(path: os.PathLike[str], watch: ExitWatch, what: str, log_path: os.PathLike[str]) -> None:
    deadline = time.monotonic() + SOCKET_WAIT
    while not os.path.exists(path):
        if watch.done:
            raise RuntimeFailure(f"{what} exited before creating {path}: {_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeFailure(f"{what} did not create {path} within {SOCKET_WAIT:g}s: {_tail(log_path)}")
        await asyncio.sleep(0.005)


def _tail(path: os.PathLike[str], limit: int = 600) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - limit))
            return f.read().decode(errors="replace").strip() or "(no output)"
    except OSError:
        return "(no log)"


class QemuVm(Vm):
    def __init__(self, spec_dir: str, qemu: ProcessRef, qemu_watch: ExitWatch,
                 helpers: dict[str, tuple[ProcessRef, ExitWatch | None]], qmp_socket: str) -> None:
        self.vm_dir = spec_dir
        self.qemu = qemu
        self.qemu_watch = qemu_watch
        self.helpers = helpers
        self.qmp_socket = qmp_socket
        self.qmp: QMPClient | None = None

    @property
    def pid(self) -> int:
        return self.qemu.pid

    def exited(self) -> bool:
        return self.qemu_watch.done

    async def wait(self) -> int | None:
        return await self.qemu_watch.wait()

    async def connect_qmp(self, timeout: float = QMP_CONNECT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline and not self.exited():
            if not os.path.exists(self.qmp_socket):
                await asyncio.sleep(0.01)
                continue
            client = QMPClient(f"sandbox-{os.path.basename(self.vm_dir)[:12]}")
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.1)):
                    await client.connect(self.qmp_socket)
                self.qmp = client
                return
            except Exception as err:  # noqa: BLE001 - socket not there yet, QEMU starting
                last = err
                with contextlib.suppress(Exception):
                    await client.disconnect()
                await asyncio.sleep(0.02)
        raise RuntimeFailure(f"QMP {self.qmp_socket}: not connected within {timeout:g}s ({last})")

    async def qmp_execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if self.qmp is None:
            raise RuntimeFailure("no QMP connection")
        async with asyncio.timeout(QMP_CALL_TIMEOUT):
            return await self.qmp.execute(command, arguments)

    async def ping(self) -> bool:
        try:
            status = await self.qmp_execute("query-status")
        except Exception:  # noqa: BLE001
            return False
        return isinstance(status, dict) and status.get("status") == "running"

    async def stop(self, timeout: float) -> None:
        if not self.exited():
            with contextlib.suppress(Exception):
                await self.qmp_execute("quit")
            with contextlib.suppress(TimeoutError):
                await self.qemu_watch.wait(max(timeout, 0.5))
            if not self.exited():
                log.warning("QEMU %d still running after quit; killing it", self.qemu.pid)
                await terminate(self.qemu, self.qemu_watch, grace=0)
        await self.stop_helpers()
        await self.close()

    async def stop_helpers(self) -> None:
        for name, (ref, watch) in self.helpers.items():
            await terminate(ref, watch, grace=1.0)
            log.debug("%s %d stopped", name, ref.pid)

    def process_pids(self) -> list[int]:
        return [self.qemu.pid] + [ref.pid for ref, _ in self.helpers.values()]

    def to_json(self) -> dict[str, Any]:
        return {"driver": "qemu", "vm_dir": self.vm_dir, "qmp_socket": self.qmp_socket,
                "qemu": self.qemu.to_json(), "helpers": {k: ref.to_json() for k, (ref, _) in self.helpers.items()}}

    async def close(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            self.qmp = None


class QemuHypervisor(Hypervisor):
    name = "qemu"

    def __init__(self, config: VmmConfig) -> None:
        super().__init__(config)
        self.qemu = ""
        self.vhost_vsock = ""
        self.virtiofsd = ""

    async def check(self) -> list[str]:
        warnings = []
        qemu = find_program(self.config.qemu_path)
        if qemu is None:
            raise FailedPrecondition(f"QEMU {self.config.qemu_path!r} not found (install qemu-system-x86)")
        vhost = find_program(self.config.vhost_vsock_path)
        if vhost is None:
            raise FailedPrecondition(f"{self.config.vhost_vsock_path!r} not found (`make setup` installs "
                                     "vhost-device-vsock into .prefix/bin)")
        self.qemu, self.vhost_vsock = qemu, vhost
        for what, path in (("kernel_path", self.config.kernel_path), ("initrd_path", self.config.initrd_path)):
            if not os.path.isfile(path):
                raise FailedPrecondition(f"[hypervisor] {what} {path!r} does not exist (build the guest image "
                                         "with `make guest-image`)")
        if self.config.share_fs == "virtio-fs":
            reason = await self._virtiofsd_problem()
            if reason:
                warnings.append(f"virtio-fs unavailable ({reason}); sharing with 9p instead")
                self.config.share_fs = "9p"
        return warnings

    async def _virtiofsd_problem(self) -> str:
        binary = find_program(self.config.virtiofsd.path)
        if binary is None:
            return f"{self.config.virtiofsd.path!r} not found"
        try:
            result = await asyncio.to_thread(subprocess.run, [binary, "--version"], capture_output=True,
                                             timeout=10, check=False)
        except (OSError, subprocess.SubprocessError) as err:
            return str(err)
        if result.returncode != 0:
            return (result.stderr or result.stdout).decode(errors="replace").strip()[:200] or "fails to run"
        self.virtiofsd = binary
        return ""

    async def launch(self, spec: VmSpec) -> Vm:
        helpers: dict[str, tuple[ProcessRef, ExitWatch | None]] = {}
        started: list[tuple[ProcessRef, ExitWatch]] = []
        try:
            for stale in (spec.uds, spec.vhost_socket, spec.qmp_socket, spec.virtiofs_socket):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stale)
            vhost_log = spec.vm_dir / "vhost-device-vsock.log"
            proc = spawn(vhost_vsock_command(self.vhost_vsock, spec), vhost_log, env=owner_env(spec.vm_dir))
            ref = ProcessRef.of(proc.pid)
            watch = ExitWatch(ref, proc)
            started.append((ref, watch))
            helpers["vhost-device-vsock"] = (ref, watch)
            await _wait_for_socket(spec.vhost_socket, watch, "vhost-device-vsock", vhost_log)
            if spec.share_fs == "virtio-fs":
                fs_log = spec.vm_dir / "virtiofsd.log"
                proc = spawn(virtiofsd_command(self.virtiofsd, self.config, spec), fs_log, env=owner_env(spec.vm_dir))
                ref = ProcessRef.of(proc.pid)
                watch = ExitWatch(ref, proc)
                started.append((ref, watch))
                helpers["virtiofsd"] = (ref, watch)
                await _wait_for_socket(spec.virtiofs_socket, watch, "virtiofsd", fs_log)
            argv = qemu_command(self.config, spec, self.qemu)
            if spec.netns:
                argv = ["nsenter", f"--net={spec.netns}", "--", *argv]
            qemu_log = spec.vm_dir / "qemu.log"
            log.debug("sandbox %s: %s", spec.sandbox_id, " ".join(argv))
            proc = spawn(argv, qemu_log, pass_fds=[n.fd for n in spec.nics], env=owner_env(spec.vm_dir))
            qemu_ref = ProcessRef.of(proc.pid)
            qemu_watch = ExitWatch(qemu_ref, proc)
            started.append((qemu_ref, qemu_watch))
            vm = QemuVm(str(spec.vm_dir), qemu_ref, qemu_watch, helpers, str(spec.qmp_socket))
            try:
                await vm.connect_qmp()
            except RuntimeFailure as err:
                raise RuntimeFailure(f"{err.message}; QEMU said: {_tail(qemu_log)}") from None
            return vm
        except BaseException:
            for ref, watch in reversed(started):
                await terminate(ref, watch, grace=0)
            raise

    async def reattach(self, state: dict[str, Any]) -> Vm | None:
        qemu = ProcessRef.from_json(state.get("qemu"))
        if qemu is None or not qemu.alive() or not any("qemu" in a for a in cmdline(qemu.pid)[:1]):
            return None
        helpers: dict[str, tuple[ProcessRef, ExitWatch | None]] = {}
        for name, data in (state.get("helpers") or {}).items():
            ref = ProcessRef.from_json(data)
            if ref is not None and ref.alive():
                helpers[name] = (ref, ExitWatch(ref))
        vm = QemuVm(state.get("vm_dir", ""), qemu, ExitWatch(qemu), helpers, state.get("qmp_socket", ""))
        try:
            await vm.connect_qmp(timeout=3.0)
        except RuntimeFailure as err:
            log.warning("re-attached QEMU %d without QMP: %s", qemu.pid, err.message)
        return vm

    async def cleanup(self, state: dict[str, Any]) -> None:
        refs = [ProcessRef.from_json(state.get("qemu"))]
        refs += [ProcessRef.from_json(d) for d in (state.get("helpers") or {}).values()]
        for ref in refs:
            if ref is not None and ref.alive():
                await terminate(ref, None, grace=0)
