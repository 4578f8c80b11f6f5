"""vmm-sandboxer configuration: the `[hypervisor]` table of `--config`, keys after Kuasar's
`config_qemu_x86_64.toml` where they make sense, plus what a TCG-only host needs (accel, tsc_khz).

```toml
[hypervisor]
driver = "qemu"                        # the only driver so far (clh, stratovirt, firecracker: later)
qemu_path = "qemu-system-x86_64"
vhost_vsock_path = "vhost-device-vsock"
kernel_path = "/var/lib/kuasar/vmlinux"
initrd_path = "/var/lib/kuasar/initramfs.cpio"
machine_type = "microvm"               # microvm | pc | q35
machine_accelerators = ""              # extra -machine options, e.g. "kernel_irqchip=on"
accel = "auto"                         # auto (KVM when a probe boot works, else TCG) | kvm | tcg
tcg_thread = "single"                  # TCG only: single | multi (one host thread per vCPU)
cpu_model = ""                         # "" = host under KVM, max under TCG
cpu_features = ""                      # appended to -cpu
vcpus = 1                              # default vCPUs of a pod VM
default_max_vcpus = 2                  # upper bound for vCPUs from pod resources/annotations
memory_in_mb = 512                     # default guest memory
...
```

See README for the full list. Unknown keys are reported, Kuasar keys that only make sense for its
own images (mem_slots, default_bridges, ...) are accepted and ignored, and settings this driver
cannot honour (image_path, hugepages, use_vsock = false) are refused instead of silently ignored.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from kuasar.common.errors import InvalidArgument
from kuasar.common.tools import find_tool as find_program  # noqa: F401 - qemu.py, tests, benchmarks

log = logging.getLogger(__name__)

SECTION = "hypervisor"
DRIVERS = ("qemu",)
MACHINE_TYPES = ("microvm", "pc", "q35")
# microvm's legacy 8254 timer, which its guests never need (the kernel is given its TSC frequency,
# tsc_early_khz, and ticks on the LAPIC timer): under Debian 13's QEMU 10 TCG, a guest calibrating
# against it died of a divide error early in start_kernel in 2 of 3 boots (QEMU 7.2: never).
MICROVM_OPTIONS = "pit=off"
ACCELS = ("auto", "kvm", "tcg")
# A VM log's rotation size at most: the task proxy, in the pod's cgroup, holds one log's kept part in
# memory while it rotates.
LOG_FILE_LIMIT_MAX_KB = 64 << 10
TCG_THREADS = ("single", "multi")
# Kuasar spells the share types Virtio9P / VirtioFS; accept both spellings.
SHARE_FS = {"9p": "9p", "virtio9p": "9p", "virtio-9p": "9p", "virtiofs": "virtio-fs", "virtio-fs": "virtio-fs",
            "none": "none"}
# Kuasar keys that describe its own images and device model; accepted so its files load, ignored.
IGNORED_KUASAR_KEYS = {"default_bridges", "entropy_source", "mem_slots", "mem_offset", "memory_path",
                       "file_backend_mem_path", "mem_prealloc", "enable_swap", "virtio_9p_direct_io",
                       "enable_iothreads", "block_device_driver", "disable_nvdimm",
                       "msize_9p"}  # the agent mounts 9p with msize=524288


@dataclass
class VirtiofsdConfig:
    path: str = "virtiofsd"
    cache: str = "always"
    thread_pool_size: int = 0


@dataclass
class VmmConfig:
    driver: str = "qemu"
    qemu_path: str = "qemu-system-x86_64"
    vhost_vsock_path: str = "vhost-device-vsock"
    kernel_path: str = "/var/lib/kuasar/vmlinux"
    initrd_path: str = "/var/lib/kuasar/initramfs.cpio"
    firmware_path: str = ""
    machine_type: str = "microvm"
    machine_accelerators: str = ""
    accel: str = "auto"
    # Multi-threaded TCG locks up an SMP guest now and then: both vCPUs soft-lock in the kernel (seen
    # in a 2-vCPU pod's first `runc create`, and in 4 of 6 VMs flipping a static key a few thousand
    # times in a loop), which single-threaded TCG did not do in 12,000 flips. An SMP guest then shares
    # one host thread.
    tcg_thread: str = "single"
    cpu_model: str = ""
    cpu_features: str = ""
    vcpus: int = 1
    default_max_vcpus: int = 2
    memory_in_mb: int = 512
    min_memory_in_mb: int = 256
    max_memory_in_mb: int = 4096
    # Added to a pod's memory limit: the guest kernel, the agent and runc need their share.
    memory_overhead_in_mb: int = 192
    kernel_params: str = ""
    # QEMU's seccomp filter (`-sandbox`, Kata's `seccompsandbox`); "" turns it off.
    seccomp_sandbox: str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    share_fs: str = "9p"
    # The guest's 9p cache mode. Not `loose`: the share's mounts come and go (a container's rootfs
    # overlay), a new overlay can get the device number of a removed one, and a guest caching
    # inodes by qid would then reuse a dead one (ENOENT on exec). `mmap` drops unused inodes.
    cache_9p: str = "mmap"
    virtio_9p_multidevs: str = "remap"
    # Host TSC rate for microvm's tsc_early_khz (0: read it from the host).
    tsc_khz: int = 0
    # Seconds: guest READY after QEMU started; the time-bounded KVM probe boot.
    agent_ready_timeout: float = 90.0
    # Seconds the guest has to answer a container's SIGKILL before the VM is ended (task proxy): a pod's
    # stop kills its containers first, and waited on a wedged guest at every retry. Well below
    # kubelet's 2 min runtime request timeout.
    guest_kill_timeout: float = 30.0
    kvm_probe_timeout: float = 10.0
    # kvm_pvm (this kind of nested host) only runs PVM guest kernels; set when kernel_path is one.
    kernel_is_pvm_guest: bool = False
    use_vsock: bool = True
    hugepages: bool = False
    enable_vhost_user_store: bool = False
    image_path: str = ""
    # Each VM log's rotation size (vm_logs.py); 0: never rotated. 1 MiB of the console holds a boot's
    # worth of kernel messages with a failing agent's last words after them.
    log_file_limit_in_kb: int = 1024
    # [hypervisor.task]: the guest agent.
    task_debug: bool = False
    task_log_level: str = "info"
    virtiofsd: VirtiofsdConfig = field(default_factory=VirtiofsdConfig)

    def validate(self) -> None:
        if self.driver not in DRIVERS:
            raise InvalidArgument(f"[hypervisor] driver {self.driver!r}: only {', '.join(DRIVERS)} is implemented")
        if self.machine_type not in MACHINE_TYPES:
            raise InvalidArgument(f"[hypervisor] machine_type {self.machine_type!r}: expected one of "
                                  f"{', '.join(MACHINE_TYPES)}")
        if self.accel not in ACCELS:
            raise InvalidArgument(f"[hypervisor] accel {self.accel!r}: expected one of {', '.join(ACCELS)}")
        if self.tcg_thread not in TCG_THREADS:
            raise InvalidArgument(f"[hypervisor] tcg_thread {self.tcg_thread!r}: expected one of "
                                  f"{', '.join(TCG_THREADS)}")
        if not self.use_vsock:
            raise InvalidArgument("[hypervisor] use_vsock = false is not supported: the agent is reached over "
                                  "(hybrid) vsock only")
        if self.image_path:
            raise InvalidArgument("[hypervisor] image_path (a root disk image) is not supported; the guest "
                                  "boots from initrd_path")
        if self.hugepages or self.enable_vhost_user_store:
            raise InvalidArgument("[hypervisor] hugepages / enable_vhost_user_store are not supported")
        if not 1 <= self.vcpus <= max(self.default_max_vcpus, 1):
            raise InvalidArgument(f"[hypervisor] vcpus = {self.vcpus} must be within 1..default_max_vcpus "
                                  f"({self.default_max_vcpus})")
        if not 64 <= self.min_memory_in_mb <= self.memory_in_mb <= self.max_memory_in_mb:
            raise InvalidArgument("[hypervisor] need 64 <= min_memory_in_mb <= memory_in_mb <= max_memory_in_mb")
        if self.cache_9p not in ("none", "mmap", "loose", "fscache", "readahead"):
            raise InvalidArgument(f"[hypervisor] cache_9p {self.cache_9p!r}")
        if self.virtio_9p_multidevs not in ("", "remap", "forbid", "warn"):
            raise InvalidArgument(f"[hypervisor] virtio_9p_multidevs {self.virtio_9p_multidevs!r}")
        if self.task_log_level not in ("debug", "info", "warning", "error"):
            raise InvalidArgument(f"[hypervisor.task] log_level {self.task_log_level!r}")
        if self.log_file_limit_in_kb > LOG_FILE_LIMIT_MAX_KB:
            raise InvalidArgument(f"[hypervisor] log_file_limit_in_kb = {self.log_file_limit_in_kb}: at most "
                                  f"{LOG_FILE_LIMIT_MAX_KB} (the task proxy holds up to that much while it rotates)")
        for key in ("kernel_params", "cpu_features", "machine_accelerators", "seccomp_sandbox"):
            if any(c in getattr(self, key) for c in "\n\0"):
                raise InvalidArgument(f"[hypervisor] {key} must be one line")


def machine_option(machine_type: str) -> str:
    """`-machine`'s value for a machine type, before any memory backend or user options."""
    return f"{machine_type},{MICROVM_OPTIONS}" if machine_type == "microvm" else machine_type


