"""Cgroup paths from CRI and OCI: cgroupfs paths stay, systemd slices and `slice:prefix:name` expand."""

from __future__ import annotations

import pytest

from kuasar.common import cgroups
from kuasar.common.cgroups import cgroupfs_path, pod_parent_path, slice_path, use_cgroupfs_path
from kuasar.common.errors import InvalidArgument

POD_SLICE = "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice"


def test_a_slice_lives_under_its_parents() -> None:
    assert slice_path("kubepods-besteffort-pod12.slice") == POD_SLICE
    assert slice_path("system.slice") == "system.slice"
    for bad in ("kubepods", ".slice", "a--b.slice", "-a.slice", "a/b.slice"):
        with pytest.raises(InvalidArgument, match="not a systemd slice"):
            slice_path(bad)


def test_pod_parent_from_either_cgroup_driver() -> None:
    assert pod_parent_path("/kubepods/besteffort/pod12") == "/kubepods/besteffort/pod12"  # cgroupfs driver
    assert pod_parent_path("kubepods-besteffort-pod12.slice") == POD_SLICE  # systemd driver
    # containerd takes a slice from the last part of the parent too (getCgroupsPath)
    assert pod_parent_path("/kubepods.slice/kubepods-besteffort-pod12.slice/") == POD_SLICE
    assert pod_parent_path("") == ""  # none: the pod gets no cgroup of its own


@pytest.mark.parametrize("parent", ["..", "/kubepods/../..", "../../etc", "a/../b"])
def test_a_pod_parent_that_climbs_is_refused(parent: str) -> None:
    # Normalised, these became the root cgroup (the pod's process then left its service's cgroup for
    # every hierarchy's root, and its Stats were the whole host's) or another path (`etc`).
    with pytest.raises(InvalidArgument):
        pod_parent_path(parent)


def test_the_root_is_a_parent_and_its_pods_process_gets_a_cgroup_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    # kubelet without QoS cgroups gives `/`; the pod process then goes to /<pod id>, as containerd's pause.
    assert pod_parent_path("/") == "/"
    monkeypatch.setattr(cgroups, "is_unified", lambda: False)
    assert cgroups.pod_process_leaf("p1", "/") == "p1"
    for also_the_root in (".", "/./", "//"):  # got no leaf: the pod process went into the root cgroup
        assert cgroups.pod_process_leaf("p1", pod_parent_path(also_the_root)) == "p1"
    assert cgroups.pod_process_leaf("p1", "kubepods/pod1") == ""  # v1: no rule against it, no cost
    monkeypatch.setattr(cgroups, "is_unified", lambda: True)
    assert cgroups.pod_process_leaf("p1", "kubepods/pod1") == "p1"
    root = cgroups.PodCgroup("/", process_leaf="p1")
    assert (root.path, root.process_path, root.stats_path()) == ("", "p1", "p1")
    pod = cgroups.PodCgroup("kubepods/pod1", process_leaf="p1")
    assert (pod.process_path, pod.stats_path()) == ("kubepods/pod1/p1", "kubepods/pod1")


def test_oci_cgroups_path() -> None:
    assert cgroupfs_path("/k8s.io/abc") == "/k8s.io/abc"
    systemd_form = "kubepods-besteffort-pod12.slice:cri-containerd:abc"
    assert cgroupfs_path(systemd_form) == f"/{POD_SLICE}/cri-containerd-abc.scope"
    assert cgroupfs_path(":cri-containerd:abc") == "/system.slice/cri-containerd-abc.scope"
    assert cgroupfs_path("system.slice::web.scope") == "/system.slice/web.scope"
    for bad in ("a:b", "a.slice:p:", "notaslice:p:n"):
        with pytest.raises(InvalidArgument):
            cgroupfs_path(bad)


def test_a_systemd_named_cgroups_path_is_rewritten_once() -> None:
    spec = {"linux": {"cgroupsPath": "kubepods-besteffort-pod12.slice:cri-containerd:abc"}}
    assert use_cgroupfs_path(spec)
    assert spec["linux"]["cgroupsPath"] == f"/{POD_SLICE}/cri-containerd-abc.scope"
    assert not use_cgroupfs_path(spec)  # already a path
    assert not use_cgroupfs_path({"process": {}})


def test_a_relative_cgroups_path_is_made_absolute_as_the_pods_cgroup_is() -> None:
    spec = {"linux": {"cgroupsPath": "crictl-parent/pod-a/abc"}}  # containerd's parent/id, parent relative
    assert use_cgroupfs_path(spec)
    assert spec["linux"]["cgroupsPath"] == "/crictl-parent/pod-a/abc"
    assert not use_cgroupfs_path(spec)
