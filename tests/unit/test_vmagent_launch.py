"""The QEMU command line of vm-agent's own test launcher (kuasar.vmagent.launch), which boots the guest
image without vmm-sandboxer."""

from __future__ import annotations

from pathlib import Path

import pytest

from kuasar.vmagent.launch import VmConfig


def test_the_launcher_boots_a_microvm_without_a_pit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As vmm-sandboxer's VMs: under Debian 13's QEMU 10 TCG a microvm guest with the 8254 PIT died of a
    # divide error early in boot in 2 of 3 boots, and test_vm_agent_end_to_end failed with it.
    monkeypatch.setenv("KUASAR_TSC_KHZ", "2500000")
    argv = VmConfig(kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd", workdir=tmp_path).qemu_argv()
    machine = argv[argv.index("-M") + 1].split(",")
    assert machine[0] == "microvm" and "pit=off" in machine
    assert "tsc_early_khz=2500000" in argv[argv.index("-append") + 1]  # what makes the PIT needless