def parse_config(section: dict[str, Any]) -> VmmConfig:
    """Build a VmmConfig from the `[hypervisor]` table (problems raise InvalidArgument)."""
    config = VmmConfig()
    types = {f.name: f.type for f in fields(VmmConfig)}
    for key, value in section.items():
        if key == "task":
            _apply_task(config, value)
            continue
        if key == "virtiofsd":
            _apply_virtiofsd(config, value)
            continue
        if key == "share_fs":
            normal = SHARE_FS.get(str(value).lower())
            if normal is None:
                raise InvalidArgument(f"[hypervisor] share_fs {value!r}: expected 9p (Virtio9P), virtio-fs "
                                      "(VirtioFS) or none")
            config.share_fs = normal
            continue
        if key in IGNORED_KUASAR_KEYS:
            log.info("[hypervisor] %s is a Kuasar setting this driver does not use; ignored", key)
            continue
        if key not in types or key in ("virtiofsd", "task_debug", "task_log_level"):
            raise InvalidArgument(f"[hypervisor] unknown key {key!r}")
        setattr(config, key, _coerce(key, types[key], value))
    if section.get("default_max_vcpus") == 0:  # Kuasar's "no limit"
        config.default_max_vcpus = max(os.cpu_count() or 1, config.vcpus)
    config.validate()
    return config


