"""Host side: boot the guest image in a QEMU micro-VM (TCG) with vhost-device-vsock, wait for the
agent's READY, and talk to it over hybrid vsock. Used by the integration tests and `vm-agent boot`.

Sequence (see the micro-VM reference): start vhost-device-vsock, wait for its vhost-user socket,
listen on `<uds>_<notify port>`, start QEMU, accept the agent's READY connection, then connect
to port 1024 once (never a CONNECT polling loop, which can wedge vhost-device-vsock 0.3.0).
Teardown kills QEMU (if a poweroff did not end it) and the daemon by pid and removes the sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from kuasar.common import hvsock
from kuasar.common.errors import DeadlineExceeded
from kuasar.common.ttrpc import TtrpcClient

AGENT_PORT = 1024
NOTIFY_PORT = 1025
DEBUG_PORT = 1025
GUEST_CID = 3
SHARE_TAG = "kuasar"


def tsc_khz() -> int:
    """The host TSC rate in kHz (`tsc_early_khz`, mandatory on microvm under TCG)."""
    override = os.environ.get("KUASAR_TSC_KHZ")
    if override:
        return int(override)
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    raise RuntimeError("no 'cpu MHz' in /proc/cpuinfo; set KUASAR_TSC_KHZ")




@dataclass
class VmConfig:
    kernel: Path
    initrd: Path
    workdir: Path  # sockets and the console log
    share_dir: Path | None = None
    memory_mb: int = 512
    cpus: int = 1
    debug_console: bool = False
    log_level: str = "info"
    extra_cmdline: list[str] = field(default_factory=list)
    nics: list[str] = field(default_factory=list)  # MAC addresses of virtio-net NICs (QEMU user networking)
    qemu: str = "qemu-system-x86_64"
    vhost_vsock: str = "vhost-device-vsock"

    @property
    def uds(self) -> Path:
        return self.workdir / "vsock.sock"

    @property
    def vhost_socket(self) -> Path:
        return self.workdir / "vhost-vsock.sock"

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    def cmdline(self) -> str:
        args = ["console=ttyS0", "quiet", "panic=-1", f"tsc_early_khz={tsc_khz()}", "cryptomgr.notests",
                f"task.notify_port={NOTIFY_PORT}", f"task.log_level={self.log_level}"]
        if self.share_dir is None:
            args.append("task.sharefs_type=none")
        if self.debug_console:
            args.append("task.debug")
        return " ".join(args + self.extra_cmdline)

    def qemu_argv(self) -> list[str]:
        mem = f"{self.memory_mb}M"
        # Single-threaded TCG, as vmm-sandboxer's default `tcg_thread`: multi-threaded TCG soft-locks SMP guests.
        # No 8254 PIT, as vmm-sandboxer's microvm (its MICROVM_OPTIONS): under QEMU 10's TCG a guest that has
        # one died early in boot in 2 of 3 boots; tsc_early_khz makes it needless.
        argv = [self.qemu, "-M", "microvm,pit=off,memory-backend=mem", "-accel", "tcg,thread=single", "-cpu", "max",
                "-smp", str(self.cpus), "-m", mem,
                "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
                "-no-reboot", "-no-user-config", "-nodefaults", "-display", "none", "-serial", "stdio",
                "-chardev", f"socket,id=vus,path={self.vhost_socket}",
                "-device", "vhost-user-vsock-device,chardev=vus"]
        if self.share_dir is not None:
            argv += ["-fsdev", f"local,id=fs0,path={self.share_dir},security_model=none",
                     "-device", f"virtio-9p-device,fsdev=fs0,mount_tag={SHARE_TAG}"]
        for i, mac in enumerate(self.nics):
            argv += ["-netdev", f"user,id=net{i}", "-device", f"virtio-net-device,netdev=net{i},mac={mac}"]
        argv += ["-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", self.cmdline()]
        return argv


@dataclass
class BootTimes:
    spawned: float = 0.0  # time.monotonic() when QEMU was spawned
    ready: float = 0.0  # READY received
    connected: float = 0.0  # ttrpc connection to the agent up

    @property
    def to_ready(self) -> float:
        return self.ready - self.spawned


class MicroVm:
    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.qemu: subprocess.Popen | None = None
        self.daemon: subprocess.Popen | None = None
        self.listener: hvsock.GuestPortListener | None = None
        self.times = BootTimes()
        self._console = None

    async def start(self, ready_timeout: float = 60.0) -> None:
        cfg = self.config
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        for path in (cfg.uds, cfg.vhost_socket, Path(hvsock.guest_port_path(str(cfg.uds), NOTIFY_PORT))):
            path.unlink(missing_ok=True)
        try:
            daemon_log = open(cfg.workdir / "vhost-device-vsock.log", "wb")  # noqa: SIM115
            with daemon_log:
                self.daemon = subprocess.Popen(
                    [cfg.vhost_vsock, "--vm", f"guest-cid={GUEST_CID},socket={cfg.vhost_socket},uds-path={cfg.uds}"],
                    stdin=subprocess.DEVNULL, stdout=daemon_log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 10
            while not cfg.vhost_socket.exists():
                if self.daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"vhost-device-vsock did not create {cfg.vhost_socket} "
                                       f"(see {cfg.workdir / 'vhost-device-vsock.log'})")
                await asyncio.sleep(0.005)
            self.listener = hvsock.GuestPortListener(str(cfg.uds), NOTIFY_PORT)
            self._console = open(cfg.console_log, "wb")  # noqa: SIM115
            self.times.spawned = time.monotonic()
            self.qemu = subprocess.Popen(cfg.qemu_argv(), stdin=subprocess.DEVNULL, stdout=self._console,
                                         stderr=subprocess.STDOUT)
            ready = asyncio.create_task(self.listener.accept_line(timeout=ready_timeout))
            while not ready.done():
                await asyncio.wait([ready], timeout=0.1)
                if not ready.done() and self.qemu.poll() is not None:
                    ready.cancel()
                    raise RuntimeError(f"QEMU exited ({self.qemu.returncode}) before the agent was ready:\n"
                                       + self.console_tail())
            try:
                line = ready.result()
            except DeadlineExceeded:
                raise RuntimeError(f"agent not ready within {ready_timeout:g}s:\n{self.console_tail()}") from None
            if line.strip() != b"READY":
                raise RuntimeError(f"unexpected announcement {line!r}")
            self.times.ready = time.monotonic()
        except BaseException:
            await self.stop()
            raise

    async def connect(self, port: int = AGENT_PORT, timeout: float = 5.0) -> TtrpcClient:  # noqa: ASYNC109
        client = await hvsock.connect_ttrpc(str(self.config.uds), port, timeout=timeout)
        if not self.times.connected:
            self.times.connected = time.monotonic()
        return client

    def console_tail(self, lines: int = 60) -> str:
        try:
            text = self.config.console_log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def wait_exit(self, timeout: float) -> int | None:  # noqa: ASYNC109
        """QEMU's exit status once it exits by itself (guest poweroff), None on timeout."""
        if self.qemu is None:
            return None
        deadline = time.monotonic() + timeout
        while self.qemu.poll() is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.05)
        return self.qemu.returncode

    async def stop(self) -> None:
        """Kill whatever still runs (by pid) and remove the sockets. Idempotent."""
        for proc in (self.qemu, self.daemon):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in (self.qemu, self.daemon):
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self._console is not None:
            self._console.close()
            self._console = None
        cfg = self.config
        for path in (cfg.uds, cfg.vhost_socket):
            path.unlink(missing_ok=True)
        for stale in cfg.workdir.glob(f"{cfg.uds.name}_*"):
            stale.unlink(missing_ok=True)
