"""Task API and pod lifecycle for gVisor pods, served by the task server (one process for every pod).

One gVisor sandbox per pod: `launch_pod` makes it with a root container (gvisor_pod.py) and returns the
sandbox process's pid; every container of the pod is a runsc sub-container of it, so all of them run on
one application kernel. Everything goes through runsc's command line with the pod's global flags.

Exit statuses: a container's processes live inside the sentry, not on the host, so nobody reaps them
here. A container's init is watched by one `runsc wait <id>` per container (the sandbox keeps the
status until the container is deleted, so no exit is missed however late the wait starts); an exec runs
under a foreground `runsc exec`, which exits with the process's status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from google.protobuf import empty_pb2

from kuasar.common import cgroups, mounts
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.api.kuasar.pods.v1 import pods_pb2 as pods
from kuasar.common.bounded import SWEEP_CONCURRENCY, each_bounded
from kuasar.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KuasarError,
    NotFound,
    RuntimeFailure,
)
from kuasar.common.events import EventPublisher
from kuasar.common.fifo_stdio import ProcessIO
from kuasar.common.ids import validate_id
from kuasar.common.oom import OomWatch
from kuasar.common.pod_files import pod_dir, rewrite_container_spec
from kuasar.common.pod_holder import pause_program
from kuasar.common.reaper import Exit, Reaper
from kuasar.common.runtime_commands import LeftRuntimeCommands
from kuasar.common.task_table import (
    NEVER_RAN_EXIT_STATUS,
    PIDS_TIMEOUT,
    STATS_OF_STOPPED,
    TaskContainer,
    TaskProcess,
    TerminalTasks,
    dead_init_pids,
    drain_and_close_io,
    parse_exec_spec,
    report_init_exit_last,
    running_pids,
    shares_pid_namespace,
    signal_quietly,
    state_response,
    timestamp,
    unfinished_execs,
    wait_exited,
)
from kuasar.common.ttrpc import Context

from . import gvisor_net, gvisor_pod, gvisor_stats
from .config import QuarkConfig
from .runsc import (
    NETSTACK_FIXED_DATE,
    NO_NETWORK,
    RUNSC_FAILURE,
    Leftover,
    Runsc,
    SandboxUnresponsive,
    Stdio,
    last_error,
)

log = logging.getLogger(__name__)

# A foreground `runsc exec` writes the process's pid within tens of milliseconds; this bounds a stuck one.
EXEC_START_TIMEOUT = 20.0
# A killed `runsc exec` runner is reaped in milliseconds; this only bounds a wait for one that is not.
EXEC_KILL_WAIT = 10.0
EXEC_POLL_INTERVAL = 0.01
# A pod's gVisor sandbox bundle (the pause container's), in the pod's directory.
SANDBOX_BUNDLE = "sandbox"
# What a container whose status nobody can tell any more is reported with (containerd's lost shim).
LOST_EXIT_STATUS = 255
KILLED_EXIT_STATUS = 128 + signal.SIGKILL
# How long a failed kill waits to see whether the container had just exited (and the failure is moot).
KILL_RACE_GRACE = 1.0
# Removing a pod's containers: how long SIGKILLed ones get for their `runsc wait` to report the exit
# (milliseconds when the sandbox is healthy) before they are deleted by force anyway.
POD_REMOVE_WAIT = 10.0
# An OOM kill in the sandbox's cgroup counts for a container that ended at most this long before it was
# seen: the kill's own exits come within moments (runsc wait returns as the sandbox dies).
OOM_EXIT_SLACK_NS = 2 * 10**9
# A SIGKILLed sandbox is reaped within milliseconds; this only bounds the wait for one that is not.
SANDBOX_END_WAIT = 10.0


@dataclass
class GvisorPod:
    id: str
    bundle: Path
    network: str  # runsc --network for every command on this sandbox
    pid: int = 0
    # Being stopped, or ended by us: a container's `runsc wait` that fails then means "killed" (137).
    stopping: bool = False
    shm_source: str = ""  # what names the pod's shared /dev/shm (none for a host-IPC pod)
    # Whether the sandbox is in a cgroup of its own (the pod's): else it shares the task server's, whose
    # OOM kills are not this pod's.
    own_cgroup: bool = False
    # The sandbox process's exit (it re-parents to us, the task server, when runsc create exits).
    exited: asyncio.Future[Exit] | None = None
    ended_after_oom: bool = False


@dataclass
class Process(TaskProcess):
    io: ProcessIO
    internal_pid: int = 0  # exec only: the pid inside the sandbox, for `runsc kill --pid`
    spec: bytes = b""


@dataclass
class Container(TaskContainer):
    pod: GvisorPod
    namespace: str
    init: Process
    waiter: asyncio.Task[None] | None = None
    # From the spec (`shares_pid_namespace`): its init's exit ends what it left, as under runc.
    shares_pids: bool = False
    # The sandbox's memory cgroup, watched for this container: the pod's memory limit bounds the
    # whole sandbox, whose OOM kill ends every container in it (gVisor's shim reports it for each).
    oom: OomWatch | None = None


def _read_pid(pid_file: Path) -> int:
    """The exec's pid inside the sandbox, 0 while runsc has not written it (yet): runsc creates the file
    and then writes it, so a reader may find it empty; only a positive number is a pid."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return 0
    return max(pid, 0)


