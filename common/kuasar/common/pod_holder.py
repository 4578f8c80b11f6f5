"""The per-pod process: it holds the pod's namespaces and is the pid `Controller.Start` returns.

CRI writes `/proc/<pid>/ns/{net,ipc,uts[,pid]}` into every container spec, so this process must live
as long as the pod. It is forked from the (single-threaded) task server to enter or make the
namespaces, then execs `kuasar-pause` (a few-KB static C program, built by setup): a forked Python
process that stays Python dirties its copy-on-write heap within milliseconds (measured 3.6-5 MB per
pod), while the exec'd sleeper costs a few pages. Without the program it sleeps in Python (and logs
that once). There is no pause container and no shim.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from . import linux
from .errors import RuntimeFailure

log = logging.getLogger(__name__)

# The child reports "<pid>" or "!<error>" on a pipe; both fit easily in one atomic pipe write.
REPORT_MAX = 512
PAUSE_PROGRAM = "kuasar-pause"


@functools.cache
def pause_program() -> str | None:
    """Where kuasar-pause is: $KUASAR_POD_PAUSE, beside our executable, $KUASAR_PREFIX/bin, PATH."""
    candidates = [os.environ.get("KUASAR_POD_PAUSE", ""),
                  str(Path(sys.executable).parent / PAUSE_PROGRAM),
                  str(Path(os.environ.get("KUASAR_PREFIX", "/nonexistent")) / "bin" / PAUSE_PROGRAM),
                  shutil.which(PAUSE_PROGRAM) or ""]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    log.warning("%s not found: pod processes will sleep in Python (a few MB each instead of KB)",
                PAUSE_PROGRAM)
    return None


@dataclass(frozen=True)
class PodNamespaces:
    """Which namespaces the pod gets of its own, from PodSandboxConfig's namespace options."""

    netns_path: str = ""  # CRI's netns; "" means the host network
    new_ipc: bool = True
    new_uts: bool = True
    new_pid: bool = False  # a pod-wide PID namespace (shareProcessNamespace / NamespaceMode POD)


def spawn_pod_holder(name: str, namespaces: PodNamespaces, hostname: str = "") -> int:
    """Fork the holder; return its host pid once it sits in its namespaces. Call from a thread-free process."""
    pause = pause_program()  # resolved in the parent: the child must not log or search
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(read_fd)
        _child(name, namespaces, hostname, write_fd, pause)
    os.close(write_fd)
    try:
        report = os.read(read_fd, REPORT_MAX).decode(errors="replace")
    finally:
        os.close(read_fd)
    if not report or report.startswith("!"):
        raise RuntimeFailure(f"pod process for {name} failed: {report[1:] or 'no report'}")
    return int(report)


def _child(name: str, ns: PodNamespaces, hostname: str, report_fd: int, pause: str | None) -> None:
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        if ns.netns_path:
            fd = os.open(ns.netns_path, os.O_RDONLY | os.O_CLOEXEC)
            linux.setns(fd, linux.CLONE_NEWNET)
            os.close(fd)
        flags = (linux.CLONE_NEWIPC if ns.new_ipc else 0) | (linux.CLONE_NEWUTS if ns.new_uts else 0)
        flags |= linux.CLONE_NEWPID if ns.new_pid else 0
        if flags:
            linux.unshare(flags)
        if hostname and ns.new_uts:
            import socket

            socket.sethostname(hostname)
        if ns.new_pid and os.fork() != 0:
            os._exit(0)  # the grandchild is PID 1 of the pod's PID namespace and re-parents to us
        comm = f"pod-{name[:11]}"
        linux.set_process_name(comm)
        os.write(report_fd, str(_host_pid()).encode())
        os.closerange(0, report_fd)
        os.closerange(report_fd, os.sysconf("SC_OPEN_MAX"))
        if pause is not None:
            try:
                os.execv(pause, [pause, comm])
            except OSError:
                pass  # keep the pod alive the slow way rather than lose it
        _sleep_forever(as_init=ns.new_pid)
    except BaseException as exc:  # report anything, then die: the child must never reach the loop
        try:
            os.write(report_fd, f"!{exc}".encode()[:REPORT_MAX])
        finally:
            os._exit(1)


def _host_pid() -> int:
    # In a new PID namespace getpid() says 1; /proc/self still names our host pid because /proc is
    # the host's mount.
    return int(os.readlink("/proc/self"))


def _sleep_forever(as_init: bool) -> None:
    if as_init:
        # PID 1 of the pod's namespace inherits orphans; reap them so no zombie outlives its container.
        signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        signal.pause()
        if as_init:
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                pass
