"""What the VM sandboxer binds into a VM's shared directory, and takes down again, in a mount namespace
of the test's own (`unshare -m`), so nothing here touches the host's mounts."""

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


def in_own_mount_namespace(script: str, base: Path) -> str:
    prelude = textwrap.dedent(f"""
        import subprocess, sys
        from pathlib import Path
        sys.path[:0] = [{str(REPO / "common")!r}, {str(REPO / "vmm-sandboxer")!r}]
        from kuasar.common import linux, mounts
        from kuasar.vmm import hostfs
        base = Path({str(base)!r})
        sh = lambda command: subprocess.run(command, shell=True, check=True)
    """)
    result = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c",
                             prelude + textwrap.dedent(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_taking_a_shared_volume_down_leaves_the_mounts_inside_its_source_alone(tmp_path: Path) -> None:
    # The bind joined the source's peer group (mounts are shared on a systemd host), so unmounting
    # its copy's submounts, one by one, unmounted the same mounts in the host's volume.
    out = in_own_mount_namespace("""
        root = base / "root"
        root.mkdir()
        sh(f"mount -t tmpfs root {root} && mount --make-rshared {root}")  # the host's / under systemd
        (root / "data").mkdir()
        sh(f"mount -t tmpfs data {root}/data")  # a hostPath volume...
        (root / "data" / "disk").mkdir()
        sh(f"mount -t tmpfs disk {root}/data/disk")  # ...with a mount of its own below it
        (root / "data" / "disk" / "precious").write_text("keep me")
        container = root / "vm" / "shared" / "c1"
        container.mkdir(parents=True)
        hostfs.bind(str(root / "data"), container / "volumes" / "0", readonly=False)
        assert (container / "volumes" / "0" / "disk" / "precious").exists()
        hostfs.remove_tree(container)
        print(sorted(mounts.mount_points_under(str(root / "data"))) == [str(root / "data"), str(root / "data/disk")])
        print((root / "data" / "disk" / "precious").exists())
    """, tmp_path)
    assert out.split() == ["True", "True"]


def test_a_read_only_volume_is_read_only_all_the_way_down(tmp_path: Path) -> None:
    # Only the top mount was remounted read-only: a mount inside a readOnly volume stayed writable to
    # the guest.
    out = in_own_mount_namespace("""
        source, target = base / "src", base / "dst"
        (source / "sub").mkdir(parents=True)
        sh(f"mount -t tmpfs sub {source}/sub")
        hostfs.bind(str(source), target, readonly=True)
        for path in (target / "top.txt", target / "sub" / "nested.txt"):
            try:
                path.write_text("x")
                print("writable")
            except OSError:
                print("refused")
        (source / "sub" / "from-host.txt").write_text("the source itself stays writable")
        print("ok")
    """, tmp_path)
    assert out.split() == ["refused", "refused", "ok"]


def test_the_guest_cannot_plant_symlinks_where_the_host_mounts_or_deletes(tmp_path: Path) -> None:
    # QEMU serves the shared directory to the guest as root: a symlink the guest made there at
    # .volumes/<n> had the host bind a guest-writable volume over a host directory, one at <id> had
    # Delete unmount another pod's mounts (or, pointing at /, every mount on the host), and one at
    # .volumes had the host delete a host directory's contents. The guest now gets a read-only view;
    # the host makes entries beside it and mounts onto it.
    out = in_own_mount_namespace("""
        import errno, json, os
        from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
        from kuasar.vmm.proxy import HostPrep
        vm = base / "vm"
        vm.mkdir()
        source, view = vm / "shared.host", vm / "shared"
        source.mkdir()
        hostfs.read_only_view(source, view)
        host_dir = base / "host-etc"
        host_dir.mkdir()
        (host_dir / "keep").write_text("x")
        refused = []
        for planted in (view / ".volumes", view / "c1", view / "x"):  # what the guest would do
            try:
                os.symlink(host_dir, planted)
            except OSError as err:
                refused.append(err.errno == errno.EROFS)
        print(all(refused) and len(refused) == 3)
        volume, bundle = base / "emptydir", base / "bundle"
        volume.mkdir()
        (bundle / "rootfs").mkdir(parents=True)
        mount = {"destination": "/data", "type": "bind", "source": str(volume), "options": ["rbind", "rw"]}
        (bundle / "config.json").write_text(json.dumps({"process": {"args": ["sh"]}, "root": {"path": "rootfs"},
                                                        "mounts": [mount]}))
        prep = HostPrep(view, "/run/kuasar/state", source=source)
        prep.prepare(task.CreateTaskRequest(id="c1", bundle=str(bundle)))
        # What the guest sees: its bundle, and its rootfs and volume writable (they are mounts of their own).
        print(json.loads((view / "c1" / "config.json").read_text())["root"]["path"] == "rootfs")
        (view / "c1" / "rootfs" / "written-by-guest").write_text("y")
        (view / ".volumes" / "0" / "in-volume").write_text("z")
        print((bundle / "rootfs" / "written-by-guest").exists(), (volume / "in-volume").exists())
        print(mounts.mount_points_under(str(source)) == [])  # mounts are on the view only
        prep.cleanup("c1")
        print(mounts.mount_points_under(str(vm)) == [str(view)], os.listdir(source) == [".volumes"])
        hostfs.remove_tree(vm)
        print(vm.exists(), sorted(os.listdir(host_dir)), (volume / "in-volume").exists())
    """, tmp_path)
    assert out.split() == ["True", "True", "True", "True", "True", "True", "True", "False", "['keep']", "True"], out