def _coerce(key: str, kind: Any, value: Any) -> Any:
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidArgument(f"[hypervisor] {key} must be true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(f"[hypervisor] {key} must be a non-negative integer")
        return value
    if kind == "float":
        # nan passes `<= 0`, and asyncio.timeout(nan) fires at once: every VM start failed
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
            raise InvalidArgument(f"[hypervisor] {key} must be a positive number")
        return float(value)
    if not isinstance(value, str):
        raise InvalidArgument(f"[hypervisor] {key} must be a string")
    return value


def _apply_task(config: VmmConfig, table: Any) -> None:
    if not isinstance(table, dict):
        raise InvalidArgument("[hypervisor.task] must be a table")
    for key, value in table.items():
        if key == "debug":
            config.task_debug = _coerce("task.debug", "bool", value)
        elif key == "log_level":
            config.task_log_level = _coerce("task.log_level", "str", value)
        elif key == "enable_tracing":
            log.info("[hypervisor.task] enable_tracing is not supported; ignored")
        else:
            raise InvalidArgument(f"[hypervisor.task] unknown key {key!r}")


def _apply_virtiofsd(config: VmmConfig, table: Any) -> None:
    if not isinstance(table, dict):
        raise InvalidArgument("[hypervisor.virtiofsd] must be a table")
    for key, value in table.items():
        if key == "path":
            config.virtiofsd.path = _coerce("virtiofsd.path", "str", value)
        elif key == "cache":
            config.virtiofsd.cache = _coerce("virtiofsd.cache", "str", value)
        elif key == "thread_pool_size":
            config.virtiofsd.thread_pool_size = _coerce("virtiofsd.thread_pool_size", "int", value)
        elif key in ("log_level", "syslog"):
            continue
        else:
            raise InvalidArgument(f"[hypervisor.virtiofsd] unknown key {key!r}")


