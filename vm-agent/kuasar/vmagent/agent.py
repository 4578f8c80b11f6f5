"""The agent: PID-1 start-up in the guest, then the ttrpc services on vsock port 1024.

`init_main()` is what the image's `/init` runs. The service assembly (`Agent`) also runs on a host
over a unix socket (`vm-agent serve`), which is how its request handling is unit-tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from kuasar.common.reaper import Reaper
from kuasar.common.spawn import run
from kuasar.common.streaming_io import StreamHub
from kuasar.common.task_api import register_task_service
from kuasar.common.ttrpc import TtrpcServer

from . import pid1
from .config import AgentConfig
from .console import DebugConsole
from .events import EventQueue
from .netconf import NetConfig
from .portforward import PortForwardService
from .sandbox import AgentService
from .tasks import GuestTasks

log = logging.getLogger("vm-agent")

HOST_CID = 2  # VMADDR_CID_HOST
READY_LINE = b"READY\n"
# The host listens on <uds>_<notify port> before QEMU starts; retries only cover a slow backend.
NOTIFY_ATTEMPTS = 100
NOTIFY_RETRY = 0.1
# Loaded once the agent serves (not needed to get there).
LATE_MODULES = ["overlay"]


async def _ip_runner(reaper: Reaper, argv: list[str]) -> tuple[int, str]:
    result = await run(reaper, ["/bin/busybox", *argv])
    return result.status, result.stderr.decode(errors="replace")


class Agent:
    """The services of one guest, wired together."""

    def __init__(self, config: AgentConfig, *, started_ns: int, share_dir: str = "", pid1_mode: bool = False,
                 pivot_root: bool = True) -> None:
        self.config = config
        self.reaper = Reaper()
        self.server = TtrpcServer()
        self.hub = StreamHub()
        self.events = EventQueue()
        self.tasks = GuestTasks(self.reaper, self.hub, self.events, Path(config.state_dir), share_dir or None,
                                config.runc, no_pivot=not pivot_root)
        self.net = NetConfig(lambda argv: _ip_runner(self.reaper, argv))
        self.service = AgentService(self.reaper, self.events, self.net, started_ns=started_ns, share_dir=share_dir,
                                    pivot_root=pivot_root, poweroff=pid1.power_off if pid1_mode else None,
                                    stop_containers=self.tasks.stop_all)
        self.hub.register(self.server)
        register_task_service(self.server, self.tasks)
        self.service.register(self.server)
        self._background: set[asyncio.Task[None]] = set()

    def start_background(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def start(self, listener: socket.socket) -> None:
        self.reaper.install()
        await self.server.add_listener(listener)
        self.service.ready_ns = pid1.boottime_ns()

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await self.server.close()


def vsock_listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(64)
    return sock


async def notify_host(port: int) -> None:
    """Tell the host we serve: connect to CID 2 `port` (the host's `<uds>_<port>`) and say READY."""
    loop = asyncio.get_running_loop()
    for attempt in range(NOTIFY_ATTEMPTS):
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (HOST_CID, port))
            await loop.sock_sendall(sock, READY_LINE)
            log.info("told the host on port %d that the agent is ready (attempt %d)", port, attempt + 1)
            return
        except OSError as err:
            log.debug("ready notification to port %d: %s", port, err)
        finally:
            sock.close()
        await asyncio.sleep(NOTIFY_RETRY)
    log.error("could not tell the host on port %d that the agent is ready", port)


