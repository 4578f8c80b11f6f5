"""`kuasar.agent.v1.Agent`: the guest sandbox service the host's sandboxer talks to."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import empty_pb2

from kuasar.common.api.kuasar.agent.v1 import agent_pb2 as pb
from kuasar.common.errors import DeadlineExceeded, InvalidArgument
from kuasar.common.iopump import wait_fd, write_all
from kuasar.common.pod_holder import PodNamespaces, start_pod_holder
from kuasar.common.pod_sysctls import sysctl_parts
from kuasar.common.reaper import Reaper
from kuasar.common.spawn import MAX_CAPTURE, resolve, start_program
from kuasar.common.state import write_atomic
from kuasar.common.ttrpc import Context, ServerStream, TtrpcServer

from . import __version__
from .events import EventQueue
from .netconf import NetConfig

log = logging.getLogger(__name__)

AGENT_SERVICE = "kuasar.agent.v1.Agent"
DEFAULT_EXEC_TIMEOUT = 30.0
# How long after answering Poweroff the agent waits before cutting power (lets the reply leave).
POWEROFF_DELAY = 0.1
ETC_FILE_MODE = 0o644  # the guest's /etc/hostname, hosts and resolv.conf


@dataclass
class GuestPaths:
    """Files the service writes; tests point them into a temporary directory."""

    etc: Path = Path("/etc")
    proc_sys: Path = Path("/proc/sys")
    run: Path = Path("/run/kuasar")  # where the host may ask for links (the pod PID namespace's)


def _write_etc_file(path: Path, text: str) -> None:
    # Readable by every user of the guest, as /etc files are; the guest's files die with the VM.
    write_atomic(path, text.encode(), ETC_FILE_MODE, durable=False)


def write_sysctl(proc_sys: Path, key: str, value: str) -> None:
    """`net.ipv4.ip_forward` -> <proc_sys>/net/ipv4/ip_forward (named as sysctl.d(5) reads names)."""
    path = proc_sys.joinpath(*sysctl_parts(key))
    if not path.exists():
        # Not NOT_FOUND: containerd hands the code to CRI, where it reads as an unknown sandbox.
        raise InvalidArgument(f"sysctl {key} does not exist in the guest's kernel")
    path.write_text(value)


class AgentService:
    def __init__(self, reaper: Reaper, events: EventQueue, net: NetConfig, *,
                 started_ns: int, share_dir: str = "", pivot_root: bool = True,
                 paths: GuestPaths | None = None, sethostname: Callable[[str], None] = socket.sethostname,
                 poweroff: Callable[[], None] | None = None,
                 stop_containers: Callable[[float], object] | None = None) -> None:
        self.reaper = reaper
        self.events = events
        self.net = net
        self.started_ns = started_ns
        self.ready_ns = 0
        self.share_dir = share_dir
        self.pivot_root = pivot_root
        self.paths = paths or GuestPaths()
        self.sethostname = sethostname
        self.poweroff = poweroff
        self.stop_containers = stop_containers
        self.powering_off = False
        self.pod_pid_holder = 0  # the process holding the pod's shared PID namespace, once made

    def register(self, server: TtrpcServer) -> None:
        for method, request_type, handler in (
            ("Check", pb.CheckRequest, self.check),
            ("SetupSandbox", pb.SetupSandboxRequest, self.setup_sandbox),
            ("UpdateInterfaces", pb.UpdateInterfacesRequest, self.update_interfaces),
            ("UpdateRoutes", pb.UpdateRoutesRequest, self.update_routes),
            ("SyncClock", pb.SyncClockPacket, self.sync_clock),
            ("ExecVMProcess", pb.ExecVMProcessRequest, self.exec_vm_process),
            ("Poweroff", pb.PoweroffRequest, self.power_off),
        ):
            server.add_unary(AGENT_SERVICE, method, request_type, handler)
        server.add_stream(AGENT_SERVICE, "Events", self.stream_events)

    async def check(self, req: pb.CheckRequest, ctx: Context) -> pb.CheckResponse:
        return pb.CheckResponse(agent_version=__version__, kernel_release=os.uname().release,
                                agent_started_ns=self.started_ns, agent_ready_ns=self.ready_ns,
                                now_ns=time.clock_gettime_ns(time.CLOCK_BOOTTIME), share_dir=self.share_dir,
                                pivot_root=self.pivot_root)

    async def setup_sandbox(self, req: pb.SetupSandboxRequest, ctx: Context) -> empty_pb2.Empty:
        if req.hostname:
            if len(req.hostname) > 64 or any(c.isspace() or c == "/" for c in req.hostname):
                raise InvalidArgument(f"bad hostname {req.hostname!r}")
            self.sethostname(req.hostname)
            _write_etc_file(self.paths.etc / "hostname", req.hostname + "\n")
        if req.hosts:
            _write_etc_file(self.paths.etc / "hosts", req.hosts)
        if req.resolv_conf:
            _write_etc_file(self.paths.etc / "resolv.conf", req.resolv_conf)
        for key, value in sorted(req.sysctls.items()):
            write_sysctl(self.paths.proc_sys, key, value)
        if req.interfaces:
            await self.net.update_interfaces(req.interfaces)
        if req.routes:
            await self.net.update_routes(req.routes)
        if req.pod_pid_namespace_path:
            await self._hold_pod_pid_namespace(req.sandbox_id, req.pod_pid_namespace_path)
        log.info("sandbox %s set up (hostname %r, %d sysctls, %d interfaces, %d routes)", req.sandbox_id,
                 req.hostname, len(req.sysctls), len(req.interfaces), len(req.routes))
        return empty_pb2.Empty()

    async def _hold_pod_pid_namespace(self, sandbox_id: str, link_path: str) -> None:
        """Start the pod's PID namespace holder (its PID 1, which reaps the pod's orphans; the agent
        stays out of the containers' sight) and link `link_path` to its namespace. Once per VM."""
        link = Path(link_path)
        if not link.is_absolute() or ".." in link.parts or not link.is_relative_to(self.paths.run):
            raise InvalidArgument(f"pod PID namespace path {link_path!r} is not under {self.paths.run}")
        if not self.pod_pid_holder:
            started_ns = time.monotonic_ns()
            pid = await start_pod_holder(sandbox_id or "pod", PodNamespaces(new_ipc=False, new_uts=False,
                                                                             new_pid=True))
            self.reaper.watch(pid, started_ns).add_done_callback(_holder_exited)
            self.pod_pid_holder = pid
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.tmp")
        tmp.unlink(missing_ok=True)
        os.symlink(f"/proc/{self.pod_pid_holder}/ns/pid", tmp)
        os.replace(tmp, link)

    async def update_interfaces(self, req: pb.UpdateInterfacesRequest, ctx: Context) -> empty_pb2.Empty:
        await self.net.update_interfaces(req.interfaces)
        return empty_pb2.Empty()

    async def update_routes(self, req: pb.UpdateRoutesRequest, ctx: Context) -> empty_pb2.Empty:
        await self.net.update_routes(req.routes)
        return empty_pb2.Empty()

    async def sync_clock(self, req: pb.SyncClockPacket, ctx: Context) -> pb.SyncClockPacket:
        reply = pb.SyncClockPacket()
        reply.CopyFrom(req)
        if req.delta == 0:
            reply.client_arrive_time = time.clock_gettime_ns(time.CLOCK_REALTIME)
            reply.server_send_time = time.clock_gettime_ns(time.CLOCK_REALTIME)
        else:
            now = time.clock_gettime_ns(time.CLOCK_REALTIME)
            time.clock_settime_ns(time.CLOCK_REALTIME, now + req.delta)
            log.info("clock shifted by %.3f ms", req.delta / 1e6)
        return reply

    async def stream_events(self, stream: ServerStream, ctx: Context) -> None:
        await stream.recv()  # EventsRequest: nothing to read in it
        token = self.events.take_over()
        while True:
            envelope = await self.events.get(token)
            if envelope is None:
                return  # a newer Events call took over
            await stream.send(envelope.SerializeToString())
            self.events.delivered(envelope)

    async def exec_vm_process(self, req: pb.ExecVMProcessRequest, ctx: Context) -> pb.ExecVMProcessResponse:
        if not req.args:
            raise InvalidArgument("ExecVMProcess needs args")
        env = dict(os.environ)
        for item in req.env:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InvalidArgument(f"bad environment entry {item!r}")
            env[key] = value
        timeout = req.timeout_ms / 1000 if req.timeout_ms else DEFAULT_EXEC_TIMEOUT
        status, out, err = await run_command(self.reaper, list(req.args), bytes(req.stdin), env, timeout)
        return pb.ExecVMProcessResponse(exit_status=status, stdout=out, stderr=err)

    async def power_off(self, req: pb.PoweroffRequest, ctx: Context) -> empty_pb2.Empty:
        if self.powering_off:
            return empty_pb2.Empty()
        self.powering_off = True
        log.info("power off requested")
        try:
            if self.stop_containers is not None:
                await self.stop_containers(req.grace_ms / 1000)  # type: ignore[misc]
        finally:
            # Also when stopping the containers failed or this call was cancelled (its deadline, its
            # connection): a later Poweroff returns at once, so this one must cut the power.
            if self.poweroff is not None:
                asyncio.get_running_loop().call_later(POWEROFF_DELAY, self.poweroff)
        return empty_pb2.Empty()


