"""What a Quark sandbox binds into its containers' bundles, on a host whose mounts are shared (systemd
makes / shared), in a mount namespace of the test's own (`unshare -m`): nothing here touches the
host's mounts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="mounting in a namespace of its own needs root and unshare")


def on_a_shared_host(script: str, base: Path) -> list[str]:
    """Run `script` in a mount namespace of its own, with `root`: a tmpfs at base/root, shared as a
    systemd host's /, holding an image directory and a hostPath volume."""
    prelude = textwrap.dedent(f"""
        import os, subprocess, sys
        from pathlib import Path
        sys.path[:0] = [{str(REPO / "common")!r}, {str(REPO / "quark-sandboxer")!r}]
        from kuasar.common import mounts
        from kuasar.quark.quark_containers import QuarkContainers
        sh = lambda command: subprocess.run(command, shell=True, check=True)
        root = Path({str(base)!r}) / "root"
        root.mkdir()
        sh(f"mount -t tmpfs root {{root}} && mount --make-rshared {{root}}")
        (root / "image" / "etc").mkdir(parents=True)
        (root / "volume").mkdir()
        pod = QuarkContainers(root / "sandbox", {{}})

        def container(cid, options):
            image = {{"type": "bind", "source": str(root / "image"), "options": ["rbind"]}}
            return {{"task_id": cid, "rootfs": [image],
                    "spec": {{"mounts": [{{"destination": "/data", "type": "bind", "source": str(root / "volume"),
                                          "options": options}}]}}}}

        def read_only(path):
            return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    """)
    result = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c",
                             prelude + textwrap.dedent(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_a_volume_bound_into_one_container_shows_in_no_other(tmp_path: Path) -> None:
    # Both rootfs were binds of one image directory, peers of it: each volume bound below one of them
    # appeared below all, stacked, so the read-only container's /data was the writable one's.
    out = on_a_shared_host("""
        pod.append("ro", container("ro", ["rbind", "ro"]))
        pod.append("rw", container("rw", ["rbind"]))
        bundle = root / "sandbox"
        print(read_only(bundle / "ro" / "rootfs" / "data"), read_only(bundle / "rw" / "rootfs" / "data"))
        print(read_only(root / "volume"), os.path.ismount(root / "image" / "data"))  # the host's, untouched
        pod.remove("ro")
        pod.remove("rw")
        print(sorted(mounts.mount_points_under(str(root / "sandbox"))) == [], os.path.ismount(root / "volume"))
    """, tmp_path)
    assert out == ["True", "False", "False", "False", "True", "False"]


def test_removing_a_container_leaves_the_mounts_inside_its_hostpath_volume_alone(tmp_path: Path) -> None:
    # As a peer of the volume, each unmount of the container's copy of a submount reached the host's.
    out = on_a_shared_host("""
        sh(f"mount -t tmpfs data {root}/volume")  # a hostPath volume...
        (root / "volume" / "disk").mkdir()
        sh(f"mount -t tmpfs disk {root}/volume/disk")  # ...with a mount of its own below it
        (root / "volume" / "disk" / "precious").write_text("keep me")
        pod.append("c1", container("c1", ["rbind"]))
        print((root / "sandbox" / "c1" / "rootfs" / "data" / "disk" / "precious").exists())
        pod.remove("c1")
        left = sorted(mounts.mount_points_under(str(root / "volume")))
        print(left == [str(root / "volume"), str(root / "volume/disk")])
        print((root / "volume" / "disk" / "precious").exists())
    """, tmp_path)
    assert out == ["True", "True", "True"]


def test_a_directory_swapped_for_a_symlink_after_the_check_takes_no_bind_onto_the_host(tmp_path: Path) -> None:
    # The destination was resolved inside the rootfs and then bound by path: a pod writing its volume or
    # rootfs could swap a directory on the way for a symlink in between, and the bind, made in the host's
    # mount namespace, landed on a host path (29 of 300 tries in a review, /etc/cron.d among them).
    out = on_a_shared_host("""
        import kuasar.quark.quark_containers as qc
        from kuasar.common.errors import InvalidArgument
        host_dir = root / "host-etc"
        host_dir.mkdir()
        resolve = qc.resolve_in_root

        def swapped_after_the_check(rootfs, path):
            target = resolve(rootfs, path)
            (rootfs / "sub").rename(rootfs / "sub.real")
            (rootfs / "sub").symlink_to(host_dir)
            return target

        qc.resolve_in_root = swapped_after_the_check
        (root / "image" / "sub").mkdir()
        entry = {"task_id": "c1", "rootfs": [{"type": "bind", "source": str(root / "image"), "options": ["rbind"]}],
                 "spec": {"mounts": [{"destination": "/sub/cron.d", "type": "bind", "source": str(root / "volume"),
                                      "options": ["rbind"]}]}}
        try:
            pod.append("c1", entry)
        except InvalidArgument as err:
            print("refused" if "symbolic link" in str(err) else err)
        print(os.listdir(host_dir), os.path.ismount(host_dir / "cron.d"))
        print(mounts.mount_points_under(str(root / "sandbox")) == [])  # the failed Create took its rootfs down
    """, tmp_path)
    assert out == ["refused", "[]", "False", "True"]
