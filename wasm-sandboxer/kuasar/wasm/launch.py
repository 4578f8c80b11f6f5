"""Container processes: forked from the task server, one per container or exec.

Process model, measured on the 2-core test machine (hello module, median of 10, fork/exec to exit):
  * fork of the task server, which has already imported wasmtime: 3.4 ms with a cached artifact,
    4.7 ms compiling; a running container is charged ~4.5 MiB (cgroup working set), the rest of the
    interpreter and libwasmtime stays shared copy-on-write with the task server;
  * exec of a fresh interpreter that imports wasmtime and deserializes the same artifact: 48 ms warm
    (~120 ms cold), and a private interpreter (~17 MB RSS) per container.
So we fork. The task server runs Python on one thread (its other one, the cgroup attach-lock warmer,
holds nothing a child could inherit: cgroup_attach.py) and never compiles (runner.py says why), so
the child inherits no locks or thread pools. It first asks to die with the task server
(PR_SET_PDEATHSIG: what follows may take seconds, and a crash meanwhile must not leave it behind),
resets the signal dispositions the event loop installed, keeps only its stdio and two pipes, joins
the container's cgroup (before it allocates anything, so its memory is charged there), joins the
pod's net/ipc/uts namespaces, then compiles or deserializes and instantiates the module (runner.py).
It reports "ok" or "!<kind><error>" on the report pipe, so a module that cannot run fails Task.Create
with wasmtime's own words, and a container's init process then waits for the one byte Task.Start
writes on the go pipe: the created/started split runc gives. Execs run as soon as they are ready.
Signals reach the process as for any container: SIGTERM and SIGKILL work even while the module is
blocked in a host call (reading an idle FIFO), which wasmtime's epoch interruption cannot do.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import os
import resource
import signal
import termios
from dataclasses import dataclass, field

from kuasar.common import beneath, linux, spawn
from kuasar.common.cgroups import PodCgroup
from kuasar.common.errors import InvalidArgument, RuntimeFailure
from kuasar.common.reaper import Exit, Reaper
from kuasar.common.spawn import RESTORED_SIGNALS

from .runner import ModuleError, RunSpec, wasmedge_argv, wasmtime_runnable

# The child's report is one write of at most this many bytes (atomic on a pipe).
REPORT_MAX = 4096
# Compiling a large module on a slow, CPU-limited container can take a while; this bounds a stuck one.
PREPARE_TIMEOUT = 300.0
NAMESPACE_FLAGS = {"network": linux.CLONE_NEWNET, "ipc": linux.CLONE_NEWIPC, "uts": linux.CLONE_NEWUTS}
RLIMITS = {name[len("RLIMIT_"):]: getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_")}
# OCI rlimits are uint64, and "unlimited" is 2**64-1 (the kernel's RLIM_INFINITY). setrlimit here takes
# a signed C long, so every value from 2**63 on (none a limit anyone means as finite) is given as infinity.
RLIMIT_UNLIMITED_FROM = 1 << 63


def rlimit_values(name: str, soft: int, hard: int) -> tuple[int, int]:
    """An OCI (uint64) rlimit's soft and hard values as setrlimit takes them, RLIM_INFINITY for
    "unlimited"; checked here, before the fork, so that Create says which limit is wrong."""
    def value(number: int) -> int:
        if number < 0:
            raise InvalidArgument(f"rlimit {name}: {number} is negative (OCI rlimits are unsigned)")
        return resource.RLIM_INFINITY if number >= RLIMIT_UNLIMITED_FROM else number

    soft, hard = value(soft), value(hard)
    unlimited = resource.RLIM_INFINITY
    if hard != unlimited and (soft == unlimited or soft > hard):
        raise InvalidArgument(f"rlimit {name}: soft value {'unlimited' if soft == unlimited else soft} "
                              f"is above its hard value {hard}")
    return soft, hard


@dataclass
class User:
    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class FileBind:
    """A file the spec binds into the container (a ConfigMap subPath, kubelet's /etc/hosts), bound over
    `target` (its destination, resolved inside the rootfs) in the container process's own mount
    namespace: WASI preopens only directories, so a module sees a file only through the rootfs."""

    source: str
    target: str
    readonly: bool = False
    recursive: bool = False
    # `target` as the directory it lies beneath (the rootfs or a volume's) and the path below it: the
    # bind goes there without following a symlink (beneath.bind_beneath), since the pod can write there.
    root: str = field(default="", compare=False)
    relative: str = field(default="", compare=False)


@dataclass
class LaunchPlan:
    name: str  # container id (and exec id): the process is named wasm-<name>
    runtime: str  # "wasmtime" or "wasmedge"
    run: RunSpec
    namespaces: list[tuple[str, str]] = field(default_factory=list)  # (OCI type, path or "" for new)
    cgroup: PodCgroup | None = None
    user: User = field(default_factory=User)
    rlimits: list[tuple[int, int, int]] = field(default_factory=list)  # (resource, soft, hard): rlimit_values
    oom_score_adj: int | None = None
    wasmedge: str = ""  # WasmEdge binary when runtime == "wasmedge"
    terminal: bool = False  # stdio is a pty's slave, made the process's controlling terminal
    file_binds: list[FileBind] = field(default_factory=list)
    # A rootfs made read-only by the kernel in the process's mount namespace, under its file binds
    # (set when a read-only root holds a writable file bind: WASI's read-only preopen would refuse it).
    readonly_rootfs: str = ""


@dataclass
class Stdio:
    stdin: int = -1
    stdout: int = -1
    stderr: int = -1

    def fds(self) -> list[int]:
        return [fd for fd in (self.stdin, self.stdout, self.stderr) if fd >= 0]

    def close(self) -> None:
        for fd in set(self.fds()):  # a pty's slave is all three
            os.close(fd)
        self.stdin = self.stdout = self.stderr = -1


@dataclass
class Launch:
    pid: int
    exited: asyncio.Future[Exit]
    report_fd: int
    go_fd: int = -1  # the write end Task.Start uses; -1 for execs (they run when ready)

    async def ready(self, timeout: float = PREPARE_TIMEOUT) -> None:
        """Wait for the child's report; raise with its message if it could not prepare the module."""
        fd, self.report_fd = self.report_fd, -1  # _read_once closes it
        try:
            report = await _read_once(fd, timeout)
        except TimeoutError:
            raise RuntimeFailure(f"container process {self.pid} did not finish preparing its module "
                                 f"within {timeout:.0f} s") from None
        if report == b"ok":
            return
        if report.startswith(b"!M"):  # the module itself cannot run: the caller's mistake
            raise InvalidArgument(report[2:].decode(errors="replace"))
        if report.startswith(b"!"):
            raise RuntimeFailure(f"container process setup failed: {report[2:].decode(errors='replace')}")
        raise RuntimeFailure(f"container process {self.pid} exited before it was ready")

    def go(self) -> None:
        if self.go_fd >= 0:
            try:
                os.write(self.go_fd, b"1")
            finally:
                self.close_go()

    def close_go(self) -> None:
        if self.go_fd >= 0:
            os.close(self.go_fd)
            self.go_fd = -1

    def close_report(self) -> None:
        """For a launch given up before its report was read (ready() closes it otherwise)."""
        if self.report_fd >= 0:
            os.close(self.report_fd)
            self.report_fd = -1


async def _read_once(fd: int, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(fd, REPORT_MAX)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not done.done():
            done.set_result(data)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        async with asyncio.timeout(timeout):
            return await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def launch(plan: LaunchPlan, stdio: Stdio, reaper: Reaper, wait_for_go: bool) -> Launch:
    """Fork the container process. The exit future is taken in the same loop step as the fork."""
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe() if wait_for_go else (-1, -1)
    task_server = os.getpid()
    try:
        pid = spawn.fork()
    except OSError:
        for fd in (report_r, report_w, go_r, go_w):
            if fd >= 0:
                os.close(fd)
        raise
    if pid == 0:  # the child: never returns
        _child(plan, stdio, report_w, go_r, task_server)
    exited = reaper.watch(pid)
    os.close(report_w)
    if go_r >= 0:
        os.close(go_r)
    return Launch(pid, exited, report_r, go_w)


# -- in the child ----------------------------------------------------------------------------------
def _child(plan: LaunchPlan, stdio: Stdio, report_fd: int, go_fd: int, task_server: int) -> None:
    reported = False
    try:
        _die_with(task_server)  # first: joining the pod and compiling the module may take seconds
        gc.disable()  # a collection would touch (and so copy) the parent's shared pages for nothing
        signal.set_wakeup_fd(-1)
        # The loop's handlers, and what CPython ignores at start-up (an ignored signal stays ignored
        # across the exec of WasmEdge: a module over RLIMIT_FSIZE would get EFBIG, not SIGXFSZ).
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                    signal.SIGUSR1, signal.SIGUSR2, *RESTORED_SIGNALS):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.setsid()
        report_fd, go_fd = _setup_fds(stdio, report_fd, go_fd)
        if plan.terminal:
            # Its controlling terminal (this new session's first): the pty's ^C and ^Z signal it.
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        if plan.cgroup is not None:
            plan.cgroup.add(os.getpid())  # first: everything allocated from here on is charged to it
        for kind, path in plan.namespaces:
            _join_namespace(kind, path)
        if plan.file_binds:
            _bind_files(plan.file_binds, plan.readonly_rootfs)
        if plan.oom_score_adj is not None:
            try:
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write(str(plan.oom_score_adj))
            except OSError:
                pass  # lowering it needs CAP_SYS_RESOURCE; CRI's restrict_oom_score_adj covers that
        linux.set_process_name(f"wasm-{plan.name[:10]}")
        if plan.runtime == "wasmedge":
            argv = wasmedge_argv(plan.wasmedge, plan.run)
            runnable = None
        else:
            runnable = wasmtime_runnable(plan.run)
        for res, soft, hard in plan.rlimits:
            resource.setrlimit(res, (soft, hard))
        _drop_privileges(plan.user)
        _die_with(task_server)  # again: a change of credentials clears it
        os.write(report_fd, b"ok")
        os.close(report_fd)
        reported = True
        if go_fd >= 0:
            go = os.read(go_fd, 1)
            os.close(go_fd)
            if go != b"1":  # the task server deleted us (or died) before Start
                os._exit(0)
        if runnable is None:
            os.execve(argv[0], argv, dict(kv.split("=", 1) for kv in plan.run.env if "=" in kv))
        os._exit(runnable.run())
    except BaseException as exc:  # noqa: BLE001 - report anything, then die: never return to the loop
        try:
            if not reported:
                kind = "M" if isinstance(exc, ModuleError) else "S"
                message = str(exc) or type(exc).__name__
                os.write(report_fd, f"!{kind}{message}".encode(errors="replace")[:REPORT_MAX])
            else:
                os.write(2, f"wasm-sandboxer: {exc}\n".encode(errors="replace"))
        finally:
            os._exit(1 if not reported else 126)


def _die_with(task_server: int) -> None:
    """Be killed when the task server dies (a crash, kill -9): containerd takes the end of the task
    connection for every container's exit anyway, and nobody else would know of this process, which
    lives in the pod's cgroup and namespaces. Exits now if the task server is already gone."""
    linux.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != task_server:  # it died before the signal was set
        os._exit(137)


def _setup_fds(stdio: Stdio, report_fd: int, go_fd: int) -> tuple[int, int]:
    """Put the container's stdio on 0-2 (/dev/null where absent) and close every other fd."""
    def above_stdio(fd: int) -> int:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) if 0 <= fd < 3 else fd

    sources = [above_stdio(fd) for fd in (stdio.stdin, stdio.stdout, stdio.stderr)]
    report_fd = above_stdio(report_fd)
    go_fd = above_stdio(go_fd)
    null = -1
    for target, fd in enumerate(sources):
        if fd < 0:
            if null < 0:
                null = above_stdio(os.open(os.devnull, os.O_RDWR))
            fd = null
        os.dup2(fd, target)  # inheritable, blocking: the FIFOs were opened O_NONBLOCK then made blocking
    keep = sorted({report_fd, go_fd} - {-1})
    low = 3
    for fd in [*keep, os.sysconf("SC_OPEN_MAX")]:
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    return report_fd, go_fd


