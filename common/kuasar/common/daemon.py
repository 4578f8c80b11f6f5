"""Run one resident sandboxer: config, logging, recovery, the Sandbox API server, clean SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from . import sd_notify
from .config import DaemonConfig
from .controller import SandboxController
from .lean import serve_until
from .sandboxer import Sandboxer

log = logging.getLogger(__name__)

# How often the sandboxer looks whether sandboxes were removed (and their garbage can be collected).
GARBAGE_CHECK_INTERVAL = 2.0


def prepare(config: DaemonConfig,
            make_sandboxer: Callable[[DaemonConfig], Sandboxer]) -> tuple[Sandboxer, dict[str, str]]:
    """Everything before the event loop: returns the sandboxer and systemd's notification variables."""
    systemd = sd_notify.take_environment()  # before any child (task server, runc) is started
    config.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config.dir.chmod(0o700)  # sockets, bundles and state live here: root only
    sandboxer = make_sandboxer(config)
    sandboxer.prepare()
    return sandboxer, systemd


async def serve(config: DaemonConfig, sandboxer: Sandboxer, systemd: dict[str, str]) -> None:
    # Imported only now: a task server forked in prepare() must not carry the gRPC server's modules.
    from .sandbox_api import SandboxApiServer

    await sandboxer.open()
    controller = SandboxController(sandboxer, config.dir / "sandboxes")
    await controller.recover()
    server = SandboxApiServer(controller, config.listen)
    await server.start()
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
