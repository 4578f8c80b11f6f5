"""The pod process: kuasar-pause --setup (spawned) and the forked fallback make the same namespaces."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kuasar.common import linux, pod_holder, pod_leftovers, proc_stat
from kuasar.common.errors import RuntimeFailure
from kuasar.common.pod_holder import PodNamespaces, start_pod_holder
from kuasar.common.pod_sysctls import MAX_SYSCTLS, sysctl_path
from tests.support.userns import namespace_holder

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")


def ns_of(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def finish(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # the PID-namespace case re-parents it away from us


@pytest.fixture(params=["kuasar-pause", "forked"])
def holder_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    pod_holder.pause_program.cache_clear()
    if request.param == "kuasar-pause":
        if pod_holder.pause_program() is None:
            pytest.skip("kuasar-pause is not built (make setup)")
    else:
        monkeypatch.setattr(pod_holder, "pause_program", lambda: None)
    yield request.param


@pytest.mark.parametrize("new_pid", [False, True])
def test_holder_sits_in_new_ipc_uts_and_pid_namespaces_with_its_hostname(holder_path: str, new_pid: bool) -> None:
    ns = PodNamespaces(new_ipc=True, new_uts=True, new_pid=new_pid)
    pid = asyncio.run(start_pod_holder("abcdef0123456789", ns, "pod-host"))
    try:
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "pod-abcdef01234"
        assert ns_of(pid, "ipc") != ns_of("self", "ipc")
        assert ns_of(pid, "uts") != ns_of("self", "uts")
        assert ns_of(pid, "net") == ns_of("self", "net")  # no netns path: the host network
        assert (ns_of(pid, "pid") != ns_of("self", "pid")) == new_pid
        if new_pid:
            assert Path(f"/proc/{pid}/status").read_text().split("NSpid:")[1].splitlines()[0].split()[-1] == "1"
        # The hostname is set inside: read it through the holder's UTS namespace.
        with open(f"/proc/{pid}/ns/uts") as uts:
            child = os.fork()
            if child == 0:
                linux.setns(uts.fileno(), linux.CLONE_NEWUTS)
                os._exit(0 if os.uname().nodename == "pod-host" else 1)
            assert os.waitpid(child, 0)[1] == 0
    finally:
        finish(pid)


def test_the_pod_process_sets_its_oom_score_adjustment_and_keeps_the_inherited_one_where_it_may_not(
        holder_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """-998 (containerd's for its pause container) needs CAP_SYS_RESOURCE, which this machine's root
    lacks; raising needs nothing, so a raised value shows the setting reaches the pod process."""
    monkeypatch.setattr(pod_holder, "POD_OOM_SCORE_ADJ", 321)
    pid = asyncio.run(start_pod_holder("oomadj", PodNamespaces()))
    try:
        assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "321"
    finally:
        finish(pid)
    monkeypatch.setattr(pod_holder, "POD_OOM_SCORE_ADJ", -998)
    inherited = Path("/proc/self/oom_score_adj").read_text().strip()
    pid = asyncio.run(start_pod_holder("oomadj", PodNamespaces()))
    try:
        assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == (
            "-998" if _can_lower_oom_score() else inherited)
    finally:
        finish(pid)


def _can_lower_oom_score() -> bool:
    """Whether this process has CAP_SYS_RESOURCE (bit 24 of its effective set)."""
    effective = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                         if line.startswith("CapEff:")).split()[1], 16)
    return bool(effective & (1 << 24))


def test_a_missing_netns_is_reported_and_leaves_no_process(holder_path: str) -> None:
    before = {p for p in os.listdir("/proc") if p.isdigit()}
    with pytest.raises(RuntimeFailure, match="netns"):
        asyncio.run(start_pod_holder("badnetns", PodNamespaces(netns_path="/nonexistent/netns")))
    time.sleep(0.2)
    assert [pid for pid in set(os.listdir("/proc")) - before if pid.isdigit() and live_holder(pid)] == []


@pytest.mark.parametrize("new_pid", [False, True])
def test_what_runs_meanwhile_runs_and_its_failure_leaves_no_process(holder_path: str, new_pid: bool) -> None:
    ran: list[bool] = []
    pid = asyncio.run(start_pod_holder("meanwhile-ok", PodNamespaces(new_pid=new_pid),
                                       meanwhile=lambda: ran.append(True)))
    finish(pid)
    assert ran == [True]

    def fail() -> None:
        raise OSError("no shm for you")

    before = {p for p in os.listdir("/proc") if p.isdigit()}
    with pytest.raises(OSError, match="no shm for you"):
        asyncio.run(start_pod_holder("badnetns", PodNamespaces(new_pid=new_pid), meanwhile=fail))
    deadline = time.monotonic() + 5
    while [p for p in set(os.listdir("/proc")) - before if p.isdigit() and live_holder(p)]:
        assert time.monotonic() < deadline, "the pod process outlived the failure"
        time.sleep(0.02)


def owner_of(pid: int | str, kind: str) -> str:
    """The user namespace that owns `pid`'s namespace of `kind`."""
    import fcntl

    fd = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY)
    try:
        owner = fcntl.ioctl(fd, linux.NS_GET_USERNS)
    finally:
        os.close(fd)
    try:
        return os.readlink(f"/proc/self/fd/{owner}")
    finally:
        os.close(owner)


