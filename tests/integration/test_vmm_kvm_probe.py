"""The time-bounded KVM probe against the real guest kernel: a TCG control boot must reach init, and
on a host whose /dev/kvm is kvm_pvm (which cannot run stock kernels) the KVM probe must fail within
its bound and leave no QEMU behind, instead of hanging or aborting the sandboxer."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import psutil
import pytest

from kuasar.vmm.accel import host_facts, probe_argv, probe_boot, read_tsc_khz

pytestmark = pytest.mark.integration

KERNEL = Path(__file__).resolve().parents[2] / "build" / "guest" / "vmlinux"


def qemu_or_skip() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed (make setup)")
    if not KERNEL.is_file():
        pytest.skip("no guest kernel in build/guest (make guest-image; test_vmm_cri builds it)")
    return qemu


def probe_qemus() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if (p.info["cmdline"] or [""])[0].endswith("qemu-system-x86_64") and str(KERNEL) in p.info["cmdline"]
            and "128" in p.info["cmdline"]]


def test_tcg_control_boot_reaches_init() -> None:
    qemu = qemu_or_skip()
    ok, detail = asyncio.run(probe_boot(probe_argv(qemu, str(KERNEL), "microvm", read_tsc_khz(), accel="tcg"), 60))
    assert ok, detail
    assert not probe_qemus()


def test_kvm_pvm_probe_fails_within_its_bound() -> None:
    qemu = qemu_or_skip()
    facts = host_facts()
    if not (facts.kvm_usable and facts.kvm_pvm):
        pytest.skip("this host's /dev/kvm is not kvm_pvm")
    t0 = time.monotonic()
    ok, detail = asyncio.run(probe_boot(probe_argv(qemu, str(KERNEL), "microvm", read_tsc_khz()), 5))
    assert not ok, "a stock kernel booted under kvm_pvm?"
    assert time.monotonic() - t0 < 20, detail
    assert not probe_qemus(), "the probe QEMU was left running"
    assert os.path.exists("/dev/kvm")
