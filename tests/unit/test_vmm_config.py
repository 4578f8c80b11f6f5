"""vmm-sandboxer configuration: Kuasar's `[hypervisor]` keys, our additions, and what is refused."""

from __future__ import annotations

import pytest

from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.errors import InvalidArgument
from kuasar.vmm.config import VmmConfig, parse_config
from kuasar.vmm.sandboxer import hosts_file, resolv_conf, vm_resources


def test_defaults_are_a_tcg_friendly_microvm() -> None:
    config = parse_config({})
    assert (config.driver, config.machine_type, config.accel, config.share_fs) == ("qemu", "microvm", "auto", "9p")
    assert (config.vcpus, config.memory_in_mb, config.cache_9p) == (1, 512, "mmap")


def test_kuasar_keys_and_spellings() -> None:
    config = parse_config({
        "qemu_path": "/usr/bin/qemu-system-x86_64", "machine_type": "pc", "cpu_model": "host",
        "cpu_features": "+x2apic", "vcpus": 2, "default_max_vcpus": 4, "memory_in_mb": 1024,
        "kernel_path": "/k", "initrd_path": "/i", "kernel_params": "loglevel=7", "share_fs": "Virtio9P",
        "machine_accelerators": "kernel_irqchip=on", "firmware_path": "",
        # Kuasar keys about its own images and device model: accepted, ignored
        "default_bridges": 1, "mem_slots": 1, "entropy_source": "/dev/urandom", "msize_9p": 8192,
        "block_device_driver": "VirtioBlk",
        "task": {"debug": True, "log_level": "debug"},
        "virtiofsd": {"path": "/usr/libexec/virtiofsd", "cache": "always", "log_level": "info"},
    })
    assert config.machine_type == "pc" and config.cpu_model == "host" and config.share_fs == "9p"
    assert (config.vcpus, config.default_max_vcpus, config.memory_in_mb) == (2, 4, 1024)
    assert config.task_debug and config.task_log_level == "debug"
    assert config.virtiofsd.path == "/usr/libexec/virtiofsd"
    assert parse_config({"share_fs": "VirtioFS"}).share_fs == "virtio-fs"


@pytest.mark.parametrize("section, words", [
    ({"no_such_key": 1}, "unknown key"),
    ({"image_path": "/var/lib/kuasar/kuasar.img"}, "image_path"),
    ({"use_vsock": False}, "use_vsock"),
    ({"hugepages": True}, "hugepages"),
    ({"machine_type": "virt"}, "machine_type"),
    ({"accel": "hvf"}, "accel"),
    ({"tcg_thread": "many"}, "tcg_thread"),
    ({"driver": "cloud-hypervisor"}, "only qemu"),
    ({"vcpus": 8, "default_max_vcpus": 2}, "vcpus"),
    ({"memory_in_mb": 100}, "memory"),
    ({"vcpus": "two"}, "integer"),
    ({"share_fs": "nfs"}, "share_fs"),
    ({"task": {"bogus": 1}}, "hypervisor.task"),
    ({"kernel_params": "a\nb"}, "one line"),
    ({"agent_ready_timeout": float("nan")}, "positive number"),  # accepted before: every VM start failed
    ({"agent_ready_timeout": float("inf")}, "positive number"),
])
def test_refused(section: dict, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        parse_config(section)


def pod(annotations: dict[str, str] | None = None, quota: int = 0, period: int = 0, memory: int = 0):
    config = cri.PodSandboxConfig(annotations=annotations or {})
    config.linux.resources.cpu_quota, config.linux.resources.cpu_period = quota, period
    config.linux.resources.memory_limit_in_bytes = memory
    return config


def test_vm_size_from_resources_annotations_and_bounds() -> None:
    config = VmmConfig(vcpus=1, default_max_vcpus=2, memory_in_mb=512, min_memory_in_mb=256,
                       max_memory_in_mb=2048, memory_overhead_in_mb=192)
    assert vm_resources(config, pod()) == (1, 512)
    assert vm_resources(config, pod(quota=150000, period=100000, memory=256 << 20)) == (2, 448)
    assert vm_resources(config, pod(quota=800000, period=100000, memory=64 << 30)) == (2, 2048)  # clamped
    assert vm_resources(config, pod(memory=16 << 20)) == (1, 256)  # never below the minimum
    assert vm_resources(config, pod({"io.kuasar.vmm.vcpus": "2", "io.kuasar.vmm.memory_mb": "1024"})) == (2, 1024)
    assert vm_resources(config, pod({"io.katacontainers.config.hypervisor.default_memory": "768"})) == (1, 768)
    with pytest.raises(InvalidArgument):
        vm_resources(config, pod({"io.kuasar.vmm.vcpus": "lots"}))


def test_sandbox_files() -> None:
    assert hosts_file("web", ["10.0.0.5"]).splitlines()[-1] == "10.0.0.5\tweb"
    dns = cri.DNSConfig(servers=["10.96.0.10"], searches=["default.svc.cluster.local"], options=["ndots:5"])
    assert resolv_conf(dns) == ("search default.svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n")
