"""The QEMU command line vmm-sandboxer builds (no QEMU is started here)."""

from __future__ import annotations

from pathlib import Path

from kuasar.vmm.config import VmmConfig
from kuasar.vmm.hypervisor import NicDevice, VmSpec
from kuasar.vmm.qemu import kernel_cmdline, qemu_command, vhost_vsock_command, virtiofsd_command


def spec(**kwargs) -> VmSpec:
    values = dict(sandbox_id="abc", vm_dir=Path("/run/k/vm/abc"), kernel="/g/vmlinux", initrd="/g/initrd.cpio",
                  vcpus=2, memory_mb=768, accel="tcg", tsc_khz=2445428, share_fs="9p")
    values.update(kwargs)
    return VmSpec(**values)


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_microvm_under_tcg() -> None:
    s = spec(netns="/var/run/netns/cni-1", nics=[NicDevice("net0", "aa:bb:cc:dd:ee:ff", 5)])
    argv = qemu_command(VmmConfig(), s, "/usr/bin/qemu-system-x86_64")
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    # no 8254 PIT: under QEMU 10's TCG, a guest calibrating against it died early in 2 of 3 boots
    assert option(argv, "-machine") == ["microvm,pit=off,memory-backend=mem"]
    assert option(argv, "-accel") == ["tcg,thread=single"] and option(argv, "-cpu") == ["max"]
    assert option(argv, "-smp") == ["2"] and option(argv, "-m") == ["768M"]
    assert "memory-backend-memfd,id=mem,size=768M,share=on" in option(argv, "-object")  # vhost-user needs it
    for flag in ("-no-reboot", "-nodefaults", "-no-user-config"):
        assert flag in argv
    assert option(argv, "-qmp") == ["unix:/run/k/vm/abc/qmp.sock,server=on,wait=off"]
    assert option(argv, "-sandbox") == ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    # appended to: the task proxy empties it when it rotates it, and QEMU's next write must go to its start
    assert option(argv, "-serial") == ["chardev:console"]
    assert option(argv, "-chardev") == ["file,id=console,path=/run/k/vm/abc/console.log,append=on",
                                        "socket,id=vsock,path=/run/k/vm/abc/vhost-vsock.sock"]
    devices = option(argv, "-device")
    assert devices == ["vhost-user-vsock-device,chardev=vsock", "virtio-9p-device,fsdev=share,mount_tag=kuasar",
                       "virtio-net-device,netdev=net0,mac=aa:bb:cc:dd:ee:ff"]
    assert option(argv, "-fsdev") == ["local,id=share,path=/run/k/vm/abc/shared,security_model=none,multidevs=remap"]
    assert option(argv, "-netdev") == ["tap,id=net0,fd=5,vhost=off"]
    assert (option(argv, "-kernel"), option(argv, "-initrd")) == (["/g/vmlinux"], ["/g/initrd.cpio"])
    cmdline = option(argv, "-append")[0].split()
    for word in ("console=ttyS0", "panic=-1", "tsc_early_khz=2445428", "cryptomgr.notests",
                 "task.notify_port=1025", "task.sharefs_type=9p", "task.share_cache=mmap"):
        assert word in cmdline
    assert "task.debug" not in cmdline


def test_multi_threaded_tcg_only_when_configured() -> None:
    argv = qemu_command(VmmConfig(tcg_thread="multi"), spec(), "qemu")
    assert option(argv, "-accel") == ["tcg,thread=multi"]


def test_pc_with_kvm_uses_pci_devices_and_the_host_cpu() -> None:
    config = VmmConfig(machine_type="pc", cpu_features="-arch-capabilities", machine_accelerators="kernel_irqchip=on",
                       kernel_params="loglevel=7", task_debug=True)
    s = spec(accel="kvm", share_fs="virtio-fs", debug=True)
    argv = qemu_command(config, s, "qemu")
    assert option(argv, "-machine") == ["pc,memory-backend=mem,kernel_irqchip=on"]
    assert option(argv, "-accel") == ["kvm"] and option(argv, "-cpu") == ["host,-arch-capabilities"]
    devices = option(argv, "-device")
    assert devices == ["vhost-user-vsock-pci,chardev=vsock", "vhost-user-fs-pci,chardev=fs,tag=kuasar"]
    assert "socket,id=fs,path=/run/k/vm/abc/virtiofs.sock" in option(argv, "-chardev")
    cmdline = kernel_cmdline(config, s).split()
    assert "task.sharefs_type=virtiofs" in cmdline and "task.debug" in cmdline and cmdline[-1] == "loglevel=7"
    assert not any(w.startswith("tsc_early_khz") for w in cmdline)  # pc + KVM calibrates itself


def test_no_share_and_helpers() -> None:
    argv = qemu_command(VmmConfig(seccomp_sandbox=""), spec(share_fs="none"), "qemu")
    assert "-fsdev" not in argv and "-sandbox" not in argv and "task.sharefs_type=none" in option(argv, "-append")[0]
    assert vhost_vsock_command("vdv", spec()) == [
        "vdv", "--vm", "guest-cid=3,socket=/run/k/vm/abc/vhost-vsock.sock,uds-path=/run/k/vm/abc/vsock.sock"]
    fs = virtiofsd_command("virtiofsd", VmmConfig(), spec())
    assert "--shared-dir" in fs and "--sandbox=none" in fs and "--cache=always" in fs