@pytest.mark.parametrize("new_pid", [False, True])
def test_with_userns_the_pod_joins_the_user_namespace_its_netns_was_made_in(holder_path: str, new_pid: bool) -> None:
    """CRI's hostUsers: false: containerd makes the pod's netns inside the pod's user namespace; the pod
    process enters that one, and the namespaces it makes belong to it (or containers could not use them)."""
    with namespace_holder(host_id=300000) as made_in:
        ns = PodNamespaces(netns_path=f"/proc/{made_in}/ns/net", new_pid=new_pid, userns=True)
        pid = asyncio.run(start_pod_holder("userns0123456789", ns, "uns-host"))
        try:
            assert ns_of(pid, "user") == ns_of(made_in, "user") != ns_of("self", "user")
            assert ns_of(pid, "net") == ns_of(made_in, "net")
            for kind in ("ipc", "uts", *(["pid_for_children"] if new_pid else [])):
                assert owner_of(pid, kind) == ns_of(made_in, "user"), kind
            assert Path(f"/proc/{pid}/uid_map").read_text().split() == ["0", "300000", "65536"]
        finally:
            finish(pid)


def test_userns_with_a_netns_of_the_hosts_user_namespace_is_refused(holder_path: str) -> None:
    before = {p for p in os.listdir("/proc") if p.isdigit()}
    with namespace_holder(user=False) as made_in:
        ns = PodNamespaces(netns_path=f"/proc/{made_in}/ns/net", userns=True)
        try:
            pid = asyncio.run(start_pod_holder("hostuserns", ns))
        except RuntimeFailure as exc:
            assert "host's user namespace" in str(exc)
        else:
            finish(pid)
            pytest.fail("a netns of the host's user namespace was taken for the pod's")
    time.sleep(0.2)
    assert [pid for pid in set(os.listdir("/proc")) - before if pid.isdigit() and live_holder(pid)] == []


def sysctl_in(pid: int, kind: int, key: str) -> str:
    """`key` as a process in `pid`'s namespace of `kind` reads it (/proc/sys serves the reader's)."""
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            name = {linux.CLONE_NEWNET: "net", linux.CLONE_NEWIPC: "ipc"}[kind]
            with open(f"/proc/{pid}/ns/{name}") as ns:
                linux.setns(ns.fileno(), kind)
            os.write(write_fd, Path("/proc/sys", sysctl_path(key)).read_bytes())
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        return os.read(read_fd, 4096).decode().strip()
    finally:
        os.close(read_fd)
        os.waitpid(child, 0)


def read_in_pod(made_in: int, sysctls: tuple[tuple[str, str], ...], reads: dict[str, int]) -> dict[str, str]:
    """Start a pod process in `made_in`'s netns with `sysctls`; read back `reads` (key -> namespace kind)."""
    pid = asyncio.run(start_pod_holder("sysctls", PodNamespaces(netns_path=f"/proc/{made_in}/ns/net",
                                                                sysctls=sysctls)))
    try:
        return {key: sysctl_in(pid, kind, key) for key, kind in reads.items()}
    finally:
        finish(pid)


def test_sysctls_are_set_in_the_pods_namespaces_and_not_the_hosts(holder_path: str) -> None:
    host = {key: Path("/proc/sys", sysctl_path(key)).read_text().strip()
            for key in ("net.ipv4.ip_unprivileged_port_start", "kernel.shm_rmid_forced")}
    with namespace_holder(user=False) as made_in:
        assert read_in_pod(made_in, (("net.ipv4.ip_unprivileged_port_start", "123"), ("kernel.shm_rmid_forced", "1")),
                           {"net.ipv4.ip_unprivileged_port_start": linux.CLONE_NEWNET,
                            "kernel.shm_rmid_forced": linux.CLONE_NEWIPC}) == {
            "net.ipv4.ip_unprivileged_port_start": "123", "kernel.shm_rmid_forced": "1"}
    assert {key: Path("/proc/sys", sysctl_path(key)).read_text().strip() for key in host} == host


