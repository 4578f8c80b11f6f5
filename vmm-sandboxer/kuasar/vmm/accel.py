"""Choose QEMU's accelerator: KVM only when it truly boots a guest, else TCG (with a warning).

A `/dev/kvm` that opens is not enough. On a nested host whose KVM is `kvm_pvm`, stock kernels
either make QEMU abort (`failed to set MSR 0x10a`) or hang silently in the firmware, and QEMU's own
fallback (`-accel kvm -accel tcg`) does not help because KVM initialises fine. So `auto`:

1. no usable `/dev/kvm` -> TCG;
2. `kvm_pvm` loaded and the kernel is not a PVM guest kernel -> TCG, without trying;
3. otherwise one probe boot of the configured kernel under KVM, bounded by `kvm_probe_timeout`,
   that must print the kernel's late-boot line on the serial console (it gets no initrd, so it ends
   in "VFS: Unable to mount root fs" and, with `panic=-1 -no-reboot`, QEMU exits). A timeout, an
   abort or a missing line means TCG. The probe QEMU is killed by pid when it overstays.

`kvm` and `tcg` force the choice (`kvm` still fails early when /dev/kvm is unusable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from kuasar.common.errors import FailedPrecondition

from .config import machine_option

log = logging.getLogger(__name__)

KVM_DEVICE = "/dev/kvm"
PVM_MODULE = "/sys/module/kvm_pvm"
# Printed once the kernel finished initialising and goes for init: CPU, timers and interrupts work.
PROBE_MARKERS = re.compile(rb"Freeing unused kernel|Run /init|Unable to mount root fs|No working init found")


@dataclass
class AccelFacts:
    kvm_usable: bool  # /dev/kvm exists and opens read-write
    kvm_pvm: bool  # the kvm_pvm module is loaded


@dataclass
class AccelChoice:
    accel: str  # "kvm" | "tcg"
    reason: str


def host_facts(device: str = KVM_DEVICE, pvm_module: str = PVM_MODULE) -> AccelFacts:
    usable = False
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
        usable = True
    except OSError:
        pass
    return AccelFacts(kvm_usable=usable, kvm_pvm=os.path.exists(pvm_module))


async def choose(mode: str, facts: AccelFacts, kernel_is_pvm_guest: bool,
                 probe: Callable[[], Awaitable[tuple[bool, str]]]) -> AccelChoice:
    """The decision, with the probe injected (unit-tested without QEMU)."""
    if mode == "tcg":
        return AccelChoice("tcg", "configured (accel = tcg)")
    if mode == "kvm":
        if not facts.kvm_usable:
            raise FailedPrecondition(f"accel = kvm but {KVM_DEVICE} is missing or not usable")
        return AccelChoice("kvm", "configured (accel = kvm)")
    if not facts.kvm_usable:
        return AccelChoice("tcg", f"{KVM_DEVICE} is missing or not usable")
    if facts.kvm_pvm and not kernel_is_pvm_guest:
        return AccelChoice("tcg", "KVM is kvm_pvm, which cannot boot a stock (non-PVM) guest kernel")
    ok, detail = await probe()
    if ok:
        return AccelChoice("kvm", f"KVM probe boot succeeded ({detail})")
    return AccelChoice("tcg", f"KVM probe boot failed: {detail}")


def probe_argv(qemu: str, kernel: str, machine: str, tsc_khz: int, accel: str = "kvm") -> list[str]:
    """A VM with the kernel alone (no initrd, no devices); `accel` other than kvm is a control run."""
    cpu = "host" if accel == "kvm" else "max"
    return [qemu, "-M", machine_option(machine), "-accel", accel, "-cpu", cpu, "-smp", "1", "-m", "128",
            "-no-reboot", "-no-user-config", "-nodefaults", "-display", "none", "-serial", "stdio",
            "-kernel", kernel,
            "-append", f"console=ttyS0 panic=-1 tsc_early_khz={tsc_khz} cryptomgr.notests loglevel=7"]


async def probe_boot(argv: list[str], timeout: float) -> tuple[bool, str]:
    """Run one probe VM; True once a marker line appears. The process never outlives this call."""
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    except OSError as err:
        return False, f"cannot run {argv[0]}: {err}"
    seen = b""
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await proc.stdout.read(4096)
                if not chunk:
                    break
                seen = (seen + chunk)[-65536:]
                if PROBE_MARKERS.search(seen):
                    return True, "the kernel reached init"
        await proc.wait()
        tail = seen.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return False, f"QEMU exited with {proc.returncode} before the kernel reached init ({tail[0][:200]})"
    except TimeoutError:
        return False, f"no boot within {timeout:g}s (killed)"
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 10)


async def detect(mode: str, qemu: str, kernel: str, machine: str, tsc_khz: int, kernel_is_pvm_guest: bool,
                 timeout: float) -> AccelChoice:
    facts = host_facts()
    choice = await choose(mode, facts, kernel_is_pvm_guest,
                          lambda: probe_boot(probe_argv(qemu, kernel, machine, tsc_khz), timeout))
    if choice.accel == "tcg" and mode == "auto":
        log.warning("VMs run under TCG (software emulation, slow): %s", choice.reason)
    else:
        log.info("VMs run under %s: %s", choice.accel.upper(), choice.reason)
    return choice


def read_tsc_khz(override: int = 0, cpuinfo: Path = Path("/proc/cpuinfo"),
                 sysfs: Path = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")) -> int:
    """The host TSC rate in kHz (microvm's tsc_early_khz): configured, sysfs, then `cpu MHz`."""
    if override:
        return override
    with contextlib.suppress(OSError, ValueError):
        return int(sysfs.read_text().strip())
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    raise FailedPrecondition("cannot read the host TSC rate ('cpu MHz' in /proc/cpuinfo); set "
                             "[hypervisor] tsc_khz")
