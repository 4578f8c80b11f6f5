"""Run one resident sandboxer: config, logging, recovery, the Sandbox API server, clean SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from . import linux, sd_notify
from .config import DaemonConfig
from .controller import SandboxController
from .errors import FailedPrecondition, InvalidArgument
from .lean import serve_until
from .sandboxer import Sandboxer

log = logging.getLogger(__name__)

# How often the sandboxer looks whether sandboxes were removed (and their garbage can be collected).
GARBAGE_CHECK_INTERVAL = 2.0


def prepare(config: DaemonConfig,
            make_sandboxer: Callable[[DaemonConfig], Sandboxer]) -> tuple[Sandboxer, dict[str, str]]:
    """Everything before the event loop: returns the sandboxer and systemd's notification variables."""
    systemd = sd_notify.take_environment()  # before any child (task server, runc) is started
    # Checked before a task server or anything else of ours is started.
    _own_directory(config.dir)
    _check_listen(config.listen)
    sandboxer = make_sandboxer(config)
    sandboxer.prepare()
    return sandboxer, systemd


def _own_directory(directory: Path) -> None:
    """Sockets, bundles and state live in `--dir`: root's alone (0700). A directory others may write
    to (/tmp, /run itself) is refused rather than taken over: chmod would lock everyone else out."""
    try:
        directory.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        mode = directory.stat().st_mode
        if not stat.S_ISDIR(mode):
            raise InvalidArgument(f"--dir {directory} is not a directory") from None
        if mode & (stat.S_IWGRP | stat.S_IWOTH | stat.S_ISVTX):
            raise InvalidArgument(f"--dir {directory} is shared (mode {stat.filemode(mode)}); "
                                  "give the sandboxer a directory of its own") from None
    directory.chmod(0o700)


def _check_listen(listen: Path) -> None:
    if len(os.fsencode(listen)) > linux.SOCKET_PATH_MAX:
        raise InvalidArgument(f"--listen {listen} is longer than a unix socket path may be "
                              f"({linux.SOCKET_PATH_MAX} bytes)")
    # A directory we make is ours alone; /run/kuasar is shared by every type's sandboxer, which
    # systemd may start at once.
    listen.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        mode = listen.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        # Start-up replaces a dead socket; anything else there (a config file named by mistake) stays.
        raise InvalidArgument(f"--listen {listen} exists and is not a socket ({stat.filemode(mode)}); "
                              "it is left alone: name a socket path")
    refuse_served_socket(listen)


def refuse_served_socket(listen: Path) -> None:
    """Refuse to start when something answers on `--listen`: starting would unlink the socket of a
    running sandboxer (another --dir, same default --listen) and leave it unreachable. A socket nobody
    answers on is a dead one's, replaced at start."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(listen))
    except OSError:
        return
    finally:
        probe.close()
    raise FailedPrecondition(f"another process serves {listen}; stop it or choose another --listen")


async def serve(config: DaemonConfig, sandboxer: Sandboxer, systemd: dict[str, str]) -> None:
    # Imported only now: a task server forked in prepare() must not carry the gRPC server's modules.
    from .sandbox_api import SandboxApiServer

    controller = SandboxController(sandboxer, config.dir / "sandboxes")
    # Served from the start, its calls held until the sandboxes are recovered: containerd (re)starting
    # meanwhile asks each pod's Status once, and keeps a pod it cannot get it for as UNKNOWN for good (no
    # new container in it). systemd still hears READY only once they are recovered.
    recovered = asyncio.Event()
    server = SandboxApiServer(controller, config.listen, recovered)
    await server.start()
    try:
        await sandboxer.open()
        await controller.recover()
    except BaseException:
        await server.stop(0)
        raise
    recovered.set()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log.info("%s sandboxer ready (dir=%s)", sandboxer.name, config.dir)
    sd_notify.ready(f"serving {config.listen}", systemd)
    watchdog = sd_notify.start_watchdog(systemd)
    await serve_until(stopping, GARBAGE_CHECK_INTERVAL, lambda: len(controller.records))
    log.info("shutting down; running pods are left to the task server")
    sd_notify.stopping(systemd)
    if watchdog is not None:
        watchdog.cancel()
    await server.stop()
    await controller.close()
    await sandboxer.close()
