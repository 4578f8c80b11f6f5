"""The Task API over runc, where runc-sandboxer (on the host) and the vm-agent (in the guest) agree.

Both start an init with `runc create` and an exec with `runc exec --detach`, learn the pid from runc's
pid file, watch its exit through the reaper, and answer Start, Exec, Delete, State, Stats,
Pause/Resume, ResizePty, CloseIO and Update the same way. What differs is where a container's files
live (`RuncContainer.files`), where runc's console socket goes (`_console_socket`), how a process's IO is made
(`_process_io`), how its fds are dropped (`_release_io` once runc holds them, `_discard_io` when
starting failed) and what else a removed container leaves (`_remove_files`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2, empty_pb2

from . import cgroups, mounts
from .api.containerd.runc.options import oci_pb2 as runc_options
from .api.containerd.runtime.task.v2 import shim_pb2 as task
from .api.containerd.types.task import task_pb2 as types
from .bounded import SWEEP_CONCURRENCY, each_bounded
from .cgroup_attach import AttachLockWarmer, warm
from .errors import FailedPrecondition, InvalidArgument, KuasarError, NotFound
from .ids import validate_id
from .oom import OomWatch
from .reaper import Exit, Reaper
from .runc_checkpoint import RestorePlan
from .runc_cli import Runc, Stdio
from .runtime_commands import LeftRuntimeCommands
from .task_table import (
    STATS_OF_STOPPED,
    TaskContainer,
    TaskProcess,
    TerminalTasks,
    dead_init_pids,
    drain_and_close_io,
    parse_exec_spec,
    report_init_exit_last,
    running_pids,
    signal_quietly,
    state_response,
    unfinished_execs,
)
from .ttrpc import Context

log = logging.getLogger(__name__)

# The type URL containerd's typeurl gives runc's ProcessDetails (the message's full name).
PROCESS_DETAILS_TYPE_URL = "containerd.runc.v1.ProcessDetails"


@dataclass
class RuncProcess(TaskProcess):
    """A process runc runs: its IO (the backend's ProcessIO) and, for an exec, its OCI Process JSON."""

    io: Any
    spec: bytes = b""


@dataclass
class RuncContainer(TaskContainer):
    """A container runc runs; `files` is the directory for its pid files, passed JSON files and log."""

    files: Path
    namespace: str
    init: RuncProcess
    oom: OomWatch | None = None
    # Set by a backend's Create from the spec (`shares_pid_namespace`): its init's exit ends the rest.
    shares_pids: bool = False
    # The cgroup.procs of a container that shares a PID namespace, learnt while its init is alive.
    procs_file: Path | None = None
    # A Create that named a checkpoint, on a backend that restores (RuncTasks): Start restores it.
    restore: RestorePlan | None = None

    @property
    def log(self) -> Path:
        return self.files / "log.json"


def _bundle_of(state: Any) -> Path | None:
    """The bundle a container was created from, from runc's state.json (its `bundle=` label)."""
    config = state.get("config") if isinstance(state, dict) else None
    labels = (config.get("labels") if isinstance(config, dict) else None) or []
    bundle = next((label.partition("=")[2] for label in labels
                   if isinstance(label, str) and label.startswith("bundle=")), "")
    return Path(bundle) if os.path.isabs(bundle) else None


class RuncContainerTasks(LeftRuntimeCommands, TerminalTasks):
    """A backend's containers (RuncContainer) are run by `self.runc`."""

    runc: Runc
    reaper: Reaper
    # Set by a backend on a host whose runc start-ups should not wait on the cgroup attach lock.
    attach_warmer: AttachLockWarmer | None = None

    # -- what a backend decides ----------------------------------------------------------------------
    def _console_socket(self, container: Any) -> Path:
        """A fresh path for runc's console socket."""
        raise NotImplementedError

    def _process_io(self, req: task.ExecProcessRequest) -> Any:
        raise NotImplementedError

    def _release_io(self, io: Any) -> None:
        """runc (and so the process) holds its fds now: drop ours."""
        raise NotImplementedError

    def _discard_io(self, io: Any) -> None:
        """Starting the process failed: drop what was opened for it."""
        raise NotImplementedError

    def _remove_files(self, container: Any) -> None:
        """A container is being removed: delete what the backend kept for it besides the bundle."""

    # -- processes -----------------------------------------------------------------------------------
    def _watch(self, container: Any, proc: RuncProcess, since_ns: int) -> None:
        def on_exit(future: asyncio.Future[Exit]) -> None:
            if future.cancelled():
                return
            exited = future.result()
            if proc is container.init:
                # Not for a container already removed (a pod's removal does not wait for ever): its id
                # and so its cgroup may be another's by now.
                current = self.containers.get(container.id) is container
                ended = current and self._end_the_rest(container)
                unfinished = unfinished_execs(container)
                # Held only while the execs are ending: with their PID namespace (the init's own), or
                # with the rest just ended; otherwise nothing would end them in time.
                if unfinished and (ended or not container.shares_pids):
                    report_init_exit_last(container, unfinished, lambda: self._record_exit(container, proc, exited))
                    return
            self._record_exit(container, proc, exited)

        self.reaper.watch(proc.pid, since_ns).add_done_callback(on_exit)

    async def _end_late_exec(self, container: Any, proc: RuncProcess) -> None:
        # Our child until we reap it, so its pid is its own; with a shared PID namespace, what it started.
        if not self._end_the_rest(container):
            signal_quietly(proc.pid, signal.SIGKILL)

    def _has_ended(self, proc: RuncProcess) -> bool:
        """Its exit is recorded, or it is an init reaped whose exit waits for its execs'."""
        return proc.status == types.STOPPED or proc.reaped

    def _end_the_rest(self, container: Any, sig: int = signal.SIGKILL) -> bool:
        """SIGKILL (or `sig`) what a container's init left in its shared PID namespace (its execs
        included), as containerd's shim does before it reports the init's exit; False if there is nothing
        we can reach (a container with a PID namespace of its own has nothing left: the kernel ended it)."""
        if container.procs_file is None:
            return False
        log.info("container %s: signal %d to the processes its init left", container.id, sig)
        cgroups.kill_members(container.procs_file, sig)
        return True

    def _kill_of_ended(self, container: Any, proc: RuncProcess, req: task.KillRequest) -> bool:
        """Answer a Kill of a process that has ended: NotFound, as containerd's shim reads runc's
        answer, except that a Kill of every process of a container whose init is gone (containerd's
        Delete sends one) gives what is left in a shared PID namespace the signal, as from the shim's
        `runc kill --all`. False when `proc` has not ended: the backend signals it."""
        if not self._has_ended(proc):
            return False
        if req.all and not req.exec_id and self._end_the_rest(container, req.signal or signal.SIGKILL):
            return True
        raise NotFound(f"process {req.exec_id or req.id} already finished")

    def _kill_without_runc(self, container: Any, req: task.KillRequest) -> bool:
        """Answer a Kill that needs no `runc kill`: of an ended process (`_kill_of_ended`) or of an exec,
        whose pid is signalled directly. False when the container's init is the backend's to signal."""
        proc = container.process(req.exec_id)
        if self._kill_of_ended(container, proc, req):
            return True
        if not req.exec_id:
            return False
        if not proc.pid:  # not started (or starting): as containerd's shim, nothing to signal yet
            raise FailedPrecondition(f"exec {req.exec_id} of {req.id} is not running")
        signal_quietly(proc.pid, req.signal)
        return True

    async def _start_process(self, container: Any, proc: RuncProcess, is_exec: bool) -> None:
        """`runc create` for init, `runc exec --detach` for an exec; learn the pid, watch its exit."""
        io = proc.io
        console = None
        receiving = None
        stdio = Stdio()
        if io.terminal:
            console = self._console_socket(container)
            io.listen_console(console)
            receiving = asyncio.create_task(io.receive_console())
        else:
            stdio = io.runc_stdio()
        pid_file = _pid_file(container, proc.id if is_exec else "")
        pid_file.unlink(missing_ok=True)  # what _undo_runc reads must be this run's
        started_ns = time.monotonic_ns()  # the process runc makes exits after this, if it already has
        try:
            with warm(self.attach_warmer):
                await self._run_runc(container, proc, is_exec, pid_file, stdio, console)
            if receiving is not None:
                await receiving
        except BaseException:
            if receiving is not None:
                receiving.cancel()
            self._discard_io(io)
            # runc may have made the process before what failed here (the console never came, a cancel):
            # nobody would know of it.
            await self._undo_runc(container, is_exec, pid_file)
            raise
        self._release_io(io)
        proc.pid = int(pid_file.read_text().strip())
        if not is_exec and container.shares_pids:
            container.procs_file = _container_procs_file(container.id, proc.pid)
        self._watch(container, proc, started_ns)
        if not is_exec:
            # After the Create reply is written and before containerd's Start can arrive: off the start's
            # critical path (~0.15 ms), and set while the init still waits on its exec FIFO.
            asyncio.get_running_loop().call_soon(self._watch_oom, container, proc)

    async def sweep_leftovers(self) -> None:
        """Delete every container in our runc root, with its rootfs mount: a task server just started
        knows none of them, so they are a dead one's (see pod_leftovers). The runc commands it left
        running are ended first (runtime_commands)."""
        if not self.runc.root.is_dir():
            return
        await self._end_runtime_commands()
        leftovers: list[tuple[str, Path | None]] = []
        for entry in sorted(self.runc.root.iterdir()):
            try:
                container_id = validate_id(entry.name, "container id")
                leftovers.append((container_id, _bundle_of(json.loads((entry / "state.json").read_bytes()))))
            except (OSError, ValueError, KuasarError):
                continue  # not a container runc made for us

        async def sweep_one(leftover: tuple[str, Path | None]) -> None:
            container_id, bundle = leftover
            log.warning("container %s: left by a task server that is gone; deleting it", container_id)
            try:
                await self.runc.delete(container_id)
            except KuasarError as exc:
                log.error("container %s: %s", container_id, exc.message)
            if bundle is not None:
                try:
                    mounts.unmount_all(bundle / "rootfs")
                except OSError as exc:  # one stuck mount must not keep the others
                    log.error("container %s: unmounting its rootfs: %s", container_id, exc)

        await each_bounded(leftovers, sweep_one, SWEEP_CONCURRENCY)

    # -- what runtime_commands needs to know of runc -------------------------------------------------
    def _runtime_binary_and_root(self) -> tuple[str, Path]:
        return self.runc.binary, self.runc.root

    def _runtime_saved(self, container_id: str) -> bool:
        return (self.runc.root / container_id / "state.json").exists()

    def _forget_unsaved(self, container_id: str) -> None:
        shutil.rmtree(self.runc.root / container_id, ignore_errors=True)

    async def _undo_runc(self, container: Any, is_exec: bool, pid_file: Path) -> None:
        if is_exec:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
            return
        try:
            await self.runc.delete(container.id)
        except Exception as exc:  # noqa: BLE001 - the first failure is the one to report
            log.warning("container %s: runc delete after a failed create: %s", container.id, exc)

    def _watch_oom(self, container: Any, proc: RuncProcess) -> None:
        # (RUNNING: a restored init, which runs when runc returns)
        if container.oom is None and self.containers.get(container.id) is container and \
                proc.status in (types.CREATED, types.RUNNING):
            container.oom = OomWatch(proc.pid, lambda: self._on_oom(container))

    async def _run_runc(self, container: Any, proc: RuncProcess, is_exec: bool, pid_file: Path, stdio: Stdio,
                        console: Path | None) -> None:
        files = container.files
        if is_exec:
            process_json = files / f"{proc.id}.process.json"
            process_json.write_bytes(proc.spec)
            # A log of its own: the error runc's `_run` reads back from a log shared by execs started
            # side by side could be another's.
            log_path = files / f"exec-{proc.id}.log.json"
            try:
                await self.runc.exec(container.id, process_json, pid_file, log_path, stdio, console)
            finally:
                process_json.unlink(missing_ok=True)
                log_path.unlink(missing_ok=True)
        else:
            await self.runc.create(container.id, container.bundle, pid_file, container.log, stdio, console)

    # -- lifecycle -----------------------------------------------------------------------------------
    async def _start_init(self, container: Any, proc: RuncProcess) -> None:
        await self.runc.start(container.id, container.bundle, container.log, proc.exited)
        if proc.status == types.CREATED:
            proc.status = types.RUNNING

    async def _run_exec(self, container: Any, proc: RuncProcess) -> None:
        await self._start_process(container, proc, is_exec=True)

    def _is_running(self, proc: TaskProcess) -> bool:
        return super()._is_running(proc) and bool(proc.pid)

    async def _delete_exec(self, container: Any, proc: RuncProcess) -> None:
        await drain_and_close_io([proc])
        # Its pid file would stay until the container goes: an exec probe every 10 s leaves thousands.
        _pid_file(container, proc.id).unlink(missing_ok=True)

    async def _remove(self, container: Any) -> None:
        if container.oom is not None:
            # Before runc removes the cgroup: cgroup v1 signals its OOM eventfd when the cgroup goes,
            # which read as an OOM kill (CRI then reports the container "OOMKilled").
            container.oom.close()
            container.oom = None
        await self.runc.delete(container.id)
        await drain_and_close_io(container.processes())
        if container.rootfs_mounted:
            mounts.unmount_all(container.bundle / "rootfs")
        self._remove_files(container)
        self._forget(container.id)

    async def exec(self, req: task.ExecProcessRequest, ctx: Context) -> empty_pb2.Empty:
        validate_id(req.exec_id, "exec id")
        spec = parse_exec_spec(req)
        async with self._holding(req.id, shared=True) as container:  # not behind other execs' Starts
            container.check_new_exec(req.exec_id)
            spec["terminal"] = req.terminal
            proc = RuncProcess(req.exec_id, self._process_io(req), spec=json.dumps(spec).encode())
            container.execs[req.exec_id] = proc
        self._publish_exec_added(req, container.namespace)
        return empty_pb2.Empty()

    # -- inspection ----------------------------------------------------------------------------------
    async def state(self, req: task.StateRequest, ctx: Context) -> task.StateResponse:
        container = self._get(req.id)
        proc = container.process(req.exec_id)
        return state_response(req, container, proc)

    async def pids(self, req: task.PidsRequest, ctx: Context) -> task.PidsResponse:
        container = self._get(req.id)
        if container.init.status == types.STOPPED:
            return dead_init_pids(container.init)
        pids = await running_pids(container.init, self.runc.ps(req.id))
        execs = {proc.pid: proc.id for proc in container.execs.values() if proc.pid and proc.status != types.STOPPED}
        return task.PidsResponse(processes=[_process_info(pid, execs.get(pid, "")) for pid in pids])

    async def stats(self, req: task.StatsRequest, ctx: Context) -> task.StatsResponse:
        container = self._get(req.id)
        if self._has_ended(container.init):
            raise NotFound(STATS_OF_STOPPED.format(req.id))
        return task.StatsResponse(stats=cgroups.metrics_for_pid(container.init.pid))

    # -- control -------------------------------------------------------------------------------------
    async def pause(self, req: task.PauseRequest, ctx: Context) -> empty_pb2.Empty:
        # Under the container's lock, as Start and Delete: runc would pause a created container too (its
        # start then refuses a paused one), so the state is checked first, as containerd's shim does.
        async with self._holding(req.id) as container:
            container.require_init(types.RUNNING, "pause")
            await self.runc.pause(req.id)
            # The init's exit may have been seen while runc ran: a stopped container stays stopped (or
            # it would never be deletable, being "still running").
            container.require_init(types.RUNNING, "pause")
            container.init.status = types.PAUSED
            self._publish_paused(req.id, True, container.namespace)
        return empty_pb2.Empty()

    async def resume(self, req: task.ResumeRequest, ctx: Context) -> empty_pb2.Empty:
        async with self._holding(req.id) as container:
            container.require_init(types.PAUSED, "resume")
            await self.runc.resume(req.id)
            if container.init.status == types.PAUSED:  # not an exit seen while runc ran (a pending SIGTERM)
                container.init.status = types.RUNNING
                self._publish_paused(req.id, False, container.namespace)
        return empty_pb2.Empty()

    async def update(self, req: task.UpdateTaskRequest, ctx: Context) -> empty_pb2.Empty:
        try:
            json.loads(req.resources.value or b"{}")
        except ValueError:
            raise InvalidArgument("resources is not OCI LinuxResources JSON") from None
        async with self._holding(req.id) as container:  # one update-resources.json at a time
            path = container.files / "update-resources.json"
            path.write_bytes(req.resources.value or b"{}")
            try:
                await self.runc.update(req.id, path)
            finally:
                path.unlink(missing_ok=True)
        return empty_pb2.Empty()


def _process_info(pid: int, exec_id: str) -> types.ProcessInfo:
    """A Pids entry; an exec's names its exec id, as containerd's shim gives it (`ctr task ps`'s INFO)."""
    info = types.ProcessInfo(pid=pid)
    if exec_id:
        details = runc_options.ProcessDetails(exec_id=exec_id)
        info.info.CopyFrom(any_pb2.Any(type_url=PROCESS_DETAILS_TYPE_URL, value=details.SerializeToString()))
    return info


def named_after(cgroup_name: str, container_id: str) -> bool:
    """A cgroup named as containerd names a container's own: `<parent>/<id>` (cgroupfs) or a systemd
    scope, `<prefix>-<id>.scope` (`slice:prefix:id`) or `<id>.scope`. Not merely one whose name holds
    the id: a short id (`ctr run ... web`) is part of many a name, a shared parent's among them."""
    return cgroup_name in (container_id, f"{container_id}.scope") or cgroup_name.endswith(f"-{container_id}.scope")


def _container_procs_file(container_id: str, pid: int) -> Path | None:
    """The cgroup.procs of container `container_id`'s cgroup, where its init `pid` is; None if that
    cgroup is not the container's own (named after it, as CRI's and our paths are): ending the rest of
    a shared one would end other containers."""
    procs_file = cgroups.cgroup_procs_file(pid)
    if procs_file is None or not named_after(procs_file.parent.name, container_id):
        log.warning("container %s: its cgroup is not its own; its init's exit ends only the init", container_id)
        return None
    return procs_file


def _pid_file(container: Any, exec_id: str) -> Path:
    """runc's pid file of the init (exec_id "") or of an exec, apart from each other whatever the ids."""
    return container.files / (f"exec-{exec_id}.pid" if exec_id else "init.pid")
