"""The pod's /etc files: containerd's resolv.conf layout, mounts added only where the spec has none."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kuasar.common.errors import InvalidArgument
from kuasar.common.mounts import mount_tmpfs, unmount_all
from kuasar.common.pod_files import (
    add_pod_file_mounts,
    pod_dir,
    pod_file_contents,
    pod_resolv_conf,
    resolv_conf,
    write_pod_files,
)


def test_resolv_conf_is_laid_out_as_containerd_writes_it() -> None:
    assert resolv_conf(["1.1.1.1", "8.8.8.8"], ["a.local", "b"], ["ndots:5", "edns0"]) == (
        "search a.local b\nnameserver 1.1.1.1\nnameserver 8.8.8.8\noptions ndots:5 edns0\n")
    assert resolv_conf([], [], []) == ""


def test_files_are_written_readable_and_bad_entries_refused(tmp_path: Path) -> None:
    path = tmp_path / "pods" / "p1"
    write_pod_files(path, pod_file_contents("web-1", (["10.0.0.1"], [], [])))
    assert (path / "hostname").read_text() == "web-1\n"
    assert (path / "resolv.conf").read_text() == "nameserver 10.0.0.1\n"
    assert (path / "hosts").read_bytes() == Path("/etc/hosts").read_bytes()
    assert oct((path / "hosts").stat().st_mode & 0o777) == "0o644"
    with pytest.raises(InvalidArgument):
        pod_file_contents("h", (["10.0.0.1\nnameserver 6.6.6.6"], [], []))
    with pytest.raises(InvalidArgument):
        pod_file_contents("../etc", None)
    with pytest.raises(InvalidArgument):
        pod_dir(tmp_path, "../escape")


def test_mounts_are_added_only_where_the_spec_mounts_nothing(tmp_path: Path) -> None:
    files, rootfs = tmp_path / "pod", tmp_path / "rootfs"
    write_pod_files(files, pod_file_contents("h", None))
    rootfs.mkdir()
    spec = {"root": {"path": "rootfs", "readonly": True},
            "mounts": [{"destination": "/etc/hosts", "type": "bind", "source": "/mine"}]}
    assert add_pod_file_mounts(spec, files, rootfs) == ["/etc/hostname", "/etc/resolv.conf"]
    added = {m["destination"]: m for m in spec["mounts"]}
    assert added["/etc/hosts"]["source"] == "/mine"
    assert added["/etc/resolv.conf"]["options"] == ["rbind", "rprivate", "ro"]
    assert add_pod_file_mounts({}, tmp_path / "missing", rootfs) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")
def test_a_read_only_rootfs_without_the_file_gets_no_mount(tmp_path: Path) -> None:
    files, rootfs = tmp_path / "pod", tmp_path / "rootfs"
    write_pod_files(files, pod_file_contents("h", None))
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (rootfs / "etc" / "resolv.conf").mkdir()  # something else is there: not ours to cover
    subprocess.run(["mount", "--bind", str(rootfs), str(rootfs)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(rootfs)], check=True)
        assert add_pod_file_mounts({}, files, rootfs) == ["/etc/hosts"]  # it exists: a bind needs no write
    finally:
        subprocess.run(["umount", str(rootfs)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_the_pods_dev_shm_replaces_only_the_default_private_tmpfs(tmp_path: Path) -> None:
    files, rootfs = tmp_path / "pod", tmp_path / "rootfs"
    write_pod_files(files, pod_file_contents("h", None))
    rootfs.mkdir()
    default_shm = {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                   "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}
    assert "/dev/shm" not in add_pod_file_mounts({"mounts": [dict(default_shm)]}, files, rootfs)  # no shm yet
    mount_tmpfs(files / "shm", 1 << 20)
    try:
        spec = {"mounts": [{"destination": "/proc", "type": "proc"}, dict(default_shm)]}
        assert "/dev/shm" in add_pod_file_mounts(spec, files, rootfs)
        assert spec["mounts"][1] == {"destination": "/dev/shm", "type": "bind", "source": str(files / "shm"),
                                     "options": ["rbind", "rprivate", "rw"]}
        assert len([m for m in spec["mounts"] if m["destination"] == "/dev/shm"]) == 1
        host = {"destination": "/dev/shm", "type": "bind", "source": "/dev/shm", "options": ["rbind"]}
        spec = {"mounts": [dict(host)]}
        assert "/dev/shm" not in add_pod_file_mounts(spec, files, rootfs)  # CRI's host /dev/shm stays
        assert [m for m in spec["mounts"] if m["destination"] == "/dev/shm"] == [host]
        spec = {}
        assert "/dev/shm" in add_pod_file_mounts(spec, files, rootfs)
    finally:
        unmount_all(files / "shm")


def test_an_empty_dns_config_means_the_hosts_resolv_conf(tmp_path: Path) -> None:
    # containerd gives the host's file for a DNSConfig with nothing in it (crictl's `dns_config: {}`);
    # the pod got an empty resolv.conf, so no DNS at all.
    host = tmp_path / "resolv.conf"
    host.write_text("nameserver 192.0.2.53\n")
    assert pod_resolv_conf(([], [], []), host) == b"nameserver 192.0.2.53\n"
    assert pod_resolv_conf(None, host) == b"nameserver 192.0.2.53\n"
    assert pod_resolv_conf((["10.0.0.1"], [], []), host) == b"nameserver 10.0.0.1\n"
    assert pod_resolv_conf(([], [], []), tmp_path / "none") == b""
    assert pod_file_contents("h", ([], [], []))["resolv.conf"] == Path("/etc/resolv.conf").read_bytes()


def test_a_hostname_with_a_nul_is_refused() -> None:
    # It was written to the hostname file, then made kuasar-pause's spawn fail with a ValueError.
    with pytest.raises(InvalidArgument):
        pod_file_contents("web\0x", None)


def test_a_hostname_longer_than_linux_takes_is_refused() -> None:
    # sethostname(2) refused it in the pod process, at Start, as an UNKNOWN error.
    assert pod_file_contents("h" * 64, None)["hostname"] == b"h" * 64 + b"\n"
    with pytest.raises(InvalidArgument):
        pod_file_contents("h" * 65, None)


def test_an_images_symlinks_are_followed_inside_its_rootfs(tmp_path: Path) -> None:
    # An /etc/resolv.conf linked to a file the image lacks (systemd-resolved's) got no mount, and an
    # absolute link was followed on the host: whether the pod's DNS reached the container depended on
    # the host's files. runc follows the link inside the rootfs and makes the missing file there.
    files, rootfs = tmp_path / "pod", tmp_path / "rootfs"
    write_pod_files(files, pod_file_contents("h", None))
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
    (rootfs / "etc" / "hosts").symlink_to("/no-such-file-on-the-host")
    (rootfs / "etc" / "hostname").symlink_to("/etc")  # a directory, inside the rootfs
    assert add_pod_file_mounts({}, files, rootfs) == ["/etc/hosts", "/etc/resolv.conf"]
    (rootfs / "etc" / "hosts").unlink()
    (rootfs / "etc" / "hosts").symlink_to("hosts")  # a loop: runc would fail on it
    assert add_pod_file_mounts({}, files, rootfs) == ["/etc/resolv.conf"]