async def serve_guest(config: AgentConfig, started_ns: int, share_dir: str, pivot_root: bool,
                      modules: pid1.ModuleSet) -> None:
    agent = Agent(config, started_ns=started_ns, share_dir=share_dir, pid1_mode=True, pivot_root=pivot_root)
    await agent.start(vsock_listener(config.port))
    log.info("serving Task, Streaming and Agent on vsock port %d (%.3f s after boot, %.3f s after /init)",
             config.port, agent.service.ready_ns / 1e9, (agent.service.ready_ns - started_ns) / 1e9)
    if config.forward_port:
        agent.start_background(PortForwardService().serve(vsock_listener(config.forward_port)), "port forward")
    if config.debug:
        console = DebugConsole(agent.reaper, config.debug_shell)
        agent.start_background(console.serve(vsock_listener(config.debug_port)), "debug console")
        log.warning("debug console (root shell) on vsock port %d", config.debug_port)
    if config.notify_port:
        agent.start_background(notify_host(config.notify_port), "ready notification")
    # What readiness did not need (overlay for container root file systems) loads right after.
    await asyncio.sleep(0)
    modules.load(LATE_MODULES)
    for path, error in modules.failed:
        log.warning("module %s: %s", path, error)
    await asyncio.Event().wait()  # PID 1 serves until power off


def _setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper(), logging.INFO),
                        format="vm-agent %(relativeCreated)7.0fms %(levelname)s %(name)s: %(message)s")


def _early_init(started_ns: int, imported_ns: int) -> tuple[AgentConfig, str, bool, pid1.ModuleSet]:
    pivot_root = pid1.leave_initramfs_root()
    pid1.mount_pseudo_filesystems()
    with open("/proc/cmdline") as f:
        config, problems = AgentConfig.from_cmdline(f.read())
    _setup_logging(config.log_level)
    for problem in problems:
        log.warning("kernel command line: %s", problem)
    if config.no_pivot:
        pivot_root = False
    os.environ.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    os.environ["XDG_RUNTIME_DIR"] = "/run"
    t0 = time.monotonic()
    modules = pid1.ModuleSet.from_file(config.modules_file)
    drivers = pid1.boot_modules(modules, config.sharefs_type)
    for path, error in modules.failed:
        log.warning("module %s: %s", path, error)
    modules.failed.clear()
    log.info("/init at %.3f s, imports done %.0f ms later; modules for %s (%d .ko) loaded in %.0f ms",
             started_ns / 1e9, (imported_ns - started_ns) / 1e6, " ".join(drivers), len(modules.loaded),
             (time.monotonic() - t0) * 1000)
    with contextlib.suppress(OSError):
        pid1.link_up("lo")
    share_dir = ""
    if config.sharefs_type != "none":
        try:
            pid1.mount_share(config.sharefs_type, config.share_tag, config.share_dir, config.share_cache)
            share_dir = config.share_dir
        except OSError as err:
            log.warning("shared directory (%s, tag %s) not mounted: %s", config.sharefs_type, config.share_tag, err)
    os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
    return config, share_dir, pivot_root, modules


def init_main(started_ns: int = 0) -> None:
    """PID 1 of the guest. Never returns: on a fatal error it logs and powers the VM off.

    `started_ns` is CLOCK_BOOTTIME when /init began (before the imports), for the start-up figures.
    """
    imported_ns = pid1.boottime_ns()
    started_ns = started_ns or imported_ns
    # PID 1 is immune to signals it does not handle, so SIGPIPE can go back to its default, which
    # every process we start (runc, containers) then inherits instead of Python's SIG_IGN.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    debug = False
    try:
        config, share_dir, pivot_root, modules = _early_init(started_ns, imported_ns)
        debug = config.debug
        asyncio.run(serve_guest(config, started_ns, share_dir, pivot_root, modules))
    except BaseException:
        traceback.print_exc()
    print("vm-agent: fatal error", file=sys.stderr, flush=True)
    if debug and os.path.exists("/bin/sh"):
        with contextlib.suppress(OSError):
            os.execv("/bin/sh", ["/bin/sh"])  # a console shell to look around; exiting it panics
    try:
        pid1.power_off()
    except OSError:
        pass
    while True:  # PID 1 must not exit
        time.sleep(3600)


async def serve_unix(path: str, config: AgentConfig, share_dir: str = "") -> None:
    """The services on a unix socket, on a host (no PID-1 duties): for development and tests."""
    agent = Agent(config, started_ns=pid1.boottime_ns(), share_dir=share_dir, pivot_root=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(64)
    await agent.start(sock)
    log.info("serving on %s", path)
    try:
        await asyncio.Event().wait()
    finally:
        await agent.close()
