"""Which sysctls a pod's namespaces get: CRI's, containerd's two defaults, and only namespaced ones."""

from __future__ import annotations

import pytest

from kuasar.common.errors import InvalidArgument
from kuasar.common.pod_sysctls import MAX_SYSCTLS, pod_sysctls, sysctl_parts, sysctl_path, with_containerd_defaults

PORTS, ICMP = "net.ipv4.ip_unprivileged_port_start", "net.ipv4.ping_group_range"


def test_a_pod_with_its_own_network_gets_containerds_defaults_unless_it_sets_them() -> None:
    assert pod_sysctls({}, own_net=True, own_ipc=True, own_uts=True) == {PORTS: "0", ICMP: "0 2147483647"}
    assert pod_sysctls({PORTS: "80"}, True, True, True)[PORTS] == "80"
    # A user-namespaced pod's group range would name unmapped groups: containerd leaves it out too.
    assert pod_sysctls({}, True, True, True, userns=True) == {PORTS: "0"}
    assert with_containerd_defaults({}, own_net=False) == {}
    assert pod_sysctls({"kernel.shm_rmid_forced": "1"}, own_net=False, own_ipc=True, own_uts=False) == {
        "kernel.shm_rmid_forced": "1"}


@pytest.mark.parametrize("sysctls, own, message", [
    ({"net.core.somaxconn": "1024"}, (False, True, True), "own network namespace"),
    ({"kernel.shmmax": "1"}, (True, False, True), "own IPC namespace"),
    ({"fs.mqueue.msg_max": "20"}, (True, False, True), "own IPC namespace"),
    ({"kernel.domainname": "x"}, (True, True, False), "own UTS namespace"),
    ({"vm.swappiness": "10"}, (True, True, True), "not scoped by a pod's namespaces"),
    ({"kernel.hostname": "x"}, (True, True, True), "not scoped"),
    ({"net/../../../etc/passwd": "x"}, (True, True, True), "bad sysctl name"),
    ({"net.ipv4..x": "1"}, (True, True, True), "bad sysctl name"),
    ({"net.ipv4.a=b": "1"}, (True, True, True), "bad sysctl name"),
    ({"net." + "x" * 300: "1"}, (True, True, True), "bad sysctl name"),
    ({"net.ipv4.tcp_syncookies": "1\n0"}, (True, True, True), "bad value"),
    ({f"net.ipv4.conf.x{i}.forwarding": "0" for i in range(MAX_SYSCTLS)}, (True, True, True), "at most"),
])
def test_sysctls_the_pods_namespaces_do_not_scope_or_bad_names_are_refused(
        sysctls: dict[str, str], own: tuple[bool, bool, bool], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        pod_sysctls(sysctls, *own)


def test_names_are_read_as_sysctl_d_reads_them() -> None:
    assert sysctl_parts("net.ipv4.ip_forward") == sysctl_parts("net/ipv4/ip_forward") == ["net", "ipv4", "ip_forward"]
    assert pod_sysctls({"net/ipv4/tcp_syncookies": "1"}, True, False, False)["net/ipv4/tcp_syncookies"] == "1"
    # Dotted form: a slash is a literal dot (kubelet's name for VLAN interface eth0.100's knob) ...
    assert sysctl_path("net.ipv4.conf.eth0/100.rp_filter") == "net/ipv4/conf/eth0.100/rp_filter"
    # ... slash-first form: a dot is literal.
    assert sysctl_path("net/ipv4/conf/eth0.100/rp_filter") == "net/ipv4/conf/eth0.100/rp_filter"
    assert sysctl_path("kernel.shm_rmid_forced") == "kernel/shm_rmid_forced"
    assert pod_sysctls({"net.ipv4.conf.eth0/100.rp_filter": "1"}, True, False, False)[
        "net.ipv4.conf.eth0/100.rp_filter"] == "1"


@pytest.mark.parametrize("name", ["net.ipv4.conf.//.x", "net.ipv4.conf./.x", "net/ipv4/conf/../x",
                                  "net/ipv4/./x", "/net/ipv4/x"])
def test_a_name_that_would_leave_its_directory_is_refused_in_either_form(name: str) -> None:
    with pytest.raises(InvalidArgument, match="bad sysctl name"):
        sysctl_parts(name)
