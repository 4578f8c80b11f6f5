"""The per-pod process: it holds the pod's namespaces and is the pid `Controller.Start` returns.

CRI writes `/proc/<pid>/ns/{net,ipc,uts[,pid][,user]}` into every container spec, so this process must live
as long as the pod. It is `kuasar-pause` (a few-KB static C program, built by setup), spawned by the
task server with `--setup`: it enters or makes the namespaces itself and reports its host pid on a
pipe (setup builds it from the same tree as this module, so the two always agree). Without the
program a child forked from the task server's loop thread sets the namespaces up and sleeps in
Python (and logs that once), which costs its copy-on-write heap (measured 3.6-5 MB per pod). There is
no pause container and no shim.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import linux, spawn, tools
from .errors import RuntimeFailure
from .pod_sysctls import sysctl_path
from .spawn import RESTORED_SIGNALS, read_to_eof

log = logging.getLogger(__name__)

# The child reports "<pid>" or "!<error>" on a pipe; both fit easily in one atomic pipe write.
REPORT_MAX = 512
PAUSE_PROGRAM = "kuasar-pause"
# Entering namespaces takes a millisecond; this only bounds a child stuck in the kernel.
SETUP_TIMEOUT = 10.0
# containerd's for its pause container (defaultSandboxOOMAdj): the pod process is the OOM killer's last
# choice in the pod, below even a Guaranteed pod's containers (-997). Its death would end the pod.
POD_OOM_SCORE_ADJ = -998


@functools.cache
def pause_program() -> str | None:
    """Where kuasar-pause is: $KUASAR_POD_PAUSE, else where every helper program is looked for
    (tools.find_tool: $KUASAR_PREFIX/bin, an install's bin/ or the checkout's .prefix/bin, PATH)."""
    override = os.environ.get("KUASAR_POD_PAUSE", "")
    candidate = override if override and os.access(override, os.X_OK) else tools.find_tool(PAUSE_PROGRAM)
    if candidate is not None:
        return candidate
    log.warning("%s not found: pod processes will sleep in Python (a few MB each instead of KB); a gVisor "
                "pod's root runs busybox sleep, which reaps no orphans", PAUSE_PROGRAM)
    return None


@dataclass(frozen=True)
class PodNamespaces:
    """Which namespaces the pod gets of its own, from PodSandboxConfig's namespace options."""

    netns_path: str = ""  # CRI's netns; "" means the host network
    new_ipc: bool = True
    new_uts: bool = True
    new_pid: bool = False  # a pod-wide PID namespace (shareProcessNamespace / NamespaceMode POD)
    # Join the user namespace that owns netns_path first (CRI's hostUsers: false), so that the IPC, UTS
    # and PID namespaces made next belong to it as well.
    userns: bool = False
    # (name, value) to write under /proc/sys once in the namespaces, which scope them.
    sysctls: tuple[tuple[str, str], ...] = ()


async def start_pod_holder(name: str, namespaces: PodNamespaces, hostname: str = "",
                           meanwhile: Callable[[], None] | None = None, owner: Path | None = None) -> int:
    """Start the pod process; return its host pid once it sits in its namespaces.

    `meanwhile` runs while the new process enters its namespaces (other set-up of the pod, e.g. its
    /dev/shm); if it fails, the process is killed and its error raised. `owner`, the pod's directory,
    goes into the process's command line, where pod_leftovers finds a pod whose record was never written.

    The task server must reap it (and, with a PID namespace, the intermediate process that exits at
    once): the pid is only returned after its exit may already have been reaped.
    """
    pause = pause_program()
    if pause is None:
        if meanwhile is not None:
            meanwhile()
        return spawn_pod_holder(name, namespaces, hostname)
    return await _spawn_pause(pause, _comm(name), namespaces, hostname, meanwhile, owner)


def _comm(name: str) -> str:
    return f"pod-{name[:11]}"


async def _spawn_pause(pause: str, comm: str, ns: PodNamespaces, hostname: str,
                       meanwhile: Callable[[], None] | None = None, owner: Path | None = None) -> int:
    """posix_spawn `kuasar-pause --setup`: no fork of the task server's heap, no Python in the child."""
    argv = [pause, "--setup", "--oom-score-adj", str(POD_OOM_SCORE_ADJ)]
    if owner is not None:
        argv += ["--owner", str(owner)]
    if ns.netns_path:
        argv += ["--netns", ns.netns_path]
        if ns.userns:
            argv.append("--userns")
    if ns.new_ipc:
        argv.append("--ipc")
    if ns.new_uts:
        argv.append("--uts")
        if hostname:
            argv += ["--hostname", hostname]
    if ns.new_pid:
        argv.append("--pid")
    for key, value in ns.sysctls:
        argv += ["--sysctl", f"{sysctl_path(key)}={value}"]
    argv.append(comm)
    read_fd, write_fd = os.pipe()
    try:
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            # Its stdout is the report pipe; nothing else is inherited (our fds are all close-on-exec).
            spawned = os.posix_spawn(pause, argv, {}, file_actions=[
                (os.POSIX_SPAWN_DUP2, write_fd, 1), (os.POSIX_SPAWN_DUP2, devnull, 0),
                (os.POSIX_SPAWN_DUP2, devnull, 2)],
                setsigmask=(), setsigdef=(*RESTORED_SIGNALS, signal.SIGCHLD, signal.SIGTERM, signal.SIGINT,
                                          signal.SIGHUP))
        finally:
            os.close(devnull)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in an argument (a hostname, a sysctl value)
        os.close(read_fd)
        raise RuntimeFailure(f"pod process for {comm}: starting {pause}: {exc}") from None
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    reading = asyncio.ensure_future(_read_report(read_fd, spawned))
    if meanwhile is not None:
        try:
            meanwhile()
        except Exception:
            reading.add_done_callback(_kill_reported)
            with contextlib.suppress(Exception):
                await asyncio.shield(reading)  # bounded by SETUP_TIMEOUT; the process is gone after it
            raise
    try:
        report = await asyncio.shield(reading)
    except asyncio.CancelledError:
        # The report still comes (or the child dies); a pod nobody will ever know of must not stay.
        reading.add_done_callback(_kill_reported)
        raise
    return _reported_pid(comm, report)