def _join_namespace(kind: str, path: str) -> None:
    flag = NAMESPACE_FLAGS.get(kind)
    if flag is None:
        return
    if not path:
        linux.unshare(flag)  # OCI: a namespace without a path is a new, empty one
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        linux.setns(fd, flag)
    finally:
        os.close(fd)


def _bind_files(binds: list[FileBind], readonly_rootfs: str = "") -> None:
    """Bind each file over its target in a mount namespace of this process's own (gone with it, so
    nothing is left to unmount), a slave of the host's: the rootfs's unmount still reaches it, and
    nothing made here reaches the host. A missing target is made, as runc makes a mount point (before
    the rootfs is made read-only, as runc does). `readonly_rootfs`: a bind of the rootfs over itself,
    read-only, goes under the files."""
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount("none", "/", "", linux.MS_REC | linux.MS_SLAVE)
    for bind in binds:  # the mount points first: a read-only rootfs takes none
        try:
            parent, fd, _ = beneath.open_beneath(bind.root, bind.relative, beneath.FILE)
            os.close(fd)
            os.close(parent)
        except OSError as exc:
            raise InvalidArgument(f"binding {bind.source} at {bind.target}: {exc.strerror or exc}") from None
    if readonly_rootfs:
        try:
            linux.mount(readonly_rootfs, readonly_rootfs, "", linux.MS_BIND | linux.MS_REC)
            linux.mount("none", readonly_rootfs, "", linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY)
        except OSError as exc:
            raise InvalidArgument(f"making the rootfs read-only: {exc.strerror or exc}") from None
    for bind in binds:
        beneath.bind_beneath(bind.source, bind.root, bind.relative, readonly=bind.readonly, recursive=bind.recursive)


def _drop_privileges(user: User) -> None:
    if user.uid == 0 and user.gid == 0 and not user.additional_gids:
        return
    os.setgroups(user.additional_gids)
    os.setgid(user.gid)
    os.setuid(user.uid)