def test_a_sysctl_of_an_interface_with_a_dot_in_its_name_reaches_that_interface(holder_path: str) -> None:
    """kubelet names VLAN interface vl.7's knob `net.ipv4.conf.vl/7.forwarding` (sysctl.d(5)'s dotted
    form, a slash for the literal dot); the slash-first form keeps the dot as it is."""
    with namespace_holder(user=False) as made_in:
        subprocess.run(["nsenter", f"--net=/proc/{made_in}/ns/net", "ip", "link", "add", "vl.7", "type", "veth",
                        "peer", "name", "vl.8"], check=True)
        assert read_in_pod(made_in, (("net.ipv4.conf.vl/7.forwarding", "1"),
                                     ("net/ipv4/conf/vl.7/accept_redirects", "0")),
                           {"net/ipv4/conf/vl.7/forwarding": linux.CLONE_NEWNET,
                            "net.ipv4.conf.vl/7.accept_redirects": linux.CLONE_NEWNET}) == {
            "net/ipv4/conf/vl.7/forwarding": "1", "net.ipv4.conf.vl/7.accept_redirects": "0"}


def test_a_sysctl_that_cannot_be_set_fails_the_pod_and_leaves_no_process(holder_path: str) -> None:
    before = {p for p in os.listdir("/proc") if p.isdigit()}
    with pytest.raises(RuntimeFailure, match="sysctl net/ipv4/no_such_knob"):
        asyncio.run(start_pod_holder("badsysctl", PodNamespaces(sysctls=(("net.ipv4.no_such_knob", "1"),))))
    time.sleep(0.2)
    assert [pid for pid in set(os.listdir("/proc")) - before if pid.isdigit() and live_holder(pid)] == []


def test_kuasar_pause_refuses_more_sysctls_than_it_holds_instead_of_misreading_them() -> None:
    pod_holder.pause_program.cache_clear()
    pause = pod_holder.pause_program()
    if pause is None:
        pytest.skip("kuasar-pause is not built (make setup)")
    too_many = [arg for i in range(MAX_SYSCTLS + 1) for arg in ("--sysctl", f"kernel/none{i}=1")]
    done = subprocess.run([pause, "--setup", *too_many, "toomany"], capture_output=True, text=True, timeout=10)
    assert done.returncode == 2 and "usage" in done.stderr and not done.stdout


def live_holder(pid: str) -> bool:
    """A process of this test that is still alive (an exited, unreaped child is not: the task server's
    reaper collects those)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status and ("pod-badnetns" in status or "kuasar-pause" in status)


def test_an_argument_with_a_nul_is_a_clear_failure_that_leaves_no_fd() -> None:
    # posix_spawn raises ValueError for it, which was not caught: the report pipe's read end leaked
    # (one fd per such pod, in the long-lived task server) and the caller got no RuntimeFailure.
    pod_holder.pause_program.cache_clear()
    if pod_holder.pause_program() is None:
        pytest.skip("kuasar-pause is not built (make setup)")
    gc.collect()  # earlier tests' garbage holding fds would be collected (and its fds closed) meanwhile
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(2):
        with pytest.raises(RuntimeFailure, match="null"):
            asyncio.run(start_pod_holder("nul", PodNamespaces(new_uts=True), hostname="web\0x"))
    assert sorted(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("new_pid", [False, True])
def test_the_pod_process_names_its_owner_so_that_a_sweep_finds_it_without_a_record(
        tmp_path: Path, new_pid: bool) -> None:
    pod_holder.pause_program.cache_clear()
    if pod_holder.pause_program() is None:
        pytest.skip("kuasar-pause is not built (make setup)")
    owner = tmp_path / "pods" / ("o" * 64)
    pid = asyncio.run(start_pod_holder("o" * 64, PodNamespaces(new_pid=new_pid), owner=owner))
    try:
        # The PID 1 child of a pod-wide PID namespace is what is left: it carries the flag too.
        assert pod_leftovers.owned_processes(tmp_path / "pods") == [(pid, proc_stat.start_time(pid))]
        assert pod_leftovers.owned_processes(tmp_path / "other") == []
    finally:
        finish(pid)
