"""The gVisor pod's pause rootfs on a mount runsc's gofer cannot bind read-only: systemd mounts /run
(the default --dir's) noexec, and the gofer's remount in its own user namespace, which would clear that
flag, failed with EPERM, so no host-network gVisor pod started on a systemd host. There the rootfs gets
a tmpfs of its own."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kuasar.common import linux, mounts
from kuasar.common.pod_holder import pause_program
from kuasar.quark import gvisor_pod


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[list[Path]]:
    if os.geteuid() != 0 or not gvisor_pod.is_static_elf(Path(gvisor_pod.DEFAULT_BUSYBOX)):
        pytest.skip("needs root and a static busybox")
    made: list[Path] = []
    try:
        yield made
    finally:
        for point in reversed(made):
            mounts.unmount_all(point)


def tmpfs(path: Path, options: str, made: list[Path]) -> Path:
    path.mkdir()
    linux.mount("tmpfs", str(path), "tmpfs", 0, "size=8m")
    made.append(path)
    if options:  # the flags as systemd sets them: by a remount
        subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)
    return path


@pytest.mark.parametrize("options", ["noexec", "strictatime", "noatime"])
def test_on_a_mount_the_gofer_cannot_bind_the_rootfs_is_a_tmpfs_of_its_own(tmp_path: Path, mounted: list[Path],
                                                                          options: str) -> None:
    directory = tmpfs(tmp_path / "run", f"nosuid,nodev,{options}", mounted)
    assert gvisor_pod.gofer_cannot_bind_here(directory)
    rootfs = gvisor_pod.ensure_pause_rootfs(directory, pause=pause_program())
    mounted.append(rootfs)
    assert mounts.is_mountpoint(rootfs) and not gvisor_pod.gofer_cannot_bind_here(rootfs)
    assert (rootfs / "bin" / "busybox").is_file() and os.readlink(rootfs / "bin" / "sleep") == "busybox"
    # Found again (another pod, a restarted sandboxer), not mounted over.
    assert gvisor_pod.ensure_pause_rootfs(directory, pause=pause_program()) == rootfs
    assert len([line for line in Path("/proc/self/mounts").read_text().splitlines()
                if line.split()[1] == str(rootfs)]) == 1


def test_an_upgraded_pause_is_copied_into_the_tmpfs_rootfs(tmp_path: Path, mounted: list[Path]) -> None:
    pause = pause_program()
    if pause is None:
        pytest.skip("kuasar-pause is not built (make setup)")
    directory = tmpfs(tmp_path / "run", "noexec", mounted)
    rootfs = gvisor_pod.ensure_pause_rootfs(directory, pause=pause)
    mounted.append(rootfs)
    (rootfs / gvisor_pod.PAUSE_IN_ROOTFS).write_bytes(b"an older build")
    assert gvisor_pod.ensure_pause_rootfs(directory, pause=pause) == rootfs
    assert (rootfs / gvisor_pod.PAUSE_IN_ROOTFS).read_bytes() == Path(pause).read_bytes()
    assert sorted(p.name for p in (rootfs / "bin").iterdir()) == ["busybox", "kuasar-pause", "sleep"]


def test_on_a_plain_mount_the_rootfs_is_a_directory(tmp_path: Path, mounted: list[Path]) -> None:
    directory = tmpfs(tmp_path / "plain", "", mounted)
    assert not gvisor_pod.gofer_cannot_bind_here(directory)
    rootfs = gvisor_pod.ensure_pause_rootfs(directory)
    assert rootfs.is_dir() and not mounts.is_mountpoint(rootfs)
