"""A cgroup parent a sandboxer made for its pods (Quark's, VM pods': they outlive a restart of it) is
shared by every pod under it and removed with the last of them, across a restart of the sandboxer and
however often a pod's removal is tried. On a fake cgroup v2 root."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kuasar.common import cgroups
from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.config import DaemonConfig
from kuasar.common.controller import new_record
from kuasar.common.sandboxer import SandboxRecord, SandboxState
from kuasar.quark.config import QuarkConfig
from kuasar.quark.quark_sandboxer import QuarkSandboxer
from kuasar.vmm import hostfs
from kuasar.vmm.config import VmmConfig
from kuasar.vmm.sandboxer import VmmSandboxer, VmPod

PARENT = "P"  # a cgroup_parent nobody else made (crictl's, without kubelet)


@pytest.fixture
def cgroup_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cgroup v2 root whose rmdir of a cgroup with children fails as cgroupfs's does (EBUSY; a plain
    directory says ENOTEMPTY); no pod cgroup is counted yet."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("")
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", root)
    monkeypatch.setattr(cgroups, "_USERS", {})
    real_rmdir = os.rmdir

    def cgroupfs_rmdir(path: str | Path) -> None:
        try:
            real_rmdir(path)
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise OSError(errno.EBUSY, "Device or resource busy") from None
            raise

    monkeypatch.setattr(cgroups.os, "rmdir", cgroupfs_rmdir)
    return root


def _pod(pod_id: str) -> cgroups.PodCgroup:
    """What Quark's and VM pods' Start makes (process_leaf: the pod's id, under v2)."""
    cgroup = cgroups.place_in_pod_cgroup(pod_id, PARENT, [], "a test pod")
    assert cgroup is not None
    return cgroup


def _quark(tmp_path: Path) -> QuarkSandboxer:
    config = DaemonConfig(listen=tmp_path / "q.sock", dir=tmp_path / "q")
    config.dir.mkdir(exist_ok=True)
    return QuarkSandboxer(config, QuarkConfig(quark="/bin/true"))


def _quark_record(pod_id: str, cgroup: cgroups.PodCgroup) -> SandboxRecord:
    record = new_record(pod_id, "quark", "", cri.PodSandboxConfig().SerializeToString(), {}, {}, {})
    record.state = SandboxState.STOPPED  # recover looks no further at it: no QVisor to find
    record.extra["quark"] = {"cgroup": cgroup.recorded()}
    return record


def _vmm_record(pod_id: str, cgroup: cgroups.PodCgroup) -> SandboxRecord:
    return SandboxRecord(id=pod_id, state=SandboxState.STOPPED, extra={"vm": {"cgroup": cgroup.recorded()}})


def _bare_vmm(tmp_path: Path) -> VmmSandboxer:
    sandboxer = VmmSandboxer.__new__(VmmSandboxer)  # only what recovery and removal read
    sandboxer.config, sandboxer.accel, sandboxer.pods = VmmConfig(), "tcg", {}
    sandboxer.vm_root, sandboxer.daemon = tmp_path / "vm", SimpleNamespace(log_level="info")
    return sandboxer


@pytest.mark.parametrize("sandbox_type", ["quark", "vmm"])
def test_a_parent_made_before_a_restart_goes_with_the_last_pod(sandbox_type: str, tmp_path: Path,
                                                              cgroup_root: Path) -> None:
    # Pod A made P and P/A; after a restart pod B found P and, knowing nothing of A, took it for someone
    # else's: A's removal left P (busy with B's), and B's never touched it.
    a = _pod("a")
    assert a.created == [str(cgroup_root / PARENT), str(cgroup_root / PARENT / "a")]
    cgroups._USERS.clear()  # the sandboxer restarts, and recovers A's record
    if sandbox_type == "quark":
        asyncio.run(_quark(tmp_path).recover([_quark_record("a", a)]))
    else:
        asyncio.run(_bare_vmm(tmp_path).recover([_vmm_record("a", a)]))
    b = _pod("b")
    assert str(cgroup_root / PARENT) in b.created
    cgroups.PodCgroup.from_record(a.recorded()).remove()  # A goes first: P stays, B is in it
    assert (cgroup_root / PARENT / "b").is_dir()
    b.remove()
    assert not (cgroup_root / PARENT).exists(), "the parent made for A leaked"


def test_a_quark_shutdown_tried_again_counts_its_cgroup_gone_once(tmp_path: Path, cgroup_root: Path) -> None:
    # A second Shutdown (the first one failed after the cgroup went) counted A's share of P gone again:
    # P was then nobody's, a pod C made since did not count it, and it outlived the last pod.
    sandboxer = _quark(tmp_path)
    a = _pod("a")
    b = _pod("b")
    record_a = _quark_record("a", a)
    for _ in range(2):
        asyncio.run(sandboxer.shutdown(record_a))
    c = _pod("c")
    assert str(cgroup_root / PARENT) in c.created
    b.remove()
    c.remove()
    assert not (cgroup_root / PARENT).exists()


def test_a_vm_start_whose_cleanup_failed_counts_its_cgroup_gone_once(tmp_path: Path, cgroup_root: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # A failed Start removed its cgroup, failed later on, and kept the VM's state for the Shutdown that
    # follows (SandboxController._discard), which removed the cgroup, and counted it gone, once more.
    from tests.unit.test_vmm_failures import FakeVm

    sandboxer = _bare_vmm(tmp_path)
    b = _pod("b")

    async def failed_start_then_shutdown() -> None:
        pod = VmPod("a", FakeVm(), tmp_path / "vm" / "a", "/nonexistent/u", "a")
        pod.cgroup = _pod("a")
        record = SandboxRecord(id="a", extra={"vm": {"cgroup": pod.cgroup.recorded()}})

        real_remove_tree, calls = hostfs.remove_tree, []

        def fails_first(path: Path) -> None:  # the failed Start's, after its cgroup went
            calls.append(path)
            if len(calls) == 1:
                raise OSError(errno.EIO, "I/O error")
            real_remove_tree(path)

        monkeypatch.setattr(hostfs, "remove_tree", fails_first)
        await sandboxer._abort_start(record, pod, pod.vm, None, pod.vm_dir)
        assert record.extra.get("vm"), "kept for the Shutdown that follows"
        await sandboxer.shutdown(record)

    asyncio.run(failed_start_then_shutdown())
    c = _pod("c")
    assert str(cgroup_root / PARENT) in c.created
    b.remove()
    c.remove()
    assert not (cgroup_root / PARENT).exists()


def test_a_pods_removal_waits_for_its_own_cgroup_not_for_a_parent_others_share(
        tmp_path: Path, cgroup_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Quark's Shutdown waited for every directory the pod counted to empty: P, which held the other
    # pod's processes, took the whole wait (5 s) at every removal but the last one's.
    a, b = _pod("a"), _pod("b")
    assert str(cgroup_root / PARENT) in b.created
    monkeypatch.setattr(cgroups, "_populated", lambda directory: directory == str(cgroup_root / PARENT))
    started = time.monotonic()
    asyncio.run(cgroups.remove_when_empty(b, timeout=5.0))
    assert time.monotonic() - started < 1.0
    assert not (cgroup_root / PARENT / "b").exists()
    a.remove()
    assert not (cgroup_root / PARENT).exists()
