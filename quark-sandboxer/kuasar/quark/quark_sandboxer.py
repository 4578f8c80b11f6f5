"""The Quark backend: what Kuasar's quark-sandboxer does with the `quark` binary, minus its quirks.

UNTESTED AGAINST REAL QUARK: Quark needs KVM with hardware virtualisation and a toolchain this project
cannot install; this driver is exercised against a fake `quark` (tests/fakes/fake_quark.py) that keeps
the same command line and socket contract.

Per sandbox, `<base>` = `<dir>/<id>` and the sandbox bundle is `<base>/sandbox`:

* Create writes `<base>/sandbox/config.json` (quark_spec.py) and `rootfs/dev` (all removed again if it
  fails; a restart removes a `<base>` whose record was never saved: remove_unrecorded).
* Start runs `quark -r <base>/sandbox sandbox --task-socket <base>/quark-task.sock --id <id>
  --pid-file <base>/pid` in the bundle and waits for it to exit (Quark daemonises its VM process, QVisor),
  then reads the pid. QVisor serves `containerd.task.v2.Task` on that socket and reads containers from
  its bundle, so a task relay (task_relay.py, a process of its own) serves containerd the address
  `ttrpc+unix://<base>/task.sock`, version 3, and lays each container out before QVisor's Create (Kuasar
  says version 2 and omits `ttrpc+`, which upstream containerd refuses, and leaves the layout to its
  forked containerd's Update).
* QVisor is not our child: its exit is watched with a pidfd (Kuasar watches nothing, so its Wait only
  returns after Stop); its status is unknowable, so a kill by Stop reports 137 and any other death 255.
* Stop SIGKILLs QVisor (it forwards other signals into its guest); the relay then ends with QVisor's
  socket. Shutdown detaches every mount under `<base>` and removes it. The pids and their start times
  are persisted, so a restarted sandboxer re-attaches to a live QVisor and reports a dead (or recycled)
  pid as exited.
* `Controller.Update` with `extensions.tasks` (Kuasar's fork and iSulad) lays containers out in the bundle
  (quark_containers.py); upstream containerd never sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from google.protobuf import any_pb2

from kuasar.common import cgroups, proc_stat
from kuasar.common.config import DaemonConfig
from kuasar.common.errors import FailedPrecondition, InvalidArgument, KuasarError, RuntimeFailure
from kuasar.common.ids import validate_id
from kuasar.common.linux import SOCKET_PATH_MAX
from kuasar.common.pod_sandboxer import decode_pod_config, refuse_user_namespace
from kuasar.common.sandboxer import ExitInfo, Sandboxer, SandboxRecord, StartResult
from kuasar.common.state import write_atomic
from kuasar.common.strays import kill_strays, owner_env
from kuasar.common.task_server import helper_argv

from . import quark_containers
from .config import QuarkConfig
from .gvisor_sandboxer import require_binary
from .quark_spec import sandbox_spec

log = logging.getLogger(__name__)

TASK_SOCKET = "quark-task.sock"
RELAY_SOCKET = "task.sock"
RELAY_LOG = "relay.log"
# The relay listens once QVisor answered its first call (task_relay.PROBE_TIMEOUT, the VM's boot), then
# in milliseconds.
RELAY_START_TIMEOUT = 40.0
# How long Shutdown waits for the killed QVisor and relay to leave the pod's cgroup (until reaped).
CGROUP_EMPTY_WAIT = 5.0
PID_FILE = "pid"
QUARK_LOG = "quark.log"
# `quark ... sandbox` boots a VM before it returns; this only bounds a hung one.
START_TIMEOUT = 60.0
# The daemon must have its socket bound before the foreground command exits; allow a little slack.
SOCKET_GRACE = 2.0
LOST_EXIT_STATUS = 255
KILLED_EXIT_STATUS = 128 + signal.SIGKILL
LOG_TAIL = 2000
# Names under --dir that are not sandboxes.
RESERVED = {"sandboxes"}
# A sandbox's bundle, in its directory; its rootfs is made with it at Create, and tells a sandbox's
# directory from anything else under --dir.
SANDBOX_BUNDLE = "sandbox"


def process_start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), telling a live pid from a recycled one;
    0 when there is no such process or it has exited (a zombie nobody reaped yet)."""
    return 0 if proc_stat.exited(pid) else proc_stat.start_time(pid)


def is_alive(pid: int, start_time: int) -> bool:
    return pid > 0 and process_start_time(pid) == start_time != 0


