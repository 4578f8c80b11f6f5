"""One private containerd 2.x serving both runtime handlers, plus runc-sandboxer, for the benchmarks.

``runc`` is containerd's stock path (sandboxer ``podsandbox``: a pause container and one
``containerd-shim-runc-v2`` per pod); ``kuasar-runc`` goes to runc-sandboxer through the proxy
plugin ``runc``. Both share the containerd, its images and its CRI plugin, so the only difference
between the two measurements is the sandbox/task path.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from kuasar.common import cgroups, request_timing
from kuasar.common.task_server import PID_FILE
from tests.support import containerd as cd
from tests.support import images
from tests.support.procs import live_children

BUSYBOX = images.BUSYBOX_REF
STOCK = "runc"
OURS = "kuasar-runc"
GVISOR = "kuasar-gvisor"
HANDLERS = {"stock": STOCK, "ours": OURS}
REQUEST_TIMING_DIR = "request-timing"
SANDBOXER_START_TIMEOUT = 30.0
# The task server checks every 2 s whether it is still wanted; give it a few rounds.
TASK_SERVER_EXIT_TIMEOUT = 10.0


@dataclass
class GvisorDaemon:
    """The optional second sandboxer: quark-sandboxer with its runsc backend (handler `kuasar-gvisor`)."""

    proc: subprocess.Popen[bytes]
    short: Path  # its own short dir: Quark's per-pod `<dir>/<64-hex id>/quark-task.sock` must stay < 108 bytes

    @property
    def directory(self) -> Path:
        return self.short / "gvisor"

    def task_server_pid(self) -> int | None:
        return task_server_pid(self.directory)


@dataclass
class Stack:
    containerd: cd.ContainerdInstance
    sandboxer: subprocess.Popen[bytes]
    base: Path
    short: Path
    log_dir: Path
    busybox_tar: Path
    gvisor: GvisorDaemon | None = None
    pod_cgroup_parent: str = ""  # "": pods have no CRI cgroup parent; else each gets <this>/pod<uid>

    @property
    def timing_dir(self) -> Path:
        """Where runc-sandboxer and its task server record their requests (see attribution.py)."""
        return self.base / REQUEST_TIMING_DIR

    @property
    def address(self) -> str:
        return self.containerd.address

    @property
    def sandboxer_dir(self) -> Path:
        return self.short / "runc"

    def task_server_pid(self) -> int | None:
        return task_server_pid(self.sandboxer_dir)


def task_server_pid(directory: Path) -> int | None:
    """The pid a sandboxer's task server wrote into its directory, if it runs."""
    try:
        return int((directory / PID_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


@dataclass
class CleanupReport:
    task_server_exited_by_itself: bool = True
    task_server_killed: bool = False
    leftover_mounts: list[str] = field(default_factory=list)
    leftover_pod_processes: int = 0
    notes: list[str] = field(default_factory=list)


def _start_sandboxer(short: Path, log_path: Path, events_address: str, name: str = "runc",
                     module: str = "kuasar.runc.cli", extra: tuple[str, ...] = (),
                     timing_dir: Path | None = None) -> subprocess.Popen[bytes]:
    socket = short / f"{name}.sock"
    env = dict(os.environ)
    env.pop(request_timing.ENV, None)
    if timing_dir is not None:
        timing_dir.mkdir(mode=0o700, exist_ok=True)
        env[request_timing.ENV] = str(timing_dir)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [sys.executable, "-m", module, "--listen", str(socket), "--dir", str(short / name),
             "--log-level", "info", "--events-address", events_address, *extra],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + SANDBOXER_START_TIMEOUT
    while not socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{module} did not start; see {log_path}")
        time.sleep(0.05)
    return proc


def start_stack(base: Path, bridge: str, subnet: str, runsc: str | None = None,
                pod_cgroup_parent: str = "") -> Stack:
    """Build the images, start containerd (log level info) and runc-sandboxer, import the images.
    With `runsc`, also quark-sandboxer with that runsc (proxy plugin `gvisor`, handler `kuasar-gvisor`)."""
    base.mkdir(parents=True, exist_ok=True)
    if pod_cgroup_parent:
        # Made once, here: each pod then makes (and removes) only its own cgroup below it, and none
        # tries to remove the parent while the others are still in it.
        cgroups.PodCgroup(pod_cgroup_parent).create()
    short = Path(f"/run/kuasar-bn-{secrets.token_hex(3)}")
    short.mkdir(mode=0o700)
    gv_short = Path(f"/run/kgb-{secrets.token_hex(2)}") if runsc else None
    sandboxers = {"runc": str(short / "runc.sock")}
    runtimes = {}
    if gv_short is not None:
        gv_short.mkdir(mode=0o700)
        sandboxers["gvisor"] = str(gv_short / "gvisor.sock")
        runtimes[GVISOR] = {"runtime_type": "io.containerd.kuasar-quark.v1", "sandboxer": "gvisor"}
    busybox_tar = images.build_busybox_image(base / "images" / "busybox.tar")
    pause_tar = images.build_pause_image(base / "images" / "pause.tar")
    instance = cd.ContainerdInstance(base / "containerd", sandboxers=sandboxers, runtimes=runtimes,
                                     bridge=bridge, subnet=subnet, log_level="info")
    instance.start()
    gvisor = None
    try:
        instance.import_image(busybox_tar)
        instance.import_image(pause_tar)
        sandboxer = _start_sandboxer(short, base / "runc-sandboxer.log", instance.ttrpc_address,
                                     timing_dir=base / REQUEST_TIMING_DIR)
        if gv_short is not None:
            config = base / "gvisor.toml"
            config.write_text(f'[quark]\nbackend = "runsc"\nrunsc = "{runsc}"\nplatform = "systrap"\n')
            proc = _start_sandboxer(gv_short, base / "gvisor-sandboxer.log", instance.ttrpc_address, "gvisor",
                                    "kuasar.quark.cli", ("--config", str(config)))
            gvisor = GvisorDaemon(proc, gv_short)
    except BaseException:
        instance.stop()
        if pod_cgroup_parent:
            _remove_cgroup_parent(pod_cgroup_parent)
        shutil.rmtree(short, ignore_errors=True)
        if gv_short is not None:
            shutil.rmtree(gv_short, ignore_errors=True)
        raise
    return Stack(instance, sandboxer, base, short, base / "pod-logs", busybox_tar, gvisor, pod_cgroup_parent)


def stop_stack(stack: Stack) -> CleanupReport:
    """containerd through the harness, runc-sandboxer with SIGTERM, then wait for the task server."""
    report = CleanupReport()
    server_pid = stack.task_server_pid()
    report.leftover_pod_processes = len(live_children(server_pid, "pod-")) if server_pid else 0
    stack.containerd.stop()
    if stack.sandboxer.poll() is None:
        stack.sandboxer.send_signal(signal.SIGTERM)
        try:
            stack.sandboxer.wait(15)
        except subprocess.TimeoutExpired:
            stack.sandboxer.kill()
            stack.sandboxer.wait(5)
            report.notes.append("runc-sandboxer ignored SIGTERM for 15 s and was killed")
    if server_pid is not None:
        _wait_task_server(server_pid, report)
    if stack.gvisor is not None:
        _stop_gvisor(stack.gvisor, stack.base, report)
    report.leftover_mounts += cd.unmount_all(stack.base, stack.short)
    if stack.pod_cgroup_parent:
        report.notes += _remove_cgroup_parent(stack.pod_cgroup_parent)
    task_log = stack.sandboxer_dir / "task-server.log"
    if task_log.exists():
        shutil.copy(task_log, stack.base / "task-server.log")
    shutil.rmtree(stack.short, ignore_errors=True)
    return report


def _remove_cgroup_parent(parent: str) -> list[str]:
    """The pods' common cgroup parent, in every hierarchy, once empty: containerd's stock path leaves
    the parents runc made for its pause containers (kubelet would remove them)."""
    notes = []
    for root in cgroups.hierarchy_roots():
        top = root / parent.strip("/")
        if not top.is_dir():
            continue
        for directory in sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: len(d.parts),
                                reverse=True) + [top]:
            try:
                directory.rmdir()
            except OSError as exc:
                notes.append(f"cgroup {directory} left in place: {exc.strerror}")
    return notes


def _wait_task_server(pid: int, report: CleanupReport, what: str = "task server") -> None:
    try:
        server = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    try:
        server.wait(TASK_SERVER_EXIT_TIMEOUT)
        return
    except psutil.TimeoutExpired:
        pass
    victims = [*server.children(recursive=True), server]
    if what == "task server":
        report.task_server_exited_by_itself = False
        report.task_server_killed = True
    report.notes.append(f"{what} {pid} still alive {TASK_SERVER_EXIT_TIMEOUT:.0f}s after the sandboxer "
                        f"exited; killed it and {len(victims) - 1} descendants")
    for proc in victims:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)


def _stop_gvisor(gvisor: GvisorDaemon, base: Path, report: CleanupReport) -> None:
    server_pid = gvisor.task_server_pid()
    if gvisor.proc.poll() is None:
        gvisor.proc.send_signal(signal.SIGTERM)
        try:
            gvisor.proc.wait(15)
        except subprocess.TimeoutExpired:
            gvisor.proc.kill()
            gvisor.proc.wait(5)
            report.notes.append("quark-sandboxer (gVisor) ignored SIGTERM for 15 s and was killed")
    if server_pid is not None:
        _wait_task_server(server_pid, report, "quark-sandboxer's task server (gVisor)")
    task_log = gvisor.directory / "task-server.log"
    if task_log.exists():
        shutil.copy(task_log, base / "gvisor-task-server.log")
    report.leftover_mounts += cd.unmount_all(gvisor.short)
    shutil.rmtree(gvisor.short, ignore_errors=True)
