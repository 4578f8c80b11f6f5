"""The OCI spec CRI wrote for the host, rewritten for runc inside the pod's VM."""

from __future__ import annotations

import pytest

from kuasar.common.errors import InvalidArgument
from kuasar.vmm.spec import GUEST_POD_PID_NS, rewrite_process, rewrite_spec

GUEST = "/run/kuasar/state/c1"


def cri_spec(pid_path: bool = False) -> dict:
    """Shaped like containerd 2.1 CRI's container spec for a pod with pod IP/IPC/UTS sharing."""
    ns = "/proc/4242/ns"
    return {
        "ociVersion": "1.2.0",
        "process": {"args": ["sleep", "1"], "cwd": "/", "apparmorProfile": "cri-containerd.apparmor.d",
                    "selinuxLabel": "x", "env": ["PATH=/bin"]},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "pod",
        "hooks": {"createRuntime": [{"path": "/usr/bin/nvidia-ctk"}]},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/.../shm",
             "options": ["rbind", "ro", "rprivate"]},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/kubelet/pods/1/etc-hosts",
             "options": ["rbind", "rprivate", "rw"]},
            {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rshared", "ro"]},
            {"destination": "/cfg/app.conf", "source": "/etc/app.conf", "options": ["bind", "rw"]},
            {"destination": "/cache", "type": "tmpfs", "source": "tmpfs", "options": ["size=64m"]},
        ],
        "linux": {
            "namespaces": [{"type": "pid", **({"path": f"{ns}/pid"} if pid_path else {})},
                           {"type": "ipc", "path": f"{ns}/ipc"}, {"type": "uts", "path": f"{ns}/uts"},
                           {"type": "mount"}, {"type": "network", "path": f"{ns}/net"}, {"type": "cgroup"}],
            "cgroupsPath": "kubepods-besteffort-pod1.slice:cri-containerd:c1",
            "resources": {"cpu": {"shares": 2, "cpus": "0-1", "mems": "0", "quota": 50000, "period": 100000},
                          "devices": [{"allow": False, "access": "rwm"}], "memory": {"limit": 1 << 26}},
            "devices": [{"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0}],
            "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0"},
            "mountLabel": "y",
            "maskedPaths": ["/proc/kcore"],
        },
    }


def test_namespaces_paths_and_host_only_settings() -> None:
    spec, binds = rewrite_spec(cri_spec(), "c1", GUEST)
    assert spec["root"] == {"path": "rootfs", "readonly": True}
    # network/ipc/uts are the guest's own (the VM is the pod); pid stays private (PID mode CONTAINER)
    assert spec["linux"]["namespaces"] == [{"type": "pid"}, {"type": "mount"}, {"type": "cgroup"}]
    assert "hostname" not in spec  # no private UTS namespace any more
    assert spec["linux"]["cgroupsPath"] == "/kuasar/c1"
    assert spec["linux"]["resources"]["cpu"] == {"shares": 2, "quota": 50000, "period": 100000}
    assert spec["linux"]["resources"]["memory"] == {"limit": 1 << 26}
    for key in ("devices", "sysctl", "mountLabel"):
        assert key not in spec["linux"]
    assert spec["linux"]["maskedPaths"] == ["/proc/kcore"]
    assert "hooks" not in spec
    assert "apparmorProfile" not in spec["process"] and "selinuxLabel" not in spec["process"]
    assert len(binds) == 3


def test_shared_pid_namespace_is_the_pods_own_in_the_guest() -> None:
    spec, _ = rewrite_spec(cri_spec(pid_path=True), "c1", GUEST)
    assert spec["linux"]["namespaces"] == [{"type": "pid", "path": GUEST_POD_PID_NS}, {"type": "mount"},
                                           {"type": "cgroup"}]


