"""A real containerd 2.x with wasm-sandboxer as its `wasm` proxy sandboxer, and a wasm test image.

The modules are assembled from the WAT sources in tests/fixtures/wasm with `wasmtime.wat2wasm` (no
toolchain) into one linux/amd64 image whose rootfs holds `/<name>.wasm` for every source, plus a few
files the modules read (see `build_wasm_image`).
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import containerd as cd
from tests.support import images

from .conftest import Stack, integration_skip_reason, kill_task_server, start_sandboxer, stop_process

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "wasm"
WASM_IMAGE = "localhost/kuasar/wasm-tests:latest"
WASM_HANDLER = "kuasar-wasm"
GREETING = b"hello from the image rootfs\n"
WASM_RUNTIME = {
    "runtime_type": "io.containerd.kuasar-wasm.v1",
    "sandboxer": "wasm",
    # lets a container pick its engine with the io.kuasar.wasm.runtime annotation
    "container_annotations": ["io.kuasar.wasm.*"],
}


def assemble_modules(directory: Path = FIXTURES) -> dict[str, bytes]:
    """{name: module bytes} for every `<name>.wat` in `directory` (wat2wasm starts no thread)."""
    import wasmtime

    return {path.stem: bytes(wasmtime.wat2wasm(path.read_text())) for path in sorted(directory.glob("*.wat"))}


def build_wasm_image(dest: Path, ref: str = WASM_IMAGE,
                     extra_files: Mapping[str, images.FileSpec] | None = None) -> Path:
    """The test image: `/<name>.wasm` for each fixture, `/etc/greeting.txt`, a writable `/tmp`, and
    `/opt/app/main.wasm` -> `/hello.wasm` (a symlink, for relative and symlinked module names)."""
    files: dict[str, images.FileSpec] = {f"{name}.wasm": (data, 0o755) for name, data in assemble_modules().items()}
    files["etc/greeting.txt"] = GREETING
    files["opt/app/main.wasm"] = ("symlink", "/hello.wasm")
    files.update(extra_files or {})
    layer = images.build_layer({"etc": 0o755, "tmp": 0o1777, "opt": 0o755, "opt/app": 0o755}, files)
    return images.build_image(dest, ref, [layer], entrypoint=["/hello.wasm"], env=["PATH=/"])


@contextmanager
def wasm_stack(base: Path, *, bridge: str, subnet: str, config_text: str = "",
               extra_path: Sequence[str | Path] = (), log_level: str = "info") -> Iterator[Stack]:
    """containerd + wasm-sandboxer with the wasm test image, busybox (Linux containers in wasm pods) and
    the pause image CRI pins."""
    short = Path(f"/run/{bridge}-{secrets.token_hex(2)}")  # unix socket paths must stay short
    short.mkdir(mode=0o700)
    sandboxer_socket = short / "wasm.sock"
    sandboxer_dir = short / "wasm"
    image_dir = base / "images"
    wasm_tar = build_wasm_image(image_dir / "wasm.tar")
    pause_tar = images.build_pause_image(image_dir / "pause.tar")
    busybox_tar = images.build_busybox_image(image_dir / "busybox.tar")  # for a wasm pod's Linux containers
    instance = cd.ContainerdInstance(base / "containerd", sandboxers={"wasm": str(sandboxer_socket)},
                                     runtimes={WASM_HANDLER: WASM_RUNTIME}, bridge=bridge, subnet=subnet,
                                     extra_path=extra_path, log_level=log_level)
    instance.sock_dir = short / "cd"  # containerd's own sockets, next to ours
    instance.address = str(instance.sock_dir / "containerd.sock")
    instance.ttrpc_address = str(instance.sock_dir / "containerd.sock.ttrpc")
    extra: tuple[str, ...] = ()
    if config_text:
        config = base / "wasm-sandboxer.toml"
        config.write_text(config_text)
        extra = ("--config", str(config))
    instance.start()
    current: Stack | None = None
    try:
        instance.import_image(wasm_tar)
        instance.import_image(pause_tar)
        instance.import_image(busybox_tar)
        sandboxer_log = base / "wasm-sandboxer.log"
        sandboxer = start_sandboxer(sandboxer_socket, sandboxer_dir, sandboxer_log, instance.ttrpc_address,
                                    module="kuasar.wasm.cli", extra_args=extra)
        current = Stack(instance, sandboxer, sandboxer_socket, sandboxer_dir, sandboxer_log, base / "logs")
        yield current
    finally:
        instance.stop()
        if current is not None:
            stop_process(current.sandboxer)
        kill_task_server(sandboxer_dir)
        if (sandboxer_dir / "task-server.log").exists():  # keep it for post-mortems
            shutil.copy(sandboxer_dir / "task-server.log", base / "task-server.log")
        shutil.rmtree(short, ignore_errors=True)


def stack_fixture(factory: pytest.TempPathFactory, bridge: str, subnet: str) -> Iterator[Stack]:
    """Body of a test module's `stack` fixture (each module names its own bridge and subnet)."""
    reason = integration_skip_reason()
    if reason:
        pytest.skip(reason)
    with wasm_stack(factory.mktemp("wasm"), bridge=bridge, subnet=subnet) as current:
        yield current
