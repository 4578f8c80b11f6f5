"""Task API for WebAssembly containers, served by the wasm task server (one process for every pod).

A container is one process forked from the task server (launch.py) that joins the pod's namespaces
and the container's own cgroup and runs one module (runner.py); an exec is another such process in
the same cgroup, namespaces and rootfs. Exits come from the task server's reaper, like runc's.
A process with a terminal gets a pty made here as its stdio and controlling terminal; the task server
copies between its master and containerd's FIFOs (fifo_stdio.ProcessIO), as for runc's consoles.
A container's cgroup and rootfs mount outlive a crash of the task server: they are recorded before
they are made, for the task server started next (leftovers.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import posixpath
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import empty_pb2

from kuasar.common import cgroup_attach, cgroups, mounts
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unimplemented,
)
from kuasar.common.events import EventPublisher
from kuasar.common.fifo_stdio import ProcessIO
from kuasar.common.ids import validate_id
from kuasar.common.oom import OomWatch
from kuasar.common.reaper import Exit, Reaper
from kuasar.common.rootfs_paths import resolve_in_root
from kuasar.common.task_table import (
    STATS_OF_STOPPED,
    TaskContainer,
    TaskProcess,
    TerminalTasks,
    dead_init_pids,
    drain_and_close_io,
    parse_exec_spec,
    pod_id_of,
    report_init_exit_last,
    signal_quietly,
    state_response,
    unfinished_execs,
    wait_exited,
)
from kuasar.common.ttrpc import Context

from . import resources
from .cache import DEFAULT_MAX_BYTES, ModuleCache
from .image_modules import ContainerdUnavailable, ImageModules
from .launch import RLIMITS, FileBind, Launch, LaunchPlan, Stdio, User, launch, rlimit_values
from .leftovers import ContainerLeftovers, ContainerRecords
from .module import NotAModule, check_module_header, is_component, locate_module, module_file
from .runner import DEFAULT_ENTRY, RUN_INTERFACE, Preopen, RunSpec, wasmedge_dirs

log = logging.getLogger(__name__)
# runc's $PATH for a process whose environment sets none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Per-container engine choice; CRI passes it on only if the runtime's `container_annotations`
# (or `pod_annotations`) allow it, e.g. container_annotations = ["io.kuasar.wasm.*"].
RUNTIME_ANNOTATION = "io.kuasar.wasm.runtime"
RUNTIMES = ("wasmtime", "wasmedge")
# Bind mounts below these are kernel interfaces, never preopened into a module.
NOT_PREOPENED = ("/proc", "/sys", "/dev")
# Nor bound over a file of the rootfs; a regular file under /dev may be (kubelet's /dev/termination-log,
# where a module may leave the message its pod status shows).
NOT_BOUND = ("/proc", "/sys")
# After a process exits its cgroup may stay busy for a moment; this bounds the wait before rmdir.
CGROUP_DRAIN_TIMEOUT = 5.0
# How long Delete waits for killed processes of a container (SIGKILL does not take longer).
KILL_WAIT = 10.0
PRUNE_INTERVAL = 60.0


@dataclass
class WasmSettings:
    runtime: str = "wasmtime"  # default engine: "wasmtime" or "wasmedge"
    wasmedge: str = "wasmedge"  # WasmEdge binary (name in PATH or absolute path)
    cache: bool = True
    cache_max_bytes: int = DEFAULT_MAX_BYTES
    linux_containers: bool = True  # images without a module run as Linux containers (pod_tasks.py)
    runc: str = "runc"  # their runtime (name in PATH or absolute path)
    # containerd's gRPC socket, where an image's wasm layers are read (image_modules.py); "": not read
    containerd_address: str = ""


@dataclass
class Process(TaskProcess):
    io: ProcessIO = field(default_factory=ProcessIO)  # containerd's FIFOs; with a terminal, the pty copy
    spec: dict[str, Any] = field(default_factory=dict)
    launch: Launch | None = None

    @property
    def alive(self) -> bool:
        """Running, and its pid still its own (not reaped: an init whose exit waits for its execs')."""
        return self.pid > 0 and self.status != types.STOPPED and not self.reaped


@dataclass
class Container(TaskContainer):
    pod_id: str
    namespace: str
    spec: dict[str, Any]
    rootfs: Path
    runtime: str
    wasmedge: str
    init: Process
    memory_limit: int = 0
    cgroup: cgroups.PodCgroup | None = None
    oom: OomWatch | None = None
    image_module: Path | None = None  # the init's module, when the image carries it as a layer


def memory_limit_of(spec: dict[str, Any]) -> int:
    limit = (((spec.get("linux") or {}).get("resources") or {}).get("memory") or {}).get("limit")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else 0


def split_entrypoint(arg0: str) -> tuple[str, str]:
    """(module name, exported function) from args[0], `module.wasm#function` as runwasi reads it (the
    function defaults to `_start`); the whole args[0] stays the module's argv[0]."""
    name, sep, entry = arg0.partition("#")
    if sep and not (name and entry):
        raise InvalidArgument(f"args[0] {arg0!r} is not module.wasm#function")
    return name, entry or DEFAULT_ENTRY


def module_of(rootfs: Path, args: list[str], cwd: str, image_module: Path | None = None) -> tuple[Path, str]:
    """(host path of the module, export to run) that a process's args name: what its launch will run,
    so that Create and Exec refuse what the launch would. With an `image_module` (the container's image
    carries its module as a wasm layer), args[0] names only the export unless it names a file in the
    rootfs: an exec runs a module there, else the layer (`kubectl exec pod -- probe#healthy`), which
    was read at Create."""
    module_name, entry = split_entrypoint(args[0] if args else "")
    if image_module is not None and module_file(rootfs, module_name, cwd) is None:
        try:
            check_module_header(image_module, "the image's wasm layer")
        except NotAModule as exc:  # a wasm image's: never one for runc (pod_tasks.py)
            raise InvalidArgument(str(exc)) from None
        return image_module, entry
    return locate_module(rootfs, [module_name], cwd), entry


def runnable_module(container: Container, args: list[str], cwd: str,
                    image_module: Path | None = None) -> tuple[Path, str]:
    """`module_of`, refusing what the container's runtime would refuse when the process starts."""
    module, entry = module_of(container.rootfs, args, cwd, image_module)
    if is_component(module):
        if entry != DEFAULT_ENTRY:
            raise InvalidArgument(f"args[0] {args[0]!r} names a function after '#', but a component runs its "
                                  f"{RUN_INTERFACE} export")
        if container.runtime == "wasmedge":
            raise Unimplemented(f"{args[0]!r} is a component (WASI preview 2): components run with wasmtime "
                                "only (WasmEdge runs core modules)")
    elif entry != DEFAULT_ENTRY and container.runtime == "wasmedge":
        raise Unimplemented(f"{args[0]!r}: a '#function' entrypoint runs with wasmtime only (WasmEdge's "
                            "command line runs _start with WASI arguments)")
    return module, entry


def _on_path(rootfs: Path, name: str, env: list[Any]) -> bool:
    """Whether `name` is a file in one of the rootfs's directories the process's $PATH lists, where runc
    would find it."""
    path = next((str(e)[5:] for e in env if str(e).startswith("PATH=")), DEFAULT_PATH)
    return any(module_file(rootfs, posixpath.join(d, name)) is not None for d in path.split(":") if d.startswith("/"))


def _binds(spec_mounts: list[dict[str, Any]], excluded: tuple[str, ...]) -> Iterator[tuple[str, str, list[str]]]:
    """(source, destination, options) of the spec's bind mounts, but for those under `excluded`."""
    for m in spec_mounts or []:
        options = [str(o) for o in m.get("options") or []]
        destination, source = str(m.get("destination", "")), str(m.get("source", ""))
        if m.get("type") != "bind" and "bind" not in options and "rbind" not in options:
            continue
        if not destination.startswith("/") or not source.startswith("/"):
            continue
        destination = os.path.normpath(destination)
        if destination == "/" or any(destination == p or destination.startswith(p + "/") for p in excluded):
            continue
        yield source, destination, options


def bind_preopens(spec_mounts: list[dict[str, Any]]) -> list[Preopen]:
    """The spec's directory bind mounts, preopened at their destinations."""
    return [Preopen(source, destination, writable="ro" not in options)
            for source, destination, options in _binds(spec_mounts, NOT_PREOPENED) if os.path.isdir(source)]


def file_binds(spec_mounts: list[dict[str, Any]], rootfs: Path) -> list[FileBind]:
    """The spec's bind mounts of regular files (WASI preopens directories only), bound over their
    destinations by the container's process (`launch.FileBind`) where the module will look: in the
    directory of the preopen that covers the destination (a subPath file under a volume's mount point
    is reached through that volume's preopen, the longest match, as wasi-libc picks it), else in the
    rootfs. Symlinks are followed inside that directory only. A device, socket or FIFO is never bound."""
    directories = sorted(((Path(p.guest), Path(p.host)) for p in bind_preopens(spec_mounts)),
                         key=lambda guest_host: len(guest_host[0].parts), reverse=True)
    binds = []
    for source, destination, options in _binds(spec_mounts, NOT_BOUND):
        if not os.path.isfile(source):
            continue
        where, inside = rootfs, destination
        for guest, host in directories:
            if Path(destination).is_relative_to(guest):
                where, inside = host, "/" + str(Path(destination).relative_to(guest))
                break
        target = resolve_in_root(where, inside)
        binds.append(FileBind(source, str(target), readonly="ro" in options, recursive="rbind" in options,
                              root=str(where), relative=str(target.relative_to(where))))
    return binds


class WasmTasks(TerminalTasks):
    def __init__(self, reaper: Reaper, events: EventPublisher, directory: Path,
                 settings: WasmSettings | None = None) -> None:
        super().__init__()
        self.reaper = reaper
        self.events = events
        # A container's process moves itself into its cgroup first thing after the fork.
        self.attach_warmer = cgroup_attach.WARMER
        self.settings = settings or WasmSettings()
        if self.settings.runtime not in RUNTIMES:
            raise InvalidArgument(f"[wasm] runtime must be one of {', '.join(RUNTIMES)}, "
                                  f"not {self.settings.runtime!r}")
        self.cache = ModuleCache(directory / "wasm-cache", self.settings.cache_max_bytes) \
            if self.settings.cache else None
        if self.cache is not None:
            self.cache.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._pruned_at = 0.0
        self.image_modules = ImageModules(self.settings.containerd_address) \
            if self.settings.containerd_address else None
        self.containers: dict[str, Container] = {}
        self.leftovers = ContainerRecords(directory)

    # -- planning ----------------------------------------------------------------------------------
    def select_runtime(self, spec: dict[str, Any]) -> tuple[str, str]:
        """(runtime, WasmEdge binary) for a container: its annotation, else the configured default."""
        annotations = spec.get("annotations") or {}
        runtime = str(annotations.get(RUNTIME_ANNOTATION) or self.settings.runtime).strip().lower()
        if runtime == "wasmtime":
            return runtime, ""
        if runtime != "wasmedge":
            raise InvalidArgument(f"unknown wasm runtime {runtime!r} (annotation {RUNTIME_ANNOTATION} or "
                                  f"[wasm] runtime): choose one of {', '.join(RUNTIMES)}")
        binary = self.settings.wasmedge
        path = binary if "/" in binary else shutil.which(binary)
        if not path or not os.access(path, os.X_OK):
            raise FailedPrecondition(
                f"runtime wasmedge selected but no WasmEdge binary {binary!r} was found "
                f"(PATH={os.environ.get('PATH', '')}); install WasmEdge, set [wasm] wasmedge = "
                f"\"/path/to/wasmedge\", or use runtime wasmtime")
        return runtime, path

    def plan(self, container: Container, process: dict[str, Any], name: str,
             image_module: Path | None = None) -> LaunchPlan:
        if not isinstance(process, dict):
            raise InvalidArgument("the OCI spec has no process")
        args = [str(a) for a in process.get("args") or []]
        cwd = str(process.get("cwd") or "/")
        module, entry = runnable_module(container, args, cwd, image_module)
        root_readonly = bool((container.spec.get("root") or {}).get("readonly", False))
        binds = file_binds(container.spec.get("mounts") or [], container.rootfs)
        # A writable file in a read-only root (kubelet's /dev/termination-log with readOnlyRootFilesystem)
        # is reached through the rootfs's preopen, which WASI would keep read-only for it too: the
        # kernel keeps the root read-only instead (`launch`), and the preopen is writable.
        kernel_readonly_root = root_readonly and any(not bind.readonly for bind in binds)
        preopens = [Preopen(str(container.rootfs), "/", writable=not root_readonly or kernel_readonly_root),
                    *bind_preopens(container.spec.get("mounts") or [])]
        run = RunSpec(str(module), args, [str(e) for e in process.get("env") or []], preopens,
                      container.memory_limit, str(self.cache.directory) if self.cache else "",
                      self.cache.max_bytes if self.cache else 0, entry)
        if container.runtime == "wasmedge":
            wasmedge_dirs(preopens)
        linux = container.spec.get("linux") or {}
        namespaces = [(str(ns.get("type")), str(ns.get("path") or "")) for ns in linux.get("namespaces") or []
                      if ns.get("type") in ("network", "ipc", "uts")]
        user = process.get("user") or {}
        rlimits = []
        try:
            for rlimit in process.get("rlimits") or []:
                rlimit_type = str(rlimit.get("type", ""))
                kind = RLIMITS.get(rlimit_type.removeprefix("RLIMIT_"))
                if kind is None:
                    raise InvalidArgument(f"unknown rlimit {rlimit.get('type')!r}")
                soft, hard = rlimit_values(rlimit_type, int(rlimit.get("soft", 0)), int(rlimit.get("hard", 0)))
                rlimits.append((kind, soft, hard))
            owner = User(int(user.get("uid", 0)), int(user.get("gid", 0)),
                         [int(g) for g in user.get("additionalGids") or []])
        except (TypeError, ValueError, AttributeError) as exc:  # a spec's numbers that are not numbers
            raise InvalidArgument(f"process.user or process.rlimits: {exc}") from None
        oom = process.get("oomScoreAdj")
        return LaunchPlan(name, container.runtime, run, namespaces, container.cgroup, owner,
                          rlimits, oom if isinstance(oom, int) else None, container.wasmedge,
                          terminal=bool(process.get("terminal")), file_binds=binds,
                          readonly_rootfs=str(container.rootfs) if kernel_readonly_root else "")

    def _maybe_prune(self) -> None:
        if self.cache is not None and time.monotonic() - self._pruned_at > PRUNE_INTERVAL:
            self._pruned_at = time.monotonic()
            self.cache.prune()

    # -- lifecycle ---------------------------------------------------------------------------------
    async def create(self, req: task.CreateTaskRequest, ctx: Context) -> task.CreateTaskResponse:
        async with self._creating(req) as (bundle, spec):
            pod_id = pod_id_of(spec.get("annotations") or {})
            runtime, wasmedge = self.select_runtime(spec)
            root_path = Path(str((spec.get("root") or {}).get("path") or "rootfs"))
            rootfs = bundle / "rootfs" if req.rootfs else (root_path if root_path.is_absolute()
                                                            else bundle / root_path)
            process_spec = dict(spec.get("process") or {})
            process_spec["terminal"] = req.terminal  # what containerd asks for, as runc's shim goes by
            proc = Process("", io=ProcessIO(req.stdin, req.stdout, req.stderr, req.terminal), spec=process_spec)
            container = Container(req.id, bundle, pod_id, ctx.namespace or "k8s.io", spec, rootfs, runtime,
                                  wasmedge, proc, memory_limit_of(spec))
            path = cgroups.cgroupfs_path(str((spec.get("linux") or {}).get("cgroupsPath") or ""))
            if path:
                container.cgroup = cgroups.PodCgroup(path)  # (refuses a path out of the hierarchy)
            # Before they are made: a task server killed in between would leave them to nobody. The
            # cgroup only once it is known to be made here: one that exists already is not ours to empty.
            mounted = str(rootfs) if req.rootfs else ""
            self.leftovers.write(req.id, ContainerLeftovers("", mounted))
            try:
                if req.rootfs:
                    mounts.mount_rootfs(req.rootfs, rootfs)
                    container.rootfs_mounted = True
                container.image_module = await self._image_module(container, proc.spec)
                # Before the cgroup is made: an image without a module (NotAModule) may go to runc instead
                # (pod_tasks.py), which makes its own.
                plan = self._plan(container, proc)
                if container.cgroup is not None:
                    container.cgroup.create(lambda made: self.leftovers.write(
                        req.id, ContainerLeftovers(made.path, mounted)))
                    container.cgroup.leave_parents()
                    resources.apply_resources(container.cgroup,
                                              (spec.get("linux") or {}).get("resources") or {})
                self._maybe_prune()
                await self._launch(container, proc, wait_for_go=True, plan=plan)
            except BaseException:
                await self._release(container)
                raise
            self.containers[req.id] = container
        log.info("container %s created in pod %s pid %d (%s)", req.id, pod_id, proc.pid, runtime)
        self._publish_create(req, req.bundle, proc.pid, container.namespace)
        return task.CreateTaskResponse(pid=proc.pid)

    def _plan(self, container: Container, proc: Process) -> LaunchPlan:
        name = f"{container.id}-{proc.id}" if proc.id else container.id
        return self.plan(container, proc.spec, name, container.image_module)

    async def _image_module(self, container: Container, process: dict[str, Any]) -> Path | None:
        """The module of the container's image, when args[0] names no file in the rootfs and the image
        carries its module as a wasm layer (image_modules.py); asked only then, so that a module in the
        rootfs starts without a call to containerd."""
        args = process.get("args") if isinstance(process, dict) else None
        if self.image_modules is None or not args or not isinstance(args[0], str):
            return None
        name, _ = split_entrypoint(args[0])
        if module_file(container.rootfs, name, str(process.get("cwd") or "/")) is not None:
            return None
        if "/" not in name and _on_path(container.rootfs, name, process.get("env") or []):
            return None  # a program of a Linux container's image (pod_tasks.py)
        try:
            found = await self.image_modules.find(container.id, container.namespace, container.bundle)
        except ContainerdUnavailable as exc:
            # As if the image carried no module: a Linux container still gets to runc, and a missing
            # module is still reported as missing from the rootfs.
            log.warning("container %s: %s; its image's layers are not looked at", container.id, exc)
            return None
        if found is None:
            return None
        log.info("container %s runs the wasm layer %s of image %s (%s)", container.id, found.digest, found.image,
                 found.path)
        return found.path

    async def _launch(self, container: Container, proc: Process, wait_for_go: bool,
                      plan: LaunchPlan | None = None) -> None:
        """Fork the process (by `plan`, if it was made already), wait until its module is ready (or fail
        with the reason), watch its exit."""
        with self.attach_warmer.held():  # until the child has reported, by when it is in its cgroup
            plan = plan or self._plan(container, proc)
            if plan.terminal:
                master, stdio = _terminal_stdio()
            else:
                master, stdio = -1, _fifo_stdio(proc.io)
            try:
                started = launch(plan, stdio, self.reaper, wait_for_go)
            except BaseException:
                if master >= 0:
                    os.close(master)
                proc.io.close()  # the output readers and the stdin writer it holds for the process
                raise
            finally:
                # The child holds them now: the pty's slave is ours alone, the FIFOs are the io's.
                if plan.terminal:
                    stdio.close()
                else:
                    proc.io.release_fds()
            proc.launch = started
            try:
                if master >= 0:
                    owned, master = master, -1  # the io closes it from here on
                    proc.io.attach_master(owned)
                await started.ready()
            except BaseException:
                proc.io.close()
                started.close_go()
                started.close_report()
                signal_quietly(started.pid, signal.SIGKILL)
                await asyncio.shield(started.exited)
                proc.launch, proc.pid = None, 0
                raise
        proc.pid = started.pid
        started.exited.add_done_callback(lambda future: self._on_exit(container, proc, future))

    def _on_exit(self, container: Container, proc: Process, future: asyncio.Future[Exit]) -> None:
        if future.cancelled():
            return
        exited = future.result()
        if proc.launch is not None:
            proc.launch.close_go()
        if proc is container.init:
            # As when a container's PID namespace ends: its execs do not outlive it, and their exits
            # come before its own.
            for other in container.execs.values():
                if other.alive:
                    signal_quietly(other.pid, signal.SIGKILL)
            unfinished = unfinished_execs(container)
            if unfinished:
                report_init_exit_last(container, unfinished, lambda: self._record_exit(container, proc, exited))
                return
        self._record_exit(container, proc, exited)

    async def _end_late_exec(self, container: Container, proc: Process) -> None:
        signal_quietly(proc.pid, signal.SIGKILL)  # our child, its exit not recorded: the pid is its own

    async def _start_init(self, container: Container, proc: Process) -> None:
        if proc.launch is None or proc.launch.go_fd < 0:
            raise FailedPrecondition(f"container {container.id} process is gone")
        proc.launch.go()
        proc.status = types.RUNNING
        container.oom = OomWatch(proc.pid, lambda: self._on_oom(container))

    async def _run_exec(self, container: Container, proc: Process) -> None:
        # Never into a paused container (_start_exec refuses it, Pause waits for this): the exec would
        # join the frozen cgroup and freeze before it reports, and its Start would wait for it.
        await self._launch(container, proc, wait_for_go=False)

    async def exec(self, req: task.ExecProcessRequest, ctx: Context) -> empty_pb2.Empty:
        validate_id(req.exec_id, "exec id")
        spec = parse_exec_spec(req)
        spec["terminal"] = req.terminal
        async with self._holding(req.id, shared=True) as container:  # not behind other execs' Starts
            container.check_new_exec(req.exec_id)
            # Fail now, not at Start, if the module is not there or cannot run (ExecSync then says why).
            runnable_module(container, [str(a) for a in spec["args"]], str(spec.get("cwd") or "/"),
                            container.image_module)
            container.execs[req.exec_id] = Process(
                req.exec_id, io=ProcessIO(req.stdin, req.stdout, req.stderr, req.terminal), spec=spec)
        self._publish_exec_added(req, container.namespace)
        return empty_pb2.Empty()

    async def kill(self, req: task.KillRequest, ctx: Context) -> empty_pb2.Empty:
        container = self._get(req.id)
        proc = container.process(req.exec_id)
        targets = [proc] if req.exec_id or not req.all else container.processes()
        if req.exec_id and proc.status == types.CREATED:
            # As containerd's shim (and the runc backend): an exec not started has nothing to signal yet.
            raise FailedPrecondition(f"exec {req.exec_id} of {req.id} is not running")
        if not any(p.alive for p in targets):
            raise NotFound(f"process {req.exec_id or req.id} already finished")
        for target in targets:
            if target.alive:
                signal_quietly(target.pid, req.signal)
        if not req.exec_id and container.init.status == types.PAUSED and req.signal == signal.SIGKILL:
            # A frozen process only dies once thawed. Only a kill of the init (with or without `all`) ends
            # the container; an exec alone dies when the container is resumed, as under runc.
            await self._thaw(container)
        return empty_pb2.Empty()

    async def _remove(self, container: Container) -> None:
        await self._kill_and_wait(container)
        await self._release(container)
        await drain_and_close_io(container.processes())
        self._forget(container.id)

    async def _delete_exec(self, container: Container, proc: Process) -> None:
        await drain_and_close_io([proc])

    async def _kill_and_wait(self, container: Container) -> None:
        if container.init.status == types.PAUSED:
            await self._thaw(container)
        alive = [p for p in container.processes() if p.alive]
        for proc in alive:
            signal_quietly(proc.pid, signal.SIGKILL)
        if alive:
            try:
                async with asyncio.timeout(KILL_WAIT):
                    await asyncio.gather(*(p.exited.wait() for p in alive))
            except TimeoutError:
                log.warning("container %s: processes %s survived SIGKILL", container.id,
                            [p.pid for p in alive if not p.exited.is_set()])

    async def _release(self, container: Container) -> None:
        """Undo what Create set up: go pipe, OOM watch, cgroup, rootfs mount; and forget its record
        unless the cgroup is still in use (the next task server's sweep tries again)."""
        if container.init.launch is not None:
            container.init.launch.close_go()
        if container.oom is not None:
            container.oom.close()
            container.oom = None
        in_use = []
        if container.cgroup is not None:
            await _drain(container.cgroup)
            made = list(container.cgroup.created)
            container.cgroup.remove()  # (leaves one still in use, and says so)
            in_use = [directory for directory in made if os.path.isdir(directory)]
        if container.rootfs_mounted:
            mounts.unmount_all(container.rootfs)
            container.rootfs_mounted = False
        if not in_use:
            self.leftovers.forget(container.id)

    async def sweep_leftovers(self) -> None:
        """Remove what the containers of a task server that died left (leftovers.py); ours is the only
        task server of the directory, so a container recorded there is none of ours."""
        self.leftovers.sweep()

    # -- inspection --------------------------------------------------------------------------------
    async def state(self, req: task.StateRequest, ctx: Context) -> task.StateResponse:
        container = self._get(req.id)
        proc = container.process(req.exec_id)
        return state_response(req, container, proc)

    async def pids(self, req: task.PidsRequest, ctx: Context) -> task.PidsResponse:
        container = self._get(req.id)
        alive = [types.ProcessInfo(pid=p.pid) for p in container.processes() if p.alive]
        return task.PidsResponse(processes=alive) if alive else dead_init_pids(container.init)

    async def stats(self, req: task.StatsRequest, ctx: Context) -> task.StatsResponse:
        container = self._get(req.id)
        if container.cgroup is not None:
            return task.StatsResponse(stats=cgroups.metrics_for_path(container.cgroup.path))
        if not container.init.alive:
            raise NotFound(STATS_OF_STOPPED.format(req.id))
        return task.StatsResponse(stats=cgroups.metrics_for_pid(container.init.pid))

    # -- control -----------------------------------------------------------------------------------
    async def pause(self, req: task.PauseRequest, ctx: Context) -> empty_pb2.Empty:
        # Under the container's lock, held exclusively: an exec Start holds it shared from joining the
        # cgroup until its process has reported, and a freeze in between would leave that Start waiting
        # for a frozen process.
        async with self._holding(req.id) as container:
            container.require_init(types.RUNNING, "pause")
            await resources.freeze(container.cgroup, True)  # thaws again if it fails
            if container.init.status != types.RUNNING:
                # The init exited while the freezer settled (the reaper has recorded STOPPED): PAUSED
                # would hide that exit from State and make Delete refuse a dead container.
                resources.thaw_now(container.cgroup)
                raise FailedPrecondition(f"container {req.id} stopped while it was being paused")
            container.init.status = types.PAUSED
            self._publish_paused(req.id, True, container.namespace)
        return empty_pb2.Empty()

    async def resume(self, req: task.ResumeRequest, ctx: Context) -> empty_pb2.Empty:
        async with self._holding(req.id) as container:
            container.require_init(types.PAUSED, "resume")
            await self._thaw(container)
            self._publish_paused(req.id, False, container.namespace)
        return empty_pb2.Empty()

    async def _thaw(self, container: Container) -> None:
        await resources.freeze(container.cgroup, False)
        if container.init.status == types.PAUSED:
            container.init.status = types.RUNNING

    async def update(self, req: task.UpdateTaskRequest, ctx: Context) -> empty_pb2.Empty:
        container = self._get(req.id)
        try:
            linux_resources = json.loads(req.resources.value or b"{}")
        except ValueError:
            raise InvalidArgument("resources is not OCI LinuxResources JSON") from None
        if container.cgroup is None:
            raise FailedPrecondition(f"container {req.id} has no cgroup (its spec had no cgroupsPath)")
        resources.apply_resources(container.cgroup, linux_resources)
        limit = memory_limit_of({"linux": {"resources": linux_resources}})
        if limit:
            container.memory_limit = limit  # the store limit of execs started from now on
        return empty_pb2.Empty()

    # -- pod hooks (kuasar.common.pod_service.PodContainers) -----------------------------------------
    def pod_container_ids(self, pod_id: str) -> list[str]:
        return [c.id for c in self.containers.values() if c.pod_id == pod_id]

    async def kill_pod_containers(self, pod_id: str, sig: int) -> None:
        for container in [c for c in self.containers.values() if c.pod_id == pod_id]:
            for proc in container.processes():
                if proc.alive:
                    signal_quietly(proc.pid, sig)
            if sig == signal.SIGKILL and container.init.status == types.PAUSED:
                await self._thaw(container)

    async def wait_pod_containers(self, pod_id: str, timeout: float) -> bool:
        return await wait_exited([c.init for c in self.containers.values() if c.pod_id == pod_id and c.init.alive],
                                 timeout)

    async def remove_pod_containers(self, pod_id: str) -> None:
        for container in [c for c in self.containers.values() if c.pod_id == pod_id]:
            async with self._lock(container.id):
                if self.containers.get(container.id) is not container:
                    continue  # a Delete got there first
                await self._remove(container)
            log.info("pod %s: removed leftover container %s", pod_id, container.id)


async def _drain(cgroup: cgroups.PodCgroup) -> None:
    """Wait (briefly) until no process is left in the cgroup, so removing it does not fail busy."""
    procs = cgroups.CGROUP_ROOT / cgroup.path / "cgroup.procs" if cgroups.is_unified() \
        else cgroups.CGROUP_ROOT / "memory" / cgroup.path / "cgroup.procs"
    deadline = time.monotonic() + CGROUP_DRAIN_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if not procs.read_text().strip():
                return
        except OSError:
            return
        await asyncio.sleep(0.01)


def _fifo_stdio(io: ProcessIO) -> Stdio:
    """containerd's FIFOs as the process's stdio (it holds them itself, so its output never depends on
    the task server copying anything); the io keeps our copies until release_fds."""
    opened = io.runc_stdio()
    return Stdio(*(-1 if fd is None else fd for fd in (opened.stdin, opened.stdout, opened.stderr)))


def _terminal_stdio() -> tuple[int, Stdio]:
    """A new pty: its master for the task server, its slave as the process's stdin, stdout and stderr."""
    master, slave = os.openpty()
    return master, Stdio(slave, slave, slave)