def test_mounts() -> None:
    spec, binds = rewrite_spec(cri_spec(), "c1", GUEST)
    by_dest = {m["destination"]: m for m in spec["mounts"]}
    assert by_dest["/proc"] == cri_spec()["mounts"][0]  # made in the guest
    assert by_dest["/cache"]["type"] == "tmpfs"
    assert by_dest["/dev/shm"]["source"] == "/dev/shm"  # the guest's pod-wide shm
    # kubelet's etc-hosts (hostAliases, the pod's FQDN) is shared from the host like any volume
    assert by_dest["/etc/hosts"]["source"] == f"{GUEST}/volumes/0"
    # CRI mounted no hostname/resolv.conf (a proxy sandboxer's pod has none on the host): the guest's,
    # read-only as the rootfs is (as containerd adds its own)
    assert by_dest["/etc/hostname"] == {"destination": "/etc/hostname", "type": "bind", "source": "/etc/hostname",
                                        "options": ["rbind", "rprivate", "ro"]}
    assert by_dest["/etc/resolv.conf"]["source"] == "/etc/resolv.conf"
    # host volumes go through the shared directory; propagation made private
    assert by_dest["/data"]["source"] == f"{GUEST}/volumes/1"
    assert by_dest["/data"]["options"] == ["rbind", "ro", "rprivate"]
    assert by_dest["/cfg/app.conf"]["source"] == f"{GUEST}/volumes/2"
    assert [(b.source, b.name, b.readonly) for b in binds] == [
        ("/var/lib/kubelet/pods/1/etc-hosts", "0", False), ("/srv/data", "1", True), ("/etc/app.conf", "2", False)]
    writable = cri_spec()
    writable["root"]["readonly"] = False
    spec, _ = rewrite_spec(writable, "c1", GUEST)
    assert {m["destination"]: m for m in spec["mounts"]}["/etc/resolv.conf"]["options"] == ["rbind", "rprivate", "rw"]


def test_input_is_not_modified_and_bad_input_refused() -> None:
    original = cri_spec()
    rewrite_spec(original, "c1", GUEST)
    assert original == cri_spec()
    with pytest.raises(InvalidArgument):
        rewrite_spec({"root": {}}, "c1", GUEST)
    bad = cri_spec()
    bad["mounts"].append({"destination": "/x", "type": "bind", "source": "relative/path", "options": ["rbind"]})
    with pytest.raises(InvalidArgument, match="absolute"):
        rewrite_spec(bad, "c1", GUEST)


def test_exec_process() -> None:
    process = {"args": ["sh"], "apparmorProfile": "p", "cwd": "/"}
    assert rewrite_process(process) == {"args": ["sh"], "cwd": "/"}
    assert process["apparmorProfile"] == "p"


def test_a_target_containers_pid_namespace_is_kept_by_its_guest_pid() -> None:
    # `kubectl debug --target=<ctr>`: CRI names the target's PID namespace by the pid our Task API gave
    # for it (a guest pid). Mapped to the pod's shared namespace, which a pod that shares none lacks,
    # runc create failed and the debug container never ran.
    target = cri_spec()
    target["linux"]["namespaces"][0] = {"type": "pid", "path": "/proc/77/ns/pid"}
    spec, _ = rewrite_spec(target, "c1", GUEST, sandbox_pid=4242)
    assert spec["linux"]["namespaces"][0] == {"type": "pid", "path": "/proc/77/ns/pid"}
    pod, _ = rewrite_spec(cri_spec(pid_path=True), "c1", GUEST, sandbox_pid=4242)  # the pod's (QEMU's pid)
    assert pod["linux"]["namespaces"][0] == {"type": "pid", "path": GUEST_POD_PID_NS}
    unknown, _ = rewrite_spec(target, "c1", GUEST)  # no sandbox pid known: every pid path is the pod's
    assert unknown["linux"]["namespaces"][0] == {"type": "pid", "path": GUEST_POD_PID_NS}


def test_a_containers_private_dev_shm_becomes_the_guests_pod_wide_one() -> None:
    # containerd's default spec gives each container a tmpfs of its own at /dev/shm (only its own pod
    # sandbox makes a shared one): POSIX shared memory was not shared between a VM pod's containers.
    spec = cri_spec()
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] != "/dev/shm"]
    spec["mounts"].append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                           "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]})
    guest, _ = rewrite_spec(spec, "c1", GUEST)
    [shm] = [m for m in guest["mounts"] if m["destination"] == "/dev/shm"]
    assert shm["type"] == "bind" and shm["source"] == "/dev/shm" and "rbind" in shm["options"]
    # a /dev/shm that comes from elsewhere (a host-IPC pod's host one) is the guest's too, as a bind
    [shm] = [m for m in rewrite_spec(cri_spec(), "c1", GUEST)[0]["mounts"] if m["destination"] == "/dev/shm"]
    assert shm["source"] == "/dev/shm"
