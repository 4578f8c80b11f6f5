"""The test harness itself against a real containerd 2.x: config, proxy plugin, images, ctr run, cleanup."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import ContainerdInstance, mounts_under, skip_reason
from tests.support.images import BUSYBOX_REF, PAUSE_REF, build_busybox_image, build_pause_image

_SKIP = skip_reason()
pytestmark = [pytest.mark.integration, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

DUMMY_SANDBOXER = "kuasar-dummy"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("images")
    return {
        BUSYBOX_REF: build_busybox_image(out / "busybox.tar"),
        PAUSE_REF: build_pause_image(out / "pause.tar"),
    }


@pytest.fixture(scope="module")
def containerd(
    tmp_path_factory: pytest.TempPathFactory, images: dict[str, Path]
) -> Iterator[ContainerdInstance]:
    base = tmp_path_factory.mktemp("containerd")
    # Nothing listens on the proxy socket: containerd only dials it when a pod uses that sandboxer.
    instance = ContainerdInstance(base, sandboxers={DUMMY_SANDBOXER: str(base / "dummy.sock")})
    instance.start()
    try:
        for tarball in images.values():
            instance.import_image(tarball)
        yield instance
    finally:
        instance.stop()


def test_images_are_reproducible(tmp_path: Path, images: dict[str, Path]) -> None:
    again = build_busybox_image(tmp_path / "busybox.tar")
    assert again.read_bytes() == images[BUSYBOX_REF].read_bytes()


def test_socket_paths_fit(containerd: ContainerdInstance) -> None:
    for sock in (containerd.address, containerd.ttrpc_address):
        assert len(sock.encode()) < 108
        assert Path(sock).is_socket()


def test_proxy_sandboxer_is_registered(containerd: ContainerdInstance) -> None:
    controllers = {
        p["id"]: p for p in containerd.plugins() if p["type"] == "io.containerd.sandbox.controller.v1"
    }
    assert DUMMY_SANDBOXER in controllers, controllers
    assert controllers[DUMMY_SANDBOXER]["status"] == "ok"


def test_cri_plugin_is_up(containerd: ContainerdInstance) -> None:
    statuses = {(p["type"], p["id"]): p["status"] for p in containerd.plugins()}
    assert statuses.get(("io.containerd.grpc.v1", "cri")) == "ok", statuses


def test_images_imported(containerd: ContainerdInstance) -> None:
    names = containerd.images()
    assert BUSYBOX_REF in names
    assert PAUSE_REF in names


def test_ctr_run_busybox(containerd: ContainerdInstance) -> None:
    script = "echo hello; id -u; ls /bin/sh"
    res = containerd.ctr("run", "--rm", BUSYBOX_REF, "harness-t1", "sh", "-c", script)
    assert res.stdout.split() == ["hello", "0", "/bin/sh"], res


def test_stop_cleans_up(tmp_path: Path, images: dict[str, Path]) -> None:
    instance = ContainerdInstance(tmp_path / "cd", bridge="kuasar-t1", subnet="10.241.0.0/16")
    instance.start()
    pid = instance.pid
    assert pid is not None
    instance.import_image(images[BUSYBOX_REF])
    # leave a running task behind: stop() must kill it, its shim and its rootfs mount
    instance.ctr("run", "-d", BUSYBOX_REF, "harness-sleeper", "sleep", "600")
    assert mounts_under(instance.state_dir), "a running container should have its rootfs mounted"
    instance.stop()
    assert not instance.running()
    assert not os.path.exists(f"/proc/{pid}/cmdline") or _is_zombie(pid)
    assert mounts_under(tmp_path, instance.sock_dir) == []
    for d in (instance.root_dir, instance.state_dir, instance.sock_dir):
        assert not d.exists(), d
    assert not Path("/sys/class/net/kuasar-t1").exists()
    assert instance.log_path.exists()  # the log is kept for post-mortems
    leftovers = [p for p in _shims() if instance.address in p[1]]
    assert leftovers == []


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _shims() -> list[tuple[int, str]]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "containerd-shim" in cmd and not _is_zombie(int(entry)):
            out.append((int(entry), cmd))
    return out


def test_restart_keeps_images(tmp_path: Path, images: dict[str, Path]) -> None:
    with ContainerdInstance(tmp_path / "cd", bridge="kuasar-t2", subnet="10.242.0.0/16") as instance:
        instance.import_image(images[BUSYBOX_REF])
        old_pid = instance.pid
        instance.restart()
        assert instance.pid != old_pid
        assert BUSYBOX_REF in instance.images()
