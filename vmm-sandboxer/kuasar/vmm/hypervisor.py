"""The hypervisor interface: what vmm-sandboxer needs from a VMM driver, whatever the VMM.

A driver turns a `VmSpec` (what the pod's VM must look like) into a running `Vm` and can re-attach
to one after a restart of the sandboxer. QEMU is the only driver today (`qemu.py`); Cloud
Hypervisor, StratoVirt and Firecracker fit the same shape: each starts its VMM (and whatever vsock
or file-sharing daemons it needs) in the pod's netns, exposes the guest's vsock port 1024 as a
hybrid-vsock unix socket (`VmSpec.uds`; CLH and Firecracker have one built in, QEMU gets it from
vhost-device-vsock) and reports the VMM's pid and exit.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import VmmConfig

SHARE_TAG = "kuasar"
GUEST_SHARE_DIR = "/run/kuasar/state"
AGENT_PORT = 1024
NOTIFY_PORT = 1025
GUEST_CID = 3
# The task proxy's hybrid-vsock socket in the VM's directory: containerd's task address.
TASK_SOCKET = "task.vsock"


@dataclass
class NicDevice:
    id: str
    mac: str
    fd: int  # the tap's descriptor in the sandboxer; the VMM gets it at the same number


@dataclass
class VmSpec:
    sandbox_id: str
    vm_dir: Path
    kernel: str
    initrd: str
    vcpus: int
    memory_mb: int
    accel: str  # "kvm" | "tcg"
    tsc_khz: int
    share_fs: str  # "9p" | "virtio-fs" | "none"
    netns: str = ""
    nics: list[NicDevice] = field(default_factory=list)
    debug: bool = False
    agent_log_level: str = "info"
    cache_9p: str = "mmap"

    @property
    def share_dir(self) -> Path:
        """What the guest is given: a read-only view of `share_source` (hostfs.read_only_view), where the
        rootfs and volume mounts are made."""
        return self.vm_dir / "shared"

    @property
    def share_source(self) -> Path:
        """Where the host makes the shared directory's entries (the guest never sees this path)."""
        return self.vm_dir / "shared.host"

    @property
    def uds(self) -> Path:
        """Hybrid-vsock socket of the guest's vsock device (`CONNECT <port>`)."""
        return self.vm_dir / "vsock.sock"

    @property
    def vhost_socket(self) -> Path:
        return self.vm_dir / "vhost-vsock.sock"

    @property
    def virtiofs_socket(self) -> Path:
        return self.vm_dir / "virtiofs.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.vm_dir / "qmp.sock"

    def socket_paths(self) -> list[Path]:
        """Every unix socket of the VM's directory, the guest-port listeners (`<uds>_<port>`) and the
        task proxy's included: what must fit in sun_path."""
        uds = str(self.uds)
        return [self.uds, self.vhost_socket, self.virtiofs_socket, self.qmp_socket, self.vm_dir / TASK_SOCKET,
                *(Path(f"{uds}_{port}") for port in (AGENT_PORT, NOTIFY_PORT))]

    @property
    def console_log(self) -> Path:
        return self.vm_dir / "console.log"

    def agent_params(self) -> list[str]:
        params = [f"task.notify_port={NOTIFY_PORT}", f"task.log_level={self.agent_log_level}",
                  f"task.sharefs_type={'virtiofs' if self.share_fs == 'virtio-fs' else self.share_fs}"]
        if self.share_fs == "9p":
            params.append(f"task.share_cache={self.cache_9p}")
        if self.debug:
            params.append("task.debug")
        return params


class Vm(abc.ABC):
    """One running VM as its driver sees it."""

    @property
    @abc.abstractmethod
    def pid(self) -> int:
        """The VMM process (what Controller.Start returns: it runs in the pod's netns)."""

    @abc.abstractmethod
    async def wait(self) -> int | None:
        """Block until the VMM exits; its exit status, or None when unknown (re-attached VM)."""

    @abc.abstractmethod
    def exited(self) -> bool: ...

    @abc.abstractmethod
    async def stop(self, timeout: float) -> None:
        """Ask the VMM to quit, kill it after `timeout`, then stop its helper daemons."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Is the VMM's control channel answering?"""

    @abc.abstractmethod
    def process_pids(self) -> list[int]:
        """The VMM and its helper daemons (for host-side metrics)."""

    @abc.abstractmethod
    def to_json(self) -> dict[str, Any]: ...

    async def close(self) -> None:  # noqa: B027 - optional
        """Drop control connections (the VM keeps running)."""


class Hypervisor(abc.ABC):
    name: str = ""

    def __init__(self, config: VmmConfig) -> None:
        self.config = config

    @abc.abstractmethod
    async def check(self) -> list[str]:
        """Verify binaries and features at start-up; returns warnings (raises when unusable)."""

    @abc.abstractmethod
    async def launch(self, spec: VmSpec) -> Vm:
        """Start the VM; returns once the VMM runs (not once the guest is up)."""

    @abc.abstractmethod
    async def reattach(self, state: dict[str, Any]) -> Vm | None:
        """The VM recorded in `state` if it still runs (after a sandboxer restart), else None."""

    async def cleanup(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional
        """Kill whatever of a dead VM's helpers is left (by recorded pid)."""


def make_hypervisor(config: VmmConfig) -> Hypervisor:
    if config.driver == "qemu":
        from .qemu import QemuHypervisor

        return QemuHypervisor(config)
    raise ValueError(f"unknown hypervisor driver {config.driver!r}")
