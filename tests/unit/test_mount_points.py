"""Reading mount points back from /proc/self/mountinfo, for names the kernel escapes or leaves as raw bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kuasar.common import linux
from kuasar.common.mounts import mount_points_under
from kuasar.quark import quark_containers
from kuasar.vmm import hostfs

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")

# A space and a backslash (written as octal escapes), non-ASCII UTF-8, and a byte that is not UTF-8.
ODD_NAMES = ["with space", "back\\slash", "volume é ü", os.fsdecode(b"latin1-\xe9")]


@root_only
@pytest.mark.parametrize("name", ODD_NAMES)
def test_a_mount_point_with_an_odd_name_is_found_and_taken_down(tmp_path: Path, name: str) -> None:
    target = tmp_path / "rootfs" / name
    target.mkdir(parents=True)
    linux.mount("tmpfs", str(target), "tmpfs", 0, "size=64k")
    try:
        assert mount_points_under(tmp_path) == [str(target)]
        assert mount_points_under(tmp_path / "elsewhere", tmp_path / "rootfs") == [str(target)]
        assert mount_points_under(tmp_path / "rootf") == []  # a prefix of the name is not below it
        assert hostfs.mounts_under(tmp_path) == [str(target)]
        # Quark read `é` back as `Ã©` (each UTF-8 byte as a character) and so never unmounted it.
        assert quark_containers.mounts_under(tmp_path) == [target]
        assert quark_containers.unmount_all_under(tmp_path) == []
        assert not os.path.ismount(target)
    finally:
        if os.path.ismount(target):
            linux.umount(str(target), linux.MNT_DETACH)


@root_only
def test_nested_mount_points_come_deepest_first(tmp_path: Path) -> None:
    outer, inner = tmp_path / "a", tmp_path / "a" / "b c"
    outer.mkdir()
    linux.mount("tmpfs", str(outer), "tmpfs", 0, "size=64k")
    try:
        inner.mkdir()
        linux.mount("tmpfs", str(inner), "tmpfs", 0, "size=64k")
        assert mount_points_under(tmp_path) == [str(inner), str(outer)]
        assert hostfs.unmount_tree(tmp_path) == []
    finally:
        for point in (inner, outer):
            if os.path.ismount(point):
                linux.umount(str(point), linux.MNT_DETACH)
