"""A containerd + runc-sandboxer stack with a fixed bridge, subnet and socket folder of its own.

The shared `stack` fixture (conftest.py) picks a random bridge; tests that run beside other stacks on the
same machine for minutes (churn) or restart containerd (which re-creates its CNI state) name theirs.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.support import containerd as cd
from tests.support import images

from .conftest import BUSYBOX, Stack, kill_task_server, start_sandboxer, stop_process


@contextmanager
def private_stack(base: Path, *, bridge: str, subnet: str, extra_path: Sequence[str | Path] = (),
                  log_level: str = "info") -> Iterator[Stack]:
    short = Path(f"/run/{bridge}-{secrets.token_hex(2)}")  # unix socket paths must stay short
    short.mkdir(mode=0o700)
    sandboxer_socket = short / "runc.sock"
    sandboxer_dir = short / "runc"
    image_dir = base / "images"
    busybox_tar = images.build_busybox_image(image_dir / "busybox.tar", ref=BUSYBOX)
    pause_tar = images.build_pause_image(image_dir / "pause.tar")
    instance = cd.ContainerdInstance(base / "containerd", sandboxers={"runc": str(sandboxer_socket)},
                                     bridge=bridge, subnet=subnet, extra_path=extra_path, log_level=log_level)
    instance.sock_dir = short / "cd"  # containerd's own sockets, next to ours
    instance.address = str(instance.sock_dir / "containerd.sock")
    instance.ttrpc_address = str(instance.sock_dir / "containerd.sock.ttrpc")
    instance.start()
    current: Stack | None = None
    try:
        instance.import_image(busybox_tar)
        instance.import_image(pause_tar)
        sandboxer_log = base / "runc-sandboxer.log"
        sandboxer = start_sandboxer(sandboxer_socket, sandboxer_dir, sandboxer_log, instance.ttrpc_address)
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