def _holder_exited(exited: asyncio.Future) -> None:
    if not exited.cancelled():
        log.error("the holder of the pod's PID namespace exited (%d): new containers cannot join it",
                  exited.result().status)


async def _feed(fd: int, data: bytes) -> None:
    """Write `data` into a pipe without blocking the loop, then close it."""
    try:
        await write_all(fd, data)
    except OSError:
        pass  # the command closed its stdin
    finally:
        os.close(fd)


async def _collect(fd: int) -> bytes:
    chunks, size = [], 0
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                await wait_fd(fd, writable=False)
                continue
            if not data:
                return b"".join(chunks)
            if size < MAX_CAPTURE:
                chunks.append(data[:MAX_CAPTURE - size])
                size += len(chunks[-1])
    finally:
        os.close(fd)


async def run_command(reaper: Reaper, argv: list[str], stdin: bytes, env: dict[str, str],
                      timeout: float) -> tuple[int, bytes, bytes]:  # noqa: ASYNC109
    """Run argv (no shell) in its own session; on timeout kill the session and say so. The session is
    killed too when this call is cancelled (the caller's ttrpc deadline, a dropped connection)."""
    path = resolve(argv[0])
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid = start_program(path, argv, env, in_r, out_w, err_w, new_session=True)
        exited = reaper.watch(pid)
    except BaseException:
        for fd in (in_w, out_r, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)
    for fd in (in_w, out_r, err_r):
        os.set_blocking(fd, False)
    feeding = asyncio.create_task(_feed(in_w, stdin))
    reading = asyncio.gather(_collect(out_r), _collect(err_r))
    try:
        async with asyncio.timeout(timeout):
            out, err = await reading
            status = (await exited).status
    except TimeoutError:
        _kill_session(pid)
        raise DeadlineExceeded(f"{argv[0]} did not finish within {timeout:g}s (killed)") from None
    except BaseException:
        _kill_session(pid)  # cancelled (or its output failed): nobody is left to wait for the command
        raise
    finally:
        feeding.cancel()
        reading.cancel()
    return status, out, err


def _kill_session(pid: int) -> None:
    """SIGKILL every process of the session `pid` leads (its process group)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
