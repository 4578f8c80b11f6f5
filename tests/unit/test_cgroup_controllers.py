"""cgroup v2: a cgroup we make gets its controllers handed down from the root, so limits can be written
in it (the wasm task server's memory.max failed with EACCES under a parent nobody had enabled memory in).
A fake unified tree of plain files stands in for cgroupfs here; the real one is exercised by the CRI
tests on a cgroup v2 host (`make test-cgroup2`)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from kuasar.common import cgroups


def fake_cgroup(directory: Path, controllers: str, enabled: str = "") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cgroup.controllers").write_text(controllers + "\n")
    (directory / "cgroup.subtree_control").write_text(enabled + "\n")


@pytest.fixture
def unified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    fake_cgroup(tmp_path, "cpuset cpu io memory pids", enabled="cpu")
    assert cgroups.is_unified()
    return tmp_path


def test_every_cgroup_above_a_new_one_enables_what_it_has_and_the_new_one_is_left_alone(unified: Path) -> None:
    fake_cgroup(unified / "kubepods", "cpuset cpu io memory pids")
    fake_cgroup(unified / "kubepods" / "pod1", "cpu memory pids", enabled="cpu memory pids")
    cgroup = cgroups.PodCgroup("kubepods/pod1", process_leaf="p1")
    cgroup.create()
    assert cgroup.created == [str(unified / "kubepods" / "pod1" / "p1")]
    assert (unified / "cgroup.subtree_control").read_text() == "+cpuset +io +memory +pids"
    assert (unified / "kubepods" / "cgroup.subtree_control").read_text() == "+cpuset +cpu +io +memory +pids"
    assert (unified / "kubepods" / "pod1" / "cgroup.subtree_control").read_text() == "cpu memory pids\n"
    # The process's own cgroup hands nothing down: under v2 a cgroup with processes cannot.
    assert not (unified / "kubepods" / "pod1" / "p1" / "cgroup.subtree_control").exists()


def test_a_wasm_containers_cgroup_made_under_an_existing_parent_gets_its_controllers(unified: Path) -> None:
    # containerd's /k8s.io, made by someone else without any controller enabled in it.
    fake_cgroup(unified / "k8s.io", "cpuset cpu io memory pids")
    container = cgroups.PodCgroup("/k8s.io/c1")
    container.create()
    assert (unified / "k8s.io" / "cgroup.subtree_control").read_text() == "+cpuset +cpu +io +memory +pids"


def test_a_controller_that_cannot_be_enabled_does_not_keep_the_others_out(unified: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel takes a subtree_control write whole or not at all: one refused controller refuses all.
    fake_cgroup(unified / "parent", "cpuset cpu io memory pids")
    written: list[tuple[str, str]] = []

    def write_knob(path: Path, text: str) -> None:
        if "+io" in text.split():
            raise OSError(errno.EBUSY, "busy")
        written.append((path.parent.name, text))

    monkeypatch.setattr(cgroups, "write_knob", write_knob)
    cgroups.enable_controllers("parent/child")
    assert written == [(unified.name, "+cpuset"), (unified.name, "+memory"), (unified.name, "+pids"),
                       ("parent", "+cpuset"), ("parent", "+cpu"), ("parent", "+memory"), ("parent", "+pids")]


def test_nothing_is_handed_down_on_cgroup_v1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(cgroups, "v1_hierarchies", lambda: ("memory",))
    (tmp_path / "memory").mkdir()
    monkeypatch.setattr(cgroups, "enable_controllers", lambda path: pytest.fail("enabled on v1"))
    cgroups.PodCgroup("kubepods/pod1").create()
    assert (tmp_path / "memory" / "kubepods" / "pod1").is_dir()


def test_a_knob_is_written_only_where_cgroupfs_has_it(tmp_path: Path) -> None:
    # cgroupfs answers an open that may create a missing file with EACCES; without O_CREAT it is ENOENT,
    # which the wasm task server takes for a controller this kernel does not have.
    with pytest.raises(FileNotFoundError):
        cgroups.write_knob(tmp_path / "memory.max", "1")
    assert not (tmp_path / "memory.max").exists()
    (tmp_path / "memory.max").write_text("max\n")
    cgroups.write_knob(tmp_path / "memory.max", "4096")
    assert (tmp_path / "memory.max").read_text() == "4096"