async def _read_report(fd: int, spawned: int) -> str:
    """What the child wrote before closing its end of the pipe (it closes it once in the pod)."""
    try:
        async with asyncio.timeout(SETUP_TIMEOUT):
            return (await read_to_eof(fd, REPORT_MAX)).decode(errors="replace")
    except TimeoutError:
        _kill_quietly(spawned)
        return "!no report within the setup timeout"


def _reported_pid(comm: str, report: str) -> int:
    if not report or report.startswith("!") or not report.isdigit():
        raise RuntimeFailure(f"pod process {comm} failed: {report.removeprefix('!') or 'no report'}")
    return int(report)


def _kill_reported(reading: asyncio.Future[str]) -> None:
    if not reading.cancelled() and reading.exception() is None and reading.result().isdigit():
        _kill_quietly(int(reading.result()))


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def spawn_pod_holder(name: str, namespaces: PodNamespaces, hostname: str = "") -> int:
    """Fork the holder; return its host pid once it sits in its namespaces. Call from a process whose
    other threads hold no lock the child needs (the task server's attach-lock warmer holds none).

    The fallback when kuasar-pause is not installed: see start_pod_holder.
    """
    read_fd, write_fd = os.pipe()
    pid = spawn.fork()
    if pid == 0:  # child: never returns
        os.close(read_fd)
        _child(name, namespaces, hostname, write_fd)
    os.close(write_fd)
    try:
        report = os.read(read_fd, REPORT_MAX).decode(errors="replace")
    finally:
        os.close(read_fd)
    return _reported_pid(_comm(name), report)


def _child(name: str, ns: PodNamespaces, hostname: str, report_fd: int) -> None:
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        _set_oom_score_adj(POD_OOM_SCORE_ADJ)
        if ns.netns_path:
            fd = os.open(ns.netns_path, os.O_RDONLY | os.O_CLOEXEC)
            if ns.userns:
                _join_owner_userns(fd)
            linux.setns(fd, linux.CLONE_NEWNET)
            os.close(fd)
        flags = (linux.CLONE_NEWIPC if ns.new_ipc else 0) | (linux.CLONE_NEWUTS if ns.new_uts else 0)
        flags |= linux.CLONE_NEWPID if ns.new_pid else 0
        if flags:
            linux.unshare(flags)
        if hostname and ns.new_uts:
            import socket

            socket.sethostname(hostname)
        for key, value in ns.sysctls:
            _write_sysctl(key, value)
        if ns.new_pid and spawn.fork() != 0:
            os._exit(0)  # the grandchild is PID 1 of the pod's PID namespace and re-parents to us
        comm = _comm(name)
        linux.set_process_name(comm)
        os.write(report_fd, str(_host_pid()).encode())
        os.closerange(0, report_fd)
        os.closerange(report_fd, os.sysconf("SC_OPEN_MAX"))
        _sleep_forever(as_init=ns.new_pid)
    except BaseException as exc:  # report anything, then die: the child must never reach the loop
        try:
            os.write(report_fd, f"!{exc}".encode()[:REPORT_MAX])
        finally:
            os._exit(1)


def _join_owner_userns(netns_fd: int) -> None:
    """What kuasar-pause's --userns does: enter the user namespace that owns the pod's netns."""
    import fcntl

    owner = fcntl.ioctl(netns_fd, linux.NS_GET_USERNS)
    try:
        if os.path.samestat(os.fstat(owner), os.stat("/proc/self/ns/user")):
            raise RuntimeError("netns belongs to the host's user namespace, not the pod's")
        linux.setns(owner, linux.CLONE_NEWUSER)
    finally:
        os.close(owner)


def _set_oom_score_adj(value: int) -> None:
    """What kuasar-pause's --oom-score-adj does, before any user namespace is joined (lowering it needs
    privilege in the host's); best effort, as containerd's restricted mode keeps the inherited value."""
    try:
        with open("/proc/self/oom_score_adj", "w") as adj:
            adj.write(str(value))
    except OSError:
        pass


def _write_sysctl(key: str, value: str) -> None:
    """What kuasar-pause's --sysctl does: /proc/sys serves the writer's own namespaces' values."""
    path = sysctl_path(key)
    try:
        with open(os.path.join("/proc/sys", path), "w") as knob:
            knob.write(value)
    except OSError as exc:
        raise RuntimeError(f"sysctl {path}: {exc.strerror}") from None


def _host_pid() -> int:
    # In a new PID namespace getpid() says 1; /proc/self still names our host pid because /proc is
    # the host's mount.
    return int(os.readlink("/proc/self"))


def _sleep_forever(as_init: bool) -> None:
    if not as_init:
        while True:
            signal.pause()
    # PID 1 of the pod's namespace inherits orphans; reap them so no zombie outlives its container.
    # SIGCHLD is blocked and waited for, as kuasar-pause does: with a handler and pause(), one that came
    # between the last reap and pause() was only seen at the next signal, its zombie left meanwhile.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        signal.sigwait({signal.SIGCHLD})