class GvisorTasks(LeftRuntimeCommands, TerminalTasks):
    """The Task API backend and, as a `PodLauncher`, the maker of each pod's sandbox."""

    def __init__(self, reaper: Reaper, events: EventPublisher, directory: Path, config: QuarkConfig) -> None:
        super().__init__()
        self.reaper = reaper
        self.events = events
        self.directory = directory
        self.config = config
        debug_dir = directory / "runsc-debug" if config.debug else None
        self.runsc = Runsc(reaper, directory / "runsc", config.runsc, config.platform, debug_dir,
                           control_timeout=config.control_timeout)
        self.pods: dict[str, GvisorPod] = {}
        self.containers: dict[str, Container] = {}
        self._netstack_ok: bool | None = None

    # -- pods (kuasar.common.pod_service.PodLauncher) -----------------------------------------------
    async def _network_for(self, req: pods.CreatePodRequest) -> str:
        own_netns = bool(req.netns_path)
        if own_netns and self.config.network == "auto" and self._netstack_ok is None:
            date = await self.runsc.version_date()
            self._netstack_ok = gvisor_net.netstack_usable(date, NETSTACK_FIXED_DATE)
            log.info("runsc %s: gVisor netstack %s on this kernel; pods with a netns use --network=%s",
                     date or "(unknown release)", "works" if self._netstack_ok else "refuses pod netns",
                     "sandbox" if self._netstack_ok else "host")
        return gvisor_net.network_mode(own_netns, self.config.network, self.config.host_network,
                                       bool(self._netstack_ok))

    def _refuse_known_id(self, runsc_id: str) -> None:
        """Pods and containers share runsc's ids: a second one under an id runsc already has fails in
        runsc, and that failure's cleanup (`runsc delete --force <id>`) would destroy the first. Called
        with the id's lock held, which every Create, pod launch and pod release takes."""
        if runsc_id in self.pods or runsc_id in self.containers:
            raise AlreadyExists(f"{runsc_id} already exists (a pod or a container)")
        if self.runsc.has(runsc_id):  # none of ours (one a dead task server left): not ours to delete
            raise AlreadyExists(f"runsc already has a container {runsc_id}")

    async def launch_pod(self, req: pods.CreatePodRequest, cgroup: cgroups.PodCgroup | None) -> int:
        pod_id = validate_id(req.id, "pod id")
        async with self._lock(pod_id):
            self._refuse_known_id(pod_id)
            return await self._launch_pod(pod_id, req, cgroup)

    async def _launch_pod(self, pod_id: str, req: pods.CreatePodRequest, cgroup: cgroups.PodCgroup | None) -> int:
        # Inside the pod's directory, next to the pod's files the sandboxer writes there meanwhile.
        bundle = pod_dir(self.directory, pod_id) / SANDBOX_BUNDLE
        rootfs = gvisor_pod.ensure_pause_rootfs(self.directory, pause=pause_program())
        network = await self._network_for(req)
        # A name, not a host directory: the tmpfs lives in the sandbox.
        shm_source = str(pod_dir(self.directory, pod_id) / "shm") if req.new_ipc else ""
        spec = gvisor_pod.root_spec(pod_id, rootfs, netns_path=req.netns_path,
                                    hostname=req.hostname if req.new_uts else "",
                                    cgroups_path="/" + "/".join(p for p in (cgroup.path, pod_id) if p)
                                    if cgroup is not None else "", shm_source=shm_source)
        shutil.rmtree(bundle, ignore_errors=True)
        bundle.mkdir(parents=True, mode=0o700)
        (bundle / "config.json").write_text(json.dumps(spec))
        pod = GvisorPod(pod_id, bundle, network, shm_source=shm_source, own_cgroup=cgroup is not None)
        since_ns = time.monotonic_ns()  # the sandbox process runsc makes exits after this, if it has
        try:
            await self.runsc.create(pod_id, bundle, bundle / "sandbox.pid", network, Stdio())
            # Known before the start, which asks the sandbox: one that never answers it can be ended.
            pod.pid = int((bundle / "sandbox.pid").read_text().strip())
            pod.exited = self.reaper.watch(pod.pid, since_ns)
            await self.runsc.start(pod_id, bundle, network)
        except BaseException:
            await self._destroy_sandbox(pod)
            raise
        self.pods[pod_id] = pod
        log.info("pod %s: gVisor sandbox pid %d (--network=%s, platform %s)", pod_id, pod.pid, network,
                 self.config.platform)
        return pod.pid

    async def sweep_leftovers(self) -> None:
        """Delete every sandbox and container in our runsc root, and unmount the rootfs of each: a task
        server just started knows none of them, so they are a dead one's (see pod_leftovers; the pods'
        bundles go with their directories at Shutdown). Sandboxes are swept side by side, each one's
        containers before it (deleting both at once left runsc's lock files behind); what a first
        pass leaves goes in a second. Console sockets of processes that were being started go too.
        The runsc commands it left running are ended first (runtime_commands): a `runsc create` that
        finished after the list would leave a whole sandbox nobody knows of."""
        for stale in self.directory.glob("console-*.sock"):
            stale.unlink(missing_ok=True)
        await self._end_runtime_commands()
        for _ in range(2):
            try:
                left = await self.runsc.leftovers()
            except KuasarError as exc:
                log.error("runsc list: %s", exc.message)
                return
            sandboxes: dict[str, list[Leftover]] = {}
            for leftover in left:
                sandboxes.setdefault(leftover.sandbox, []).append(leftover)
            await each_bounded(sandboxes.values(), self._sweep_sandbox, SWEEP_CONCURRENCY)

    # -- what runtime_commands needs to know of runsc ------------------------------------------------
    def _runtime_binary_and_root(self) -> tuple[str, Path]:
        return self.runsc.binary, self.runsc.root

    def _runtime_saved(self, container_id: str) -> bool:
        return self.runsc.has(container_id)

    def _forget_unsaved(self, container_id: str) -> None:
        self.runsc.forget_unsaved(container_id)

    def _is_bundle_of(self, container_id: str, bundle: Path) -> bool:
        # A pod's sandbox bundle is ours, in the pod's directory (_launch_pod); a container's, containerd's.
        return super()._is_bundle_of(container_id, bundle) or \
            bundle == pod_dir(self.directory, container_id) / SANDBOX_BUNDLE

    async def _sweep_sandbox(self, leftovers: list[Leftover]) -> None:
        for leftover in sorted(leftovers, key=lambda one: one.id == one.sandbox):  # the sandbox last
            log.warning("runsc container %s: left by a task server that is gone; deleting it", leftover.id)
            try:
                await self.runsc.delete(leftover.id, NO_NETWORK)
            except KuasarError as exc:
                log.error("runsc container %s: %s", leftover.id, exc.message)
            if os.path.isabs(leftover.bundle):
                try:
                    mounts.unmount_all(Path(leftover.bundle) / "rootfs")
                except OSError as exc:
                    log.error("runsc container %s: unmounting its rootfs: %s", leftover.id, exc)

    async def release_pod(self, pod_id: str) -> None:
        async with self._lock(pod_id):  # no Create may take the id while runsc still has it
            pod = self.pods.pop(pod_id, None)
            if pod is not None:
                await self._destroy_sandbox(pod)

    async def _destroy_sandbox(self, pod: GvisorPod) -> None:
        try:
            await self._delete(pod, pod.id)
        except KuasarError as exc:
            log.warning("pod %s: runsc delete: %s", pod.id, exc.message)
        self.runsc.forget_stray_locks(pod.id)
        shutil.rmtree(pod.bundle, ignore_errors=True)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def create(self, req: task.CreateTaskRequest, ctx: Context) -> task.CreateTaskResponse:
        async with self._creating(req) as (bundle, spec):
            annotations = spec.get("annotations") or {}
            pod_id = annotations.get(gvisor_pod.SANDBOX_ID, "")
            pod = self.pods.get(pod_id)
            if pod is None:
                raise FailedPrecondition(f"container {req.id}: pod {pod_id!r} is not a gVisor sandbox of this "
                                         "sandboxer (annotation io.kubernetes.cri.sandbox-id)")
            if annotations.get(gvisor_pod.CONTAINER_TYPE, "container") != "container":
                raise InvalidArgument(f"container {req.id}: only containers can join a pod's sandbox")
            io = ProcessIO(req.stdin, req.stdout, req.stderr, req.terminal)
            container = Container(req.id, bundle, pod, ctx.namespace or "k8s.io", Process("", io),
                                  shares_pids=shares_pid_namespace(spec))
            if req.rootfs:
                mounts.mount_rootfs(req.rootfs, bundle / "rootfs")
                container.rootfs_mounted = True
            created = False  # whether runsc may hold a container this call made
            try:
                shared_shm = bool(pod.shm_source) and gvisor_pod.use_pod_shm(spec, pod.shm_source)
                rewrite_container_spec(bundle, spec, pod_dir(self.directory, pod_id), changed=shared_shm)
                # runsc hands a sub-container the stdio of `runsc start`, so the FIFOs wait for Start; a
                # terminal is made at create, its master sent to our console socket.
                console = self._listen_console(io)
                receiving = asyncio.ensure_future(io.receive_console()) if console is not None else None
                try:
                    created = True
                    await self.runsc.create(req.id, bundle, bundle / "init.pid", pod.network, Stdio(), console,
                                            control=True)
                    if receiving is not None:
                        await receiving
                finally:
                    if receiving is not None and not receiving.done():
                        receiving.cancel()
                container.init.pid = int((bundle / "init.pid").read_text().strip())
            except BaseException:
                io.close()
                try:
                    if created:  # and the id is no other pod's or container's: _refuse_known_id
                        await self._delete(pod, req.id)
                except KuasarError as exc:  # keep the original error
                    log.warning("container %s: cleaning up after a failed create: %s", req.id, exc.message)
                if container.rootfs_mounted:
                    mounts.unmount_all(bundle / "rootfs")
                raise
            self.containers[req.id] = container
            if pod.own_cgroup:
                container.oom = OomWatch(pod.pid, lambda: self._on_sandbox_oom(container))
        log.info("container %s created in gVisor pod %s", req.id, pod_id)
        self._publish_create(req, req.bundle, container.init.pid, container.namespace)
        return task.CreateTaskResponse(pid=container.init.pid)

    def _listen_console(self, io: ProcessIO) -> Path | None:
        """For a process with a terminal: the console socket runsc sends the pty master to (short: it
        lives in our directory, not in containerd's long bundle path)."""
        if not io.terminal:
            return None
        path = self.directory / f"console-{secrets.token_hex(8)}.sock"
        io.listen_console(path)
        return path

    async def _start_init(self, container: Container, proc: Process) -> None:
        stdio = Stdio() if proc.io.terminal else proc.io.runc_stdio()
        try:
            await self.runsc.start(container.id, container.bundle, container.pod.network, stdio)
        except KuasarError:
            # runsc leaves a sub-container whose start failed Created, where it can be neither signalled
            # nor started again, and containerd deletes no created task with a pid (CRI's cleanup, then
            # RemoveContainer and RemovePodSandbox, failed for ever): as gVisor's shim, it is stopped
            # here, so Wait returns and Delete removes it.
            proc.record_exit(NEVER_RAN_EXIT_STATUS, time.time_ns())
            raise
        except asyncio.CancelledError:
            # Cancelled (a deadline, containerd gone) once `runsc start` had ended, one way or the other:
            # a container it did start is watched as any other, one it did not is stopped as above.
            await self._after_cancelled_start(container)
            raise
        finally:
            proc.io.release_fds()
        self._started(container)

    def _started(self, container: Container) -> None:
        container.init.status = types.RUNNING
        container.waiter = asyncio.create_task(self._wait_init(container), name=f"runsc-wait-{container.id}")

    async def _after_cancelled_start(self, container: Container) -> None:
        try:  # (bounded by runsc's control timeout, which kills the command: a cancel would wait for it)
            status = await self.runsc.status(container.id, container.pod.network)
        except KuasarError as exc:
            status = f"unknown ({exc})"
        if status in ("running", "stopped"):
            self._started(container)  # a stopped one: its `runsc wait` reports the exit
        else:
            log.warning("container %s: its start was cancelled and runsc says %s", container.id, status)
            container.init.record_exit(NEVER_RAN_EXIT_STATUS, time.time_ns())

    async def _wait_init(self, container: Container) -> None:
        try:
            status = await self.runsc.wait(container.id, container.pod.network)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the sandbox died under it: the status is gone with it
            status = KILLED_EXIT_STATUS if container.pod.stopping else LOST_EXIT_STATUS
            log.warning("container %s: runsc wait failed (%s); reporting exit %d", container.id, exc, status)
        else:
            if container.shares_pids:
                await self._end_the_rest(container)
        unfinished = unfinished_execs(container)
        if unfinished:  # ending with it: the sandbox ends a container's processes with its init
            await report_init_exit_last(container, unfinished, lambda: self._exited(container, container.init, status))
        else:
            self._exited(container, container.init, status)

    async def _end_the_rest(self, container: Container) -> None:
        """SIGKILL what the init of a container in a shared PID namespace left (its execs too), before
        its exit is reported, as containerd's shims do: in the sandbox they would live on, holding the
        container's output open, so containerd would never see the container end."""
        try:
            await self.runsc.kill(container.id, signal.SIGKILL, container.pod.network, all_processes=True)
        except KuasarError as exc:
            log.warning("container %s: ending what its init left: %s", container.id, exc.message)

    def _exited(self, container: Container, proc: Process, status: int, at_ns: int = 0) -> None:
        if proc.status == types.STOPPED:
            return
        proc.record_exit(status, at_ns or time.time_ns())
        log.info("container %s exec %r exited %d", container.id, proc.id, status)
        self._publish_exit(container, proc)

    async def _exec_started(self, container: Container, pid_file: Path, log_path: Path, process_json: Path,
                            exited: asyncio.Future[Exit]) -> int:
        """The exec's pid inside the sandbox once runsc wrote it, 0 if the runner exited first (the
        process ran and ended at once); RuntimeFailure if runsc failed before running anything (it
        then exits 128 and says why)."""
        pid = 0
        try:
            async with asyncio.timeout(EXEC_START_TIMEOUT):
                # runsc writes the file from another process: nothing to await but the file itself, which
                # exists (empty) a moment before the pid is in it.
                while not (pid := _read_pid(pid_file)) and not exited.done():  # noqa: ASYNC110
                    await asyncio.sleep(EXEC_POLL_INTERVAL)
        except TimeoutError:
            raise RuntimeFailure(f"runsc exec in {container.id} did not start within {EXEC_START_TIMEOUT:.0f}s") \
                from None
        finally:
            process_json.unlink(missing_ok=True)
        pid = pid or _read_pid(pid_file)  # a runner that exited has written all it ever will
        if pid:
            return pid
        result = exited.result() if exited.done() else None
        if result is not None and result.status == RUNSC_FAILURE:
            message = last_error(log_path) or "no message"
            log_path.unlink(missing_ok=True)
            raise RuntimeFailure(f"runsc exec in {container.id} failed: {message}")
        return 0

    async def _run_exec(self, container: Container, proc: Process) -> None:
        process_json = container.bundle / f"{proc.id}.process.json"
        pid_file = container.bundle / f"{proc.id}.ipid"
        log_path = container.bundle / f"{proc.id}.runsc.log"
        process_json.write_bytes(proc.spec)
        pid_file.unlink(missing_ok=True)
        # A foreground `runsc exec` ignores --console-socket: it hands the sandbox its own stdio, a
        # terminal if that is one. So the pty is made here, its replica given as the runner's stdio.
        master = replica = -1
        if proc.io.terminal:
            master, replica = os.openpty()
            stdio = Stdio(replica, replica, replica)
        else:
            stdio = proc.io.runc_stdio()
        try:
            proc.pid, exited = self.runsc.spawn_exec(container.id, container.pod.network, process_json, pid_file,
                                                     log_path, stdio, terminal=proc.io.terminal)
        except BaseException:
            if master >= 0:
                os.close(master)
            raise
        finally:
            proc.io.release_fds()
            if replica >= 0:
                os.close(replica)
        try:
            if master >= 0:
                proc.io.attach_master(master)
            proc.internal_pid = await self._exec_started(container, pid_file, log_path, process_json, exited)
        except BaseException:
            # The runner must not go on unwatched, and a retried Start must not find its pid. One whose
            # exit is in was reaped: its pid may be another process's by now.
            if not exited.done():
                signal_quietly(proc.pid, signal.SIGKILL)
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), EXEC_KILL_WAIT)
            proc.io.close()
            proc.pid = 0
            raise
        pid_file.unlink(missing_ok=True)
        proc.status = types.RUNNING

        def on_exit(future: asyncio.Future[Exit]) -> None:
            if not future.cancelled():
                log_path.unlink(missing_ok=True)
                self._exited(container, proc, future.result().status, future.result().at_ns)

        exited.add_done_callback(on_exit)

    async def exec(self, req: task.ExecProcessRequest, ctx: Context) -> empty_pb2.Empty:
        validate_id(req.exec_id, "exec id")
        spec = parse_exec_spec(req)
        async with self._holding(req.id, shared=True) as container:  # not behind other execs' Starts
            container.check_new_exec(req.exec_id)
            spec["terminal"] = req.terminal
            container.execs[req.exec_id] = Process(req.exec_id,
                                                   ProcessIO(req.stdin, req.stdout, req.stderr, req.terminal),
                                                   spec=json.dumps(spec).encode())
        self._publish_exec_added(req, container.namespace)
        return empty_pb2.Empty()

    async def kill(self, req: task.KillRequest, ctx: Context) -> empty_pb2.Empty:
        container = self._get(req.id)
        proc = container.process(req.exec_id)
        if proc.status == types.STOPPED:
            raise NotFound(f"process {req.exec_id or req.id} already finished")
        if req.exec_id:
            await self._kill_exec(container, proc, req.signal)
            return empty_pb2.Empty()
        if req.signal == signal.SIGKILL:
            # runsc signals nothing in a paused sandbox ("in state paused"): a SIGKILL ends the
            # container all the same, as under runc, whose frozen processes die once thawed.
            if not await self._unless_wedged(container.pod, self._thaw(container)):
                return empty_pb2.Empty()
        elif container.init.status == types.PAUSED:
            raise FailedPrecondition(f"cannot signal container {req.id}: it is paused, and gVisor signals "
                                     "nothing in a paused sandbox; resume it first (a SIGKILL does)")
        try:
            killing = self.runsc.kill(req.id, req.signal, container.pod.network, all_processes=req.all)
            if req.signal == signal.SIGKILL:  # (another signal's time-out is the caller's to see)
                await self._unless_wedged(container.pod, killing)
            else:
                await killing
        except KuasarError as exc:
            # runsc refuses to signal a container that has just stopped; its `runsc wait` says so shortly.
            await self._finished_meanwhile(proc, req.id, exc)
        return empty_pb2.Empty()

    async def _kill_exec(self, container: Container, proc: Process, sig: int) -> None:
        if proc.status == types.CREATED:  # as containerd's runc shim: no process to signal yet
            raise FailedPrecondition(f"exec {proc.id} in container {container.id} is not started")
        if container.init.status == types.PAUSED:  # runsc would refuse it, and the signal be lost
            raise FailedPrecondition(f"cannot signal exec {proc.id}: container {container.id} is paused, and "
                                     "gVisor signals nothing in a paused sandbox; resume it first")
        if not proc.internal_pid:
            # Only a runner that exited before runsc wrote the pid leaves none: its exit is on its way.
            await self._finished_meanwhile(proc, proc.id, FailedPrecondition(
                f"exec {proc.id} in container {container.id}: its pid inside the sandbox is unknown"))
        try:
            await self.runsc.kill(container.id, sig, container.pod.network, pid=proc.internal_pid)
        except KuasarError as exc:  # it ended meanwhile: the runner reports the exit
            log.debug("kill exec %s/%s: %s", container.id, proc.id, exc.message)

    async def _end_late_exec(self, container: Container, proc: Process) -> None:
        await self._kill_exec(container, proc, signal.SIGKILL)

    async def _finished_meanwhile(self, proc: Process, name: str, error: KuasarError) -> NoReturn:
        """A kill that could not be made: NotFound if `proc` turns out to have just exited, else `error`."""
        try:
            async with asyncio.timeout(KILL_RACE_GRACE):
                await proc.exited.wait()
        except TimeoutError:
            raise error from None
        raise NotFound(f"process {name} already finished") from None

    def _delete_response(self, proc: Process) -> task.DeleteResponse:
        # Unlike the other backends, a task deleted before it ran is answered with the time of the delete.
        return task.DeleteResponse(pid=proc.pid, exit_status=proc.exit_status, exited_at=timestamp(proc.exited_at_ns))

    async def _delete_exec(self, container: Container, proc: Process) -> None:
        await drain_and_close_io([proc])

    def _on_sandbox_oom(self, container: Container) -> None:
        """An OOM kill in the sandbox's cgroup: this container's too, unless it had ended well before
        (an init container that completed must not turn OOMKilled; CRI takes the event at any time). The
        kill ends the sandbox, so the containers' exits it causes come within moments of it."""
        init = container.init
        self._end_sandbox_after_oom(container.pod)
        if init.status == types.STOPPED and time.time_ns() - init.exited_at_ns > OOM_EXIT_SLACK_NS:
            return
        self._on_oom(container)

    @staticmethod
    def _end_sandbox_after_oom(pod: GvisorPod) -> None:
        """The kernel's OOM killer picks the process of the pod's cgroup with the most pages, which need
        not be the sandbox: it may be one of systrap's stub processes (they map the sentry's memory
        file) or a gofer, and a sentry that lost one stops answering (its container ran on, every runsc
        command on it hung, and so did the pod's stop). The sandbox is ended then, as when it is the
        one killed; once per pod, the watch of each of its containers seeing the same kill."""
        if pod.ended_after_oom or pod.exited is None or pod.exited.done():
            return
        pod.ended_after_oom = True
        log.warning("pod %s: an OOM kill in its cgroup; ending its gVisor sandbox (pid %d), which may have "
                    "lost one of its own processes to it", pod.id, pod.pid)
        # Not reaped yet (its exit future is pending), so the pid is still the sandbox's.
        signal_quietly(pod.pid, signal.SIGKILL)

    async def _unless_wedged(self, pod: GvisorPod, command: Awaitable[object]) -> bool:
        """Await a runsc command meant to end or remove something of `pod`. If the sandbox does not
        answer it (`SandboxUnresponsive`: runsc waits for ever on a wedged sentry, and with it the pod's
        stop), the sandbox is ended: what the command was for ends with it, and runsc removes a dead
        sandbox's containers without asking it. False then."""
        try:
            await command
        except SandboxUnresponsive as exc:
            await self._end_wedged_sandbox(pod, exc)
            return False
        return True

    async def _delete(self, pod: GvisorPod, runsc_id: str) -> None:
        """`runsc delete --force` of the pod's sandbox or one of its containers; made again once the
        sandbox is ended if it did not answer (runsc deletes a dead sandbox's containers without it)."""
        if not await self._unless_wedged(pod, self.runsc.delete(runsc_id, pod.network)):
            await self.runsc.delete(runsc_id, pod.network)

    async def _end_wedged_sandbox(self, pod: GvisorPod, error: KuasarError) -> None:
        """SIGKILL a sandbox that stopped answering, and wait until it is reaped. Its containers'
        `runsc wait` then fail, and report them killed."""
        if pod.exited is None:  # not started (a failed launch): no pid of it is known to be its own
            return
        if not pod.exited.done():
            log.error("pod %s: %s; ending its gVisor sandbox (pid %d)", pod.id, error.message, pod.pid)
            pod.stopping = True
            signal_quietly(pod.pid, signal.SIGKILL)  # not reaped yet, so the pid is still the sandbox's
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SANDBOX_END_WAIT):
                await asyncio.shield(pod.exited)

    async def _thaw(self, container: Container) -> None:
        """Resume a paused container's sandbox: runsc refuses to signal anything in it, and its
        `delete --force` blocks until something resumes it."""
        if container.init.status == types.PAUSED:
            await self.runsc.resume(container.id, container.pod.network)
            if container.init.status == types.PAUSED:
                container.init.status = types.RUNNING

    async def _remove(self, container: Container) -> None:
        await self._delete(container.pod, container.id)
        if container.oom is not None:  # (the pod's cgroup stays: no removal signal to mistake)
            container.oom.close()
            container.oom = None
        await drain_and_close_io(container.processes())
        if container.waiter is not None and not container.waiter.done():
            container.waiter.cancel()
        if container.rootfs_mounted:
            mounts.unmount_all(container.bundle / "rootfs")
        self._forget(container.id)

    # -- inspection --------------------------------------------------------------------------------
    async def state(self, req: task.StateRequest, ctx: Context) -> task.StateResponse:
        container = self._get(req.id)
        proc = container.process(req.exec_id)
        return state_response(req, container, proc)

    async def pids(self, req: task.PidsRequest, ctx: Context) -> task.PidsResponse:
        container = self._get(req.id)
        if container.init.status == types.STOPPED:
            return dead_init_pids(container.init)
        # Killed at PIDS_TIMEOUT, when running_pids gives up on it: a cancelled one would be waited for.
        pids = await running_pids(container.init, self.runsc.ps(req.id, container.pod.network, PIDS_TIMEOUT))
        return task.PidsResponse(processes=[types.ProcessInfo(pid=pid) for pid in pids])

    async def stats(self, req: task.StatsRequest, ctx: Context) -> task.StatsResponse:
        container = self._get(req.id)
        if container.init.status == types.STOPPED:
            raise NotFound(STATS_OF_STOPPED.format(req.id))
        data = await self.runsc.stats(req.id, container.pod.network)
        return task.StatsResponse(stats=gvisor_stats.to_metrics(data))

    # -- control -----------------------------------------------------------------------------------
    # Both hold the container's lock, so a Pause, a Resume and a Delete of it do not interleave. Nothing
    # they await needs it: Kill and what records an exit (`_wait_init`, an exec's runner) never lock.
    async def pause(self, req: task.PauseRequest, ctx: Context) -> empty_pb2.Empty:
        async with self._holding(req.id) as container:
            container.require_init(types.RUNNING, "pause")
            others = [c.id for c in self.containers.values()
                      if c.pod is container.pod and c is not container
                      and c.init.status in (types.RUNNING, types.PAUSED)]
            if others:
                # runsc pauses the whole sandbox (its kernel), whichever container it is asked for.
                raise FailedPrecondition(f"cannot pause container {req.id}: gVisor pauses its whole pod, where "
                                         f"{', '.join(sorted(others))} run too")
            await self.runsc.pause(req.id, container.pod.network)
            # The init's exit may have been seen while runsc ran: a stopped container stays stopped (or
            # Delete would refuse it for ever as still running).
            container.require_init(types.RUNNING, "pause")
            container.init.status = types.PAUSED
        self._publish_paused(req.id, True, container.namespace)
        return empty_pb2.Empty()

    async def resume(self, req: task.ResumeRequest, ctx: Context) -> empty_pb2.Empty:
        async with self._holding(req.id) as container:
            container.require_init(types.PAUSED, "resume")
            await self.runsc.resume(req.id, container.pod.network)
            if container.init.status != types.PAUSED:  # an exit seen while runsc ran (a pending kill)
                return empty_pb2.Empty()
            container.init.status = types.RUNNING
        self._publish_paused(req.id, False, container.namespace)
        return empty_pb2.Empty()

    # -- pod hooks (kuasar.common.pod_service.PodContainers) -----------------------------------------
    def pod_container_ids(self, pod_id: str) -> list[str]:
        return [c.id for c in self.containers.values() if c.pod.id == pod_id]

    async def kill_pod_containers(self, pod_id: str, sig: int) -> None:
        pod = self.pods.get(pod_id)
        if pod is not None and sig == signal.SIGKILL:
            pod.stopping = True  # the sandbox goes next: a failing `runsc wait` then means "killed"
        for container in [c for c in self.containers.values() if c.pod.id == pod_id]:
            if container.init.status != types.STOPPED:
                try:
                    if sig == signal.SIGKILL and not await self._unless_wedged(container.pod, self._thaw(container)):
                        return  # the sandbox is ended, and with it every container of the pod
                    if not await self._unless_wedged(container.pod, self.runsc.kill(
                            container.id, sig, container.pod.network, all_processes=True)):
                        return
                except KuasarError as exc:  # best effort during pod stop
                    log.warning("pod %s: killing container %s: %s", pod_id, container.id, exc.message)

    async def wait_pod_containers(self, pod_id: str, timeout: float) -> bool:
        # A created container's init has no `runsc wait` yet: nothing would ever report its exit.
        return await wait_exited([c.init for c in self.containers.values()
                                  if c.pod.id == pod_id and _reports_exit(c)], timeout)

    async def remove_pod_containers(self, pod_id: str) -> None:
        containers = [c for c in self.containers.values() if c.pod.id == pod_id]
        if any(_reports_exit(c) for c in containers):
            await self.kill_pod_containers(pod_id, signal.SIGKILL)
            await self.wait_pod_containers(pod_id, POD_REMOVE_WAIT)
        for container in containers:  # a created one goes by `runsc delete --force`, unwaited
            async with self._lock(container.id):
                if self.containers.get(container.id) is not container:
                    continue  # a Delete got there first
                with contextlib.suppress(KuasarError):  # a delete in a paused sandbox would wait for ever
                    await self._unless_wedged(container.pod, self._thaw(container))
                for proc in [container.init, *container.execs.values()]:
                    if proc.status != types.STOPPED:
                        self._exited(container, proc, KILLED_EXIT_STATUS)
                await self._remove(container)
            log.info("pod %s: removed leftover container %s", pod_id, container.id)


def _reports_exit(container: Container) -> bool:
    """Whether the container's init was started, so its `runsc wait` will report its exit."""
    return container.waiter is not None and container.init.status in (types.RUNNING, types.PAUSED)