async def wait_for_exit(pid: int) -> None:
    """Block until `pid` (not our child) is gone, via a pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


class QuarkSandboxer(Sandboxer):
    name = "quark"

    def __init__(self, config: DaemonConfig, quark: QuarkConfig) -> None:
        self.config = config
        self.quark = quark
        self.binary = quark.quark
        self._relay_watchers: dict[str, asyncio.Future[None]] = {}
        # The relays this process started (its children): Shutdown reaps them before it removes the pod's
        # cgroup, which an unreaped one keeps busy (cgroup v2 counts zombies).
        self._relays: dict[str, asyncio.subprocess.Process] = {}

    async def open(self) -> None:
        self.binary = require_binary(self.quark.quark, "Quark",
                                     "install Quark (QuarkContainer) or set [quark] quark; the Quark backend "
                                     "is untested against real Quark")

    # -- layout ------------------------------------------------------------------------------------
    def base(self, record: SandboxRecord) -> Path:
        return self.config.dir / record.id

    def _state(self, record: SandboxRecord) -> dict:
        return record.extra.setdefault("quark", {})

    def _containers(self, record: SandboxRecord) -> quark_containers.QuarkContainers:
        return quark_containers.QuarkContainers(self.base(record) / SANDBOX_BUNDLE,
                                                self._state(record).setdefault("containers", {}))

    # -- lifecycle ---------------------------------------------------------------------------------
    async def create(self, record: SandboxRecord) -> None:
        if record.id in RESERVED:
            raise InvalidArgument(f"sandbox id {record.id!r} is reserved")
        socket = self.base(record) / TASK_SOCKET
        if len(str(socket)) > SOCKET_PATH_MAX:
            raise InvalidArgument(f"task socket {socket} is longer than {SOCKET_PATH_MAX} bytes; use a shorter --dir")
        config = decode_pod_config(record)
        refuse_user_namespace(config, self.name)
        if config.linux.cgroup_parent:
            cgroups.pod_parent_path(config.linux.cgroup_parent)  # refused now, not at Start, if bad
        spec = json.dumps(sandbox_spec(config, record.netns_path)).encode()
        base = self.base(record)
        bundle = base / SANDBOX_BUNDLE
        try:
            (bundle / "rootfs" / "dev").mkdir(parents=True, exist_ok=True)
            os.chmod(base, 0o700)
            write_atomic(bundle / "config.json", spec, 0o644)
        except BaseException:
            # Nothing would remove it: the controller records a sandbox only once Create has returned.
            # Nothing runs from it or is mounted in it yet.
            shutil.rmtree(base, ignore_errors=True)
            raise

    async def start(self, record: SandboxRecord) -> StartResult:
        base = self.base(record)
        bundle, socket, pid_file = base / SANDBOX_BUNDLE, base / TASK_SOCKET, base / PID_FILE
        for stale in (socket, pid_file):
            stale.unlink(missing_ok=True)
        argv = [self.binary, "-r", str(bundle), "sandbox", "--task-socket", str(socket), "--id", record.id,
                "--pid-file", str(pid_file)]
        log_path = base / QUARK_LOG
        with open(log_path, "ab") as log_file:  # a file, not a pipe: the daemon may keep it open
            process = await asyncio.create_subprocess_exec(*argv, cwd=bundle, stdin=subprocess.DEVNULL,
                                                           stdout=log_file, stderr=log_file, env=owner_env(base))
        try:
            return await self._started(record, process, socket, pid_file, log_path)
        except BaseException:
            # Also a cancelled Start: `quark sandbox` would go on to start QVisor, which nothing would stop.
            if process.returncode is None:
                process.kill()
            state = self._state(record)
            if is_alive(int(state.get("pid", 0)), int(state.get("start_time", 0))):
                _kill(int(state["pid"]))
            raise

    async def _started(self, record: SandboxRecord, process: asyncio.subprocess.Process, socket: Path,
                       pid_file: Path, log_path: Path) -> StartResult:
        try:
            async with asyncio.timeout(START_TIMEOUT):
                status = await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise RuntimeFailure(f"quark sandbox {record.id} did not return within {START_TIMEOUT:.0f}s") from None
        pid = self._read_pid(pid_file)
        if pid == 0 or process_start_time(pid) == 0:
            raise RuntimeFailure(f"quark sandbox {record.id} exited {status} without a live pid in {pid_file}: "
                                 f"{_tail(log_path)}")
        state = self._state(record)
        state.update(pid=pid, start_time=process_start_time(pid), killed=False)
        try:
            async with asyncio.timeout(SOCKET_GRACE):
                while not socket.is_socket():  # noqa: ASYNC110 - another process binds it
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise RuntimeFailure(f"quark sandbox {record.id}: pid {pid} serves no {socket}: {_tail(log_path)}") \
                from None
        log.info("sandbox %s: QVisor pid %d serves %s", record.id, pid, socket)
        relay = await self._start_relay(record, socket)
        # Quark ignores the sandbox spec's cgroupsPath: QVisor (the VM and its guest's memory) and its relay
        # are put into the pod's cgroup here, so the pod's limits bound them and its metrics count them.
        # Its directories are recorded (with the pids above) before they are made: only Start's own
        # save would record them otherwise, and a sandboxer that died before it left them.
        def record_cgroup(cgroup: cgroups.PodCgroup) -> None:
            state["cgroup"] = cgroup.recorded()
            self.persist(record)

        cgroup = cgroups.place_in_pod_cgroup(record.id, decode_pod_config(record).linux.cgroup_parent,
                                             [pid, int(state["relay_pid"])], "QVisor", before_making=record_cgroup)
        if cgroup is not None:
            state["cgroup"] = cgroup.recorded()
        return StartResult(pid=pid, address=f"ttrpc+unix://{relay}", version=3)

    async def _start_relay(self, record: SandboxRecord, quark_socket: Path) -> Path:
        base = self.base(record)
        listen = base / RELAY_SOCKET
        listen.unlink(missing_ok=True)
        argv = [*helper_argv("quark-sandboxer", "task-relay", "kuasar.quark.task_relay"),
                "--listen", str(listen), "--upstream", str(quark_socket),
                "--sandbox-bundle", str(base / SANDBOX_BUNDLE), "--log-level", self.config.log_level]
        with open(base / RELAY_LOG, "ab") as log_file:
            # Its own session: a sandboxer restart (or its process group's SIGTERM) must not end
            # containerd's task connections.
            process = await asyncio.create_subprocess_exec(*argv, executable=sys.executable, stdin=subprocess.DEVNULL,
                                                           stdout=log_file, stderr=log_file, start_new_session=True,
                                                           env=owner_env(base))
        state = self._state(record)
        state.update(relay_pid=process.pid, relay_start_time=process_start_time(process.pid))
        self._relays[record.id] = process
        try:
            async with asyncio.timeout(RELAY_START_TIMEOUT):
                while not listen.is_socket():  # noqa: ASYNC110 - another process binds it
                    if process.returncode is not None:
                        raise RuntimeFailure(f"sandbox {record.id}: the task relay exited {process.returncode}: "
                                             f"{_tail(base / RELAY_LOG)}")
                    await asyncio.sleep(0.01)
        except BaseException as exc:
            if process.returncode is None:
                process.kill()
            if isinstance(exc, TimeoutError):
                raise RuntimeFailure(f"sandbox {record.id}: the task relay did not listen within "
                                     f"{RELAY_START_TIMEOUT:.0f}s: {_tail(base / RELAY_LOG)}") from None
            raise
        self._watch_relay(record)
        return listen

    def _watch_relay(self, record: SandboxRecord) -> None:
        old = self._relay_watchers.pop(record.id, None)
        if old is not None:
            old.cancel()
        self._relay_watchers[record.id] = asyncio.ensure_future(self._relay_watcher(record))

    async def _relay_watcher(self, record: SandboxRecord) -> None:
        """The relay holds containerd's task connections. When it dies, containerd takes every container
        of the sandbox for exited (255) and deletes it, while in QVisor they would run on (and kubelet
        would start a second copy of each beside the first): QVisor is ended with it, so the sandbox
        reads as exited too and kubelet makes it anew, as a runc pod ends with its task server."""
        state = self._state(record)
        pid, start_time = int(state.get("relay_pid", 0)), int(state.get("relay_start_time", 0))
        if is_alive(pid, start_time):
            await wait_for_exit(pid)
        qvisor, qvisor_start = int(state.get("pid", 0)), int(state.get("start_time", 0))
        if state.get("killed") or not is_alive(qvisor, qvisor_start):
            return
        log.error("sandbox %s: task relay pid %d exited (see %s); ending QVisor, whose containers containerd "
                  "now takes for exited", record.id, pid, self.base(record) / RELAY_LOG)
        _kill(qvisor)

    @staticmethod
    def _read_pid(path: Path) -> int:
        try:
            text = path.read_text().strip()
        except OSError:
            return 0
        return int(text) if text.isdigit() else 0

    async def wait(self, record: SandboxRecord) -> ExitInfo:
        state = self._state(record)
        pid, start_time = int(state.get("pid", 0)), int(state.get("start_time", 0))
        if is_alive(pid, start_time):
            await wait_for_exit(pid)
        return ExitInfo(KILLED_EXIT_STATUS if state.get("killed") else LOST_EXIT_STATUS)

    async def stop(self, record: SandboxRecord, timeout: float) -> None:
        state = self._state(record)
        pid, start_time = int(state.get("pid", 0)), int(state.get("start_time", 0))
        if not is_alive(pid, start_time):
            return
        state["killed"] = True
        # SIGKILL at once, whatever the timeout, as Kuasar does: QVisor forwards every other signal into its
        # guest, so a SIGTERM would reach a container in it (or nothing) and only cost the whole timeout.
        _kill(pid)

    async def shutdown(self, record: SandboxRecord) -> None:
        base = self.base(record)
        state = self._state(record)
        watcher = self._relay_watchers.pop(record.id, None)
        if watcher is not None:
            watcher.cancel()
        relay_pid, relay_start = int(state.get("relay_pid", 0)), int(state.get("relay_start_time", 0))
        if is_alive(relay_pid, relay_start):
            _kill(relay_pid)
        process = self._relays.pop(record.id, None)
        if process is not None:  # ours to reap
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            await process.wait()
        # QVisor or a relay of a Start cut short by a crash of ours: the record never got its pid. Found by
        # the sandbox's directory in its environment (strays.OWNER_ENV).
        await kill_strays(base)
        # Taken from the record as it is removed: a Shutdown tried again (this one failing below) must not
        # count it gone twice, which would let a parent it shares go with a pod that still needs it.
        saved_cgroup = state.pop("cgroup", None)
        if saved_cgroup:  # after the processes: a cgroup that holds one stays
            with contextlib.suppress(OSError):
                await cgroups.remove_when_empty(cgroups.PodCgroup.from_record(saved_cgroup), CGROUP_EMPTY_WAIT)
        containers = self._containers(record)
        for cid in list(containers.state):
            containers.remove(cid)
        left = quark_containers.unmount_all_under(base) if base.exists() else []
        if left:
            raise RuntimeFailure(f"sandbox {record.id}: still mounted under {base}: {left}")
        shutil.rmtree(base, ignore_errors=True)

    async def metrics(self, record: SandboxRecord) -> any_pb2.Any:
        state = self._state(record)
        if not is_alive(int(state.get("pid", 0)), int(state.get("start_time", 0))):
            raise FailedPrecondition(f"sandbox {record.id} is not running")
        return cgroups.metrics_for_pid(int(state["pid"]))

    async def update(self, record: SandboxRecord, fields: list[str]) -> None:
        if "extensions.tasks" not in fields:
            return
        value = (record.extra.get("extensions") or {}).get("tasks")
        if value is None:
            # As Kuasar: an Update naming the field without it is a mistake, not "remove every container".
            raise InvalidArgument("Update names extensions.tasks but the sandbox carries no tasks extension")
        self._containers(record).apply(quark_containers.parse_tasks(value))

    async def recover(self, records: list[SandboxRecord]) -> None:
        for record in records:  # whatever their state: each one's Shutdown removes its cgroup
            cgroups.adopt(self._state(record).get("cgroup"))
        for record in records:
            state = self._state(record)
            if record.state != "ready":
                continue
            if not is_alive(int(state.get("pid", 0)), int(state.get("start_time", 0))):
                log.warning("sandbox %s: QVisor pid %s is gone; reporting it exited", record.id, state.get("pid"))
                record.found_gone()
            else:  # a relay gone while we were down ends QVisor now, as one that dies later
                self._watch_relay(record)

    async def remove_unrecorded(self, recorded: set[str]) -> None:
        """Sandbox directories with no record: made by a Create during which we died, before the
        controller saved the sandbox (containerd's Create failed with us: nothing would ever ask for
        them). Removed as Shutdown removes a sandbox, with nothing recorded to go by: whatever runs from
        the directory is killed, whatever is mounted in it detached."""
        for base in sorted(self.config.dir.iterdir()) if self.config.dir.is_dir() else []:
            if base.name in RESERVED or base.name in recorded or not _is_sandbox_dir(base):
                continue
            log.warning("sandbox %s: no record of it (a Create cut short); removing %s", base.name, base)
            try:
                await self.shutdown(SandboxRecord(id=base.name))
            except Exception as exc:  # noqa: BLE001 - one sandbox must not keep the others (or us) from going on
                log.error("sandbox %s: removing it: %s", base.name, exc)

    def status_info(self, record: SandboxRecord, verbose: bool) -> dict[str, str]:
        if not verbose:
            return {}
        return {"backend": "quark", "task_address": record.address,
                "quark_pid": str(self._state(record).get("pid", 0))}


def _is_sandbox_dir(path: Path) -> bool:
    """A directory a Create made under --dir (not another sandbox type's, sharing the directory)."""
    try:
        validate_id(path.name, "sandbox id")
    except KuasarError:
        return False
    return not path.is_symlink() and (path / SANDBOX_BUNDLE / "rootfs").is_dir()


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _tail(path: Path) -> str:
    try:
        return path.read_bytes()[-LOG_TAIL:].decode(errors="replace").strip() or "(no output)"
    except OSError:
        return "(no output)"
