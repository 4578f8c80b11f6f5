"""Rootfs layers containerd marks `uidmap=`/`gidmap=` (a hostUsers: false container) are mounted
through an id-mapped view of the container's user namespace, as containerd's own mount code does."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from kuasar.common import mounts
from kuasar.common.errors import InvalidArgument
from tests.support.userns import namespace_holder

HOST_ID = 400000
MAPS = [f"uidmap=0:{HOST_ID}:65536", f"gidmap=0:{HOST_ID}:65536"]

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and user namespaces need root")


def test_split_id_maps_takes_containerds_options_out_of_the_kernels() -> None:
    rest, maps = mounts.split_id_maps(["index=off", "uidmap=0:1000:10", "lowerdir=/a", "gidmap=0:2000:10"])
    assert rest == ["index=off", "lowerdir=/a"]
    assert maps == {"uidmap": "0:1000:10", "gidmap": "0:2000:10"}
    assert mounts.split_id_maps(["ro"]) == (["ro"], {})


def test_parse_id_map_reads_containerds_triples_and_refuses_garbage() -> None:
    assert mounts.parse_id_map("0:1000:10,10:5000:1") == [(0, 1000, 10), (10, 5000, 1)]
    for bad in ("", "0:1000", "0:1000:10:4", "a:b:c", "0:-1:10", "0:1000:0"):
        with pytest.raises(InvalidArgument, match="container>:<host>:<size>"):
            mounts.parse_id_map(bad)


def overlay(tmp_path: Path, options: list[str]) -> tuple[SimpleNamespace, Path]:
    """An overlay like containerd's overlay snapshotter hands over: two layers owned by root on disk."""
    lowers = [tmp_path / "l1", tmp_path / "l2"]
    for i, lower in enumerate(lowers):
        (lower / "bin").mkdir(parents=True)
        (lower / "bin" / f"tool{i}").write_text("x")
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    os.chown(upper, HOST_ID, HOST_ID)  # the snapshotter chowns the upper dir to the mapped root
    m = SimpleNamespace(type="overlay", source="overlay",
                        options=[f"lowerdir={lowers[0]}:{lowers[1]}", f"upperdir={upper}", f"workdir={work}",
                                 *options])
    return m, tmp_path / "bundle" / "rootfs"


@root_only
def test_an_id_mapped_overlay_shows_the_layers_files_as_the_user_namespace_maps_them(tmp_path: Path) -> None:
    m, rootfs = overlay(tmp_path, MAPS)
    with namespace_holder(host_id=HOST_ID, net=False) as pid:
        mounts.mount_rootfs([m], rootfs, f"/proc/{pid}/ns/user")
    try:
        # Root-owned on disk, seen as the pod's root (HOST_ID) on the host: as uid 0 in the container.
        assert (rootfs / "bin" / "tool0").stat().st_uid == HOST_ID
        assert (rootfs / "bin" / "tool1").stat().st_gid == HOST_ID
        assert not (rootfs.parent / mounts.IDMAPPED_LAYERS).exists(), "the layers' views are detached at once"
        (rootfs / "new").write_text("y")  # lands in the upper dir
        assert (tmp_path / "upper" / "new").exists()
    finally:
        mounts.unmount_all(rootfs)
    assert not os.path.ismount(rootfs)


@root_only
def test_an_id_mapped_bind_rootfs_is_mapped_and_read_only_when_asked(tmp_path: Path) -> None:
    source = tmp_path / "fs"
    (source / "etc").mkdir(parents=True)
    m = SimpleNamespace(type="bind", source=str(source), options=["rbind", "ro", *MAPS])
    rootfs = tmp_path / "rootfs"
    with namespace_holder(host_id=HOST_ID, net=False) as pid:
        mounts.mount_rootfs([m], rootfs, f"/proc/{pid}/ns/user")
    try:
        assert (rootfs / "etc").stat().st_uid == HOST_ID
        with pytest.raises(OSError, match="Read-only"):
            (rootfs / "nope").write_text("z")
    finally:
        mounts.unmount_all(rootfs)


@root_only
def test_maps_other_than_the_user_namespaces_or_no_user_namespace_are_refused_and_mount_nothing(
        tmp_path: Path) -> None:
    m, rootfs = overlay(tmp_path, MAPS)
    with pytest.raises(InvalidArgument, match="joins no user namespace"):
        mounts.mount_rootfs([m], rootfs)
    with namespace_holder(host_id=HOST_ID + 65536, net=False) as pid:
        with pytest.raises(InvalidArgument, match="is not how user namespace"):
            mounts.mount_rootfs([m], rootfs, f"/proc/{pid}/ns/user")
    with namespace_holder(host_id=HOST_ID, net=False) as pid:
        tmpfs = SimpleNamespace(type="tmpfs", source="tmpfs", options=MAPS)
        with pytest.raises(InvalidArgument, match="only overlay and bind"):
            mounts.mount_rootfs([tmpfs], rootfs, f"/proc/{pid}/ns/user")
    half = SimpleNamespace(type="overlay", source="overlay", options=[o for o in m.options if "gidmap" not in o])
    with pytest.raises(InvalidArgument, match="both uidmap= and gidmap="):
        mounts.mount_rootfs([half], rootfs, "/proc/self/ns/user")
    assert not os.path.ismount(rootfs)
    assert not (rootfs.parent / mounts.IDMAPPED_LAYERS).exists()
