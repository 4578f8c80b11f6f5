"""cgroup v1 and v2: pod cgroups under CRI's cgroup_parent, and stats in containerd's Metrics shapes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2

from .api.containerd.cgroups.v1 import metrics_pb2 as v1
from .api.containerd.cgroups.v2 import metrics_pb2 as v2
from .errors import FailedPrecondition, InvalidArgument, KuasarError
from .ids import validate_id

log = logging.getLogger(__name__)

# How often remove_when_empty looks whether the killed processes have left.
EMPTY_POLL = 0.02

CGROUP_ROOT = Path("/sys/fs/cgroup")
# containerd looks these type URLs up in its registry when decoding Task.Stats for CRI.
V1_TYPE_URL = "io.containerd.cgroups.v1.Metrics"
V2_TYPE_URL = "io.containerd.cgroups.v2.Metrics"
# v1 controllers whose files we read and write (limits, accounting, freezing); a pod cgroup is made in
# every mounted hierarchy (`v1_hierarchies`).
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer")


@functools.cache
def v1_hierarchies() -> tuple[str, ...]:
    """The hierarchies mounted under CGROUP_ROOT on a v1 (or hybrid) host, each once. runc and runsc
    make a container's cgroup path in every one of them, named (`systemd`) and hybrid's `unified`
    included, so a pod cgroup made in fewer would leave its parent directories behind in the rest."""
    names = []
    for entry in sorted(os.listdir(CGROUP_ROOT)):
        path = CGROUP_ROOT / entry
        if not path.is_symlink() and os.path.ismount(path):  # `cpu` -> `cpu,cpuacct` links: one mount
            names.append(entry)
    return tuple(names)


def hierarchy_roots() -> list[Path]:
    """Where a cgroup path is made: the unified root on a v2 host, every mounted hierarchy on v1."""
    return [CGROUP_ROOT] if is_unified() else [CGROUP_ROOT / h for h in v1_hierarchies()]


def is_unified() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def proc_cgroups(pid: int) -> dict[str, str]:
    """Map controller name (or "" for v2) to the cgroup path of `pid`."""
    paths: dict[str, str] = {}
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return paths
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def cgroup_procs_file(pid: int) -> Path | None:
    """The cgroup.procs file of the cgroup `pid` lives in (the pids, memory or unified hierarchy); None
    when that is not known: `pid` gone, or in the root cgroup, which is where the kernel moves an exited
    process while it is a zombie (its "cgroup" would be every process of the host)."""
    paths = proc_cgroups(pid)
    for controller in ("", "pids", "memory", "freezer"):
        if controller in paths and (controller or is_unified()):
            relative = _clean_relative(paths[controller])
            if not relative:
                return None
            procs = (CGROUP_ROOT / controller if controller else CGROUP_ROOT) / relative / "cgroup.procs"
            if procs.is_file():
                return procs
    return None


def read_procs(procs_file: Path) -> list[int] | None:
    """The processes a cgroup.procs file lists; None if it cannot be read (the cgroup is gone)."""
    try:
        return [int(line) for line in procs_file.read_text().split()]
    except OSError:
        return None


def procs_below(procs_file: Path) -> list[int] | None:
    """The processes of a cgroup and of every cgroup below it (a container may make its own: systemd,
    docker-in-docker), as runc's `kill --all` finds them; None if the cgroup is gone."""
    found = read_procs(procs_file)
    if found is None:
        return None
    for below, _, files in os.walk(procs_file.parent):
        if below != str(procs_file.parent) and "cgroup.procs" in files:
            found += read_procs(Path(below) / "cgroup.procs") or []
    return found


def cgroup_procs_of(pid: int) -> list[int] | None:
    """Every process in the cgroup `pid` lives in and below it; None when that is not known (see
    cgroup_procs_file)."""
    procs_file = cgroup_procs_file(pid)
    return None if procs_file is None else procs_below(procs_file)


# Passes of kill_members over a cgroup's list: a process that forked as it was killed may have a child
# the pass's read did not list yet (the kernel adds a new child to the cgroup at the end of fork), which
# the next pass finds. runc freezes the cgroup instead; a kill on a process's exit cannot wait for that.
KILL_PASSES = 3


def kill_members(procs_file: Path, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to every process in the cgroup of `procs_file` and below it, without waiting for them
    to end; SIGKILL in KILL_PASSES passes (another signal once: a handler would see it each time)."""
    if sig == signal.SIGKILL:
        _thaw_below(procs_file.parent)  # a frozen process does not act on SIGKILL until thawed
    for _ in range(KILL_PASSES if sig == signal.SIGKILL else 1):
        pids = procs_below(procs_file)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def _thaw_below(directory: Path) -> None:
    """Thaw the cgroup at `directory` and every one below it (v2's cgroup.freeze; v1's freezer
    hierarchy): a paused container's processes left by a dead task server would never die otherwise."""
    for below, _, files in os.walk(directory):
        for name, thawed in (("cgroup.freeze", "0"), ("freezer.state", "THAWED")):
            if name in files:
                with contextlib.suppress(OSError):
                    Path(below, name).write_text(thawed)


SLICE = ".slice"


def slice_path(slice_name: str) -> str:
    """Where systemd puts a slice's cgroup: `a-b-c.slice` -> `a.slice/a-b.slice/a-b-c.slice`."""
    stem = slice_name[: -len(SLICE)] if slice_name.endswith(SLICE) else ""
    words = stem.split("-")
    if not stem or "/" in stem or not all(words):
        raise InvalidArgument(f"{slice_name!r} is not a systemd slice name")
    return "/".join("-".join(words[:i]) + SLICE for i in range(1, len(words) + 1))


def pod_process_leaf(pod_id: str, parent: str) -> str:
    """The `process_leaf` of a pod whose process we place: its id under cgroup v2, or for a root parent
    (not the root cgroup itself, as containerd's pause); none otherwise under v1."""
    return pod_id if is_unified() or not _clean_relative(parent) else ""  # `.`, `/./`: the root too


def pod_parent_path(cgroup_parent: str) -> str:
    """CRI's `cgroup_parent` as a cgroupfs path. Kubelet's systemd cgroup driver names the pod's slice
    (`kubepods-besteffort-pod<uid>.slice`); like containerd, a parent whose last part is a slice is
    taken as that slice, which lives at its expanded path."""
    # Refused here, at Create: normalised later, a `..` would just vanish at the root (`a/../..` is the
    # root, `../../etc` is `etc`). `/` itself is a parent kubelet gives without QoS cgroups.
    if ".." in cgroup_parent.split("/"):
        raise InvalidArgument(f"cgroup_parent {cgroup_parent!r} has a '..'")
    base = cgroup_parent.rstrip("/").rsplit("/", 1)[-1]
    return slice_path(base) if base.endswith(SLICE) else cgroup_parent


def cgroupfs_path(spec_path: str) -> str:
    """An OCI `linux.cgroupsPath` as a cgroupfs path: containerd's systemd form `slice:prefix:name`
    (what it writes for a pod whose parent is a slice) becomes `/<slice path>/<prefix>-<name>.scope`,
    where systemd's runc driver would put it; a path stays as it is."""
    if ":" not in spec_path:
        return spec_path
    parts = spec_path.split(":")
    if len(parts) != 3 or not parts[2]:
        raise InvalidArgument(f"cgroupsPath {spec_path!r} is neither a path nor slice:prefix:name")
    slice_name, prefix, name = parts
    unit = f"{prefix}-{name}.scope" if prefix else (name if name.endswith((".scope", SLICE)) else f"{name}.scope")
    # Absolute: runc takes a relative path under its own cgroup, which need not be the root.
    return f"/{slice_path(slice_name or 'system.slice')}/{unit}"


def use_cgroupfs_path(spec: dict) -> bool:
    """Rewrite a spec's `cgroupsPath` for a runtime run with its cgroupfs driver (as we run runc and
    runsc); True if the spec changed. The systemd form becomes its cgroupfs path, and a relative path
    (containerd's parent/id for a relative CRI cgroup_parent, which crictl allows) an absolute one: the
    pod's cgroup is that parent under each hierarchy's root, where runc would take a relative path under
    its own cgroup (the task server's, not the root where a service manager puts us), away from its
    pod and its limits, and leave the parents it made there behind."""
    linux = spec.get("linux") or {}
    path = linux.get("cgroupsPath")
    if not isinstance(path, str) or not path:
        return False
    absolute = cgroupfs_path(path) if ":" in path else "/" + path.lstrip("/")
    if absolute == path:
        return False
    linux["cgroupsPath"] = absolute
    return True


def _clean_relative(path: str) -> str:
    rel = os.path.normpath("/" + path).lstrip("/")
    if ".." in rel.split("/"):
        raise InvalidArgument(f"cgroup path {path!r} escapes the cgroup root")
    return rel


# How long the processes of a cgroup being removed get to go after SIGKILL (they are ending, not
# stuck: waiting longer only holds up the removal of the rest).
EMPTY_WAIT_S = 5.0
EMPTY_POLL_S = 0.02


def directories_of(path: str) -> list[Path]:
    """The cgroup at `path` (a cgroupfs path) in every hierarchy it exists in; none for the root."""
    relative = _clean_relative(path)
    return [root / relative for root in hierarchy_roots() if (root / relative).is_dir()] if relative else []


def empty_and_remove(paths: list[str]) -> list[Path]:
    """Kill every process in the cgroups at `paths` (cgroupfs paths) in every hierarchy, then remove
    them there; what is still busy after EMPTY_WAIT_S (one wait for all) stays, and is returned. Never
    the root."""
    directories = [directory for path in paths for directory in directories_of(path)]
    for directory in directories:  # all killed before any is waited for
        try:
            pids = (directory / "cgroup.procs").read_text().split()
        except OSError:
            continue
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + EMPTY_WAIT_S
    left = []
    for directory in directories:
        while True:
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(EMPTY_POLL_S)  # its killed processes are still exiting
                    continue
                left.append(directory)
            break
    return left


# Directories this process made for pod cgroups, by how many PodCgroups still stand in or below them:
# two pods under a parent neither found (a cgroup_parent of crictl's, no kubelet to make it) share the
# parent, and whichever goes last removes it. A sandboxer whose pods outlive it (Quark's, VM pods) counts
# again at its restart what their records say they made (`adopt`).
_USERS: dict[str, int] = {}


def adopt(saved: Any) -> None:
    """Count again a pod cgroup made before a restart, from what its pod's record keeps of it
    (`PodCgroup.recorded`): a pod made since under a parent that one made then
    counts the parent too, rather than take it for someone else's (the last pod of the two to go would
    leave it), and whichever goes last removes it. For every record that has one, before any pod is
    made; a record without one (or with one this code cannot read) adds nothing."""
    created = saved.get("created") if isinstance(saved, dict) else None
    for directory in created if isinstance(created, list) else []:
        if isinstance(directory, str):
            _USERS[directory] = _USERS.get(directory, 0) + 1


class PodCgroup:
    """The cgroup named by CRI's `cgroup_parent` (created if missing, removed only if we created it).

    With `process_leaf`, the process `add` places goes into that child of it (made and removed with it),
    not into the cgroup itself: the pod's containers get cgroups of their own below the pod's, and cgroup
    v2 lets no cgroup both hold a process and hand controllers down to children (runc's writes to the
    pod cgroup's cgroup.subtree_control would fail with EBUSY, and so every container's limits). It is
    where containerd puts a pod's pause container, `<cgroup_parent>/<pod id>`; a root parent (`/`) has
    the leaf alone. Callers ask for it under v2 only (`pod_process_leaf`): v1 has no such rule, and a
    leaf there costs a mkdir and an rmdir in every hierarchy (about a dozen) per pod."""

    def __init__(self, path: str, created: list[str] | None = None, process_leaf: str = "") -> None:
        self.path = _clean_relative(path)
        self.created = created or []
        leaf = validate_id(process_leaf, "pod id") if process_leaf else ""
        self.process_path = "/".join(part for part in (self.path, leaf) if part)

    def recorded(self) -> dict[str, Any]:
        """What a pod's record keeps of it: `from_record` makes it again after a restart, `adopt` counts it."""
        return {"path": self.path, "created": list(self.created)}

    @classmethod
    def from_record(cls, saved: dict[str, Any]) -> PodCgroup:
        return cls(saved["path"], list(saved["created"]))

    def stats_path(self) -> str:
        """Where the pod's usage is read: its cgroup, or with a root parent (no cgroup of the pod's own
        above its containers) its process's."""
        return self.path or self.process_path

    def create(self, before_making: Callable[[PodCgroup], None] | None = None) -> None:
        """Make what is missing of it in every hierarchy. `before_making` is called once `created` names
        every directory about to be made, before the first is: a caller that records them there (in
        its pod's record) leaves none unrecorded if it dies half way (one not made yet is skipped at
        removal)."""
        missing: list[tuple[Path, Path]] = []  # (hierarchy root, directory)
        for root in hierarchy_roots():
            current = root
            for part in Path(self.process_path).parts:
                current = current / part
                key = str(current)
                if not current.exists():
                    missing.append((root, current))
                elif key in _USERS:  # ours, made for another pod that is still there
                    _USERS[key] += 1
                    self.created.append(key)
        if missing:
            self.created += [str(directory) for _, directory in missing]
            if before_making is not None:
                before_making(self)
            for root, directory in missing:
                try:
                    directory.mkdir()
                except FileExistsError:  # made meanwhile by another process (a task server of another type)
                    self.created.remove(str(directory))
                    continue
                _USERS[str(directory)] = 1
                if root.name == "cpuset":
                    _inherit_cpuset(directory)
        if is_unified():
            enable_controllers(self.process_path)

    def leave_parents(self) -> None:
        """From now on remove() takes only the cgroup itself, never the parents made for it: what runc
        does with a container's cgroup (under containerd's /k8s.io, say)."""
        leaf = "/" + self.path
        for directory in self.created:
            if not directory.endswith(leaf):
                _release(directory)
        self.created = [d for d in self.created if d.endswith(leaf)]

    def add(self, pid: int) -> None:
        for root in hierarchy_roots():
            (root / self.process_path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        for directory in reversed(self.created):
            if not _release(directory):
                continue
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    log.warning("cgroup %s still busy, left in place", directory)
                else:
                    raise
        self.created = []


async def remove_when_empty(cgroup: PodCgroup, timeout: float) -> None:
    """`cgroup.remove()` once the processes just killed have left it: a dead process keeps a cgroup busy
    until it is reaped (by us, or by an init that may take its time), and rmdir then fails."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # Its own directories only: a parent made for it that other pods share holds their processes, and
    # waiting for those to leave took the whole timeout at every removal of a pod but the last.
    own = _deepest(cgroup.created)
    # (polled: the kernel tells a cgroup's emptying only through inotify on cgroup.events, v2 alone)
    while any(_populated(directory) for directory in own) and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(EMPTY_POLL)
    cgroup.remove()


def _deepest(directories: list[str]) -> list[str]:
    """Those of `directories` with none of the others below them."""
    return [directory for directory in directories
            if not any(other.startswith(directory + "/") for other in directories)]


def _populated(directory: str) -> bool:
    try:
        events = Path(directory, "cgroup.events")  # cgroup v2 (and the unified hierarchy of a hybrid)
        if events.exists():
            return "populated 1" in events.read_text()
        return bool(Path(directory, "cgroup.procs").read_text().strip())
    except OSError:  # gone meanwhile
        return False


def place_in_pod_cgroup(pod_id: str, cgroup_parent: str, pids: list[int], what: str,
                        before_making: Callable[[PodCgroup], None] | None = None) -> PodCgroup | None:
    """Put a pod's own processes (a VM's, a QVisor) into the cgroup CRI names for the pod, so the pod's
    limits bound them and its metrics count them; None without a parent. A failure is logged, not
    raised: the pod runs on, outside its limits, as it would without a parent. `before_making`: as
    PodCgroup.create's."""
    if not cgroup_parent:
        return None
    path = pod_parent_path(cgroup_parent)
    # A root parent (`/`) gets the processes a cgroup of their own, /<pod id>, not the root cgroup.
    cgroup = PodCgroup(path, process_leaf=pod_process_leaf(pod_id, path))
    try:
        cgroup.create(before_making)
        for pid in pids:
            cgroup.add(pid)
    except (OSError, KuasarError) as err:
        log.warning("cgroup %s for %s: %s", cgroup_parent, what, err)
    return cgroup


def enable_controllers(path: str) -> None:
    """cgroup v2: hand every controller the root has down to the cgroup at `path` (relative to the
    root), through the cgroup.subtree_control of the root and of each cgroup between, as runc does for
    a container's cgroup. A child has the files of a controller only if its parent enables it, so a
    limit of the wasm task server's (memory.max) could not be written in a cgroup it made under a
    parent nobody had enabled memory in (writing a file cgroupfs does not have is EACCES). A
    controller a cgroup cannot enable (one above holds processes, or a manager keeps it) is left
    out there: a limit that needs it then fails, naming its file."""
    wanted = (CGROUP_ROOT / "cgroup.controllers").read_text().split()
    parts = Path(_clean_relative(path)).parts
    for directory in [CGROUP_ROOT.joinpath(*parts[:depth]) for depth in range(len(parts))]:
        try:
            enabled = set((directory / "cgroup.subtree_control").read_text().split())
            available = set((directory / "cgroup.controllers").read_text().split())
        except OSError:
            return  # gone meanwhile: so is `path`
        missing = [f"+{name}" for name in wanted if name in available and name not in enabled]
        if not missing:
            continue
        try:
            write_knob(directory / "cgroup.subtree_control", " ".join(missing))
        except OSError:  # all or nothing: one that cannot be enabled here must not stop the others
            for one in missing:
                with contextlib.suppress(OSError):
                    write_knob(directory / "cgroup.subtree_control", one)


def write_knob(path: Path, text: str) -> None:
    """Write a cgroup file that must exist: cgroupfs makes none, and an open that may create one fails
    with EACCES where the file is missing, rather than ENOENT."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _release(directory: str) -> bool:
    """One PodCgroup less in `directory`; whether it was the last (one unknown here was made by a
    process of ours before a restart, for that PodCgroup alone)."""
    users = _USERS.pop(directory, 1) - 1
    if users > 0:
        _USERS[directory] = users
    return users <= 0


def _inherit_cpuset(directory: Path) -> None:
    # A fresh v1 cpuset cgroup has empty cpus/mems and refuses tasks until they are filled in.
    for name in ("cpuset.cpus", "cpuset.mems"):
        target = directory / name
        if target.exists() and not target.read_text().strip():
            target.write_text((directory.parent / name).read_text().strip() or "0")


def _read_int(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except OSError:
        return 0
    if text == "max":
        return 0
    try:
        return int(text)
    except ValueError:
        return 0


def _read_kv(path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                values[key] = int(value)
    except OSError:
        pass
    return values


def metrics_for_pid(pid: int) -> any_pb2.Any:
    """Stats of the cgroup `pid` lives in, packed as containerd expects from Task.Stats."""
    paths = proc_cgroups(pid)
    if not any(_clean_relative(path) for path in paths.values()):
        # Gone, or an exited process not reaped yet, which the kernel moves to the root cgroup: its
        # "stats" would be the whole host's.
        raise FailedPrecondition(f"process {pid} has exited")
    if is_unified():
        return _pack(V2_TYPE_URL, _v2_metrics(CGROUP_ROOT / _clean_relative(paths.get("", "/"))))
    return _pack(V1_TYPE_URL, _v1_metrics({c: CGROUP_ROOT / c / _clean_relative(p)
                                           for c, p in paths.items() if c}))


def metrics_for_path(path: str) -> any_pb2.Any:
    rel = _clean_relative(path)
    if is_unified():
        return _pack(V2_TYPE_URL, _v2_metrics(CGROUP_ROOT / rel))
    return _pack(V1_TYPE_URL, _v1_metrics({c: CGROUP_ROOT / c / rel for c in V1_CONTROLLERS}))


def _pack(type_url: str, message) -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=message.SerializeToString())


def _v1_metrics(dirs: dict[str, Path]) -> v1.Metrics:
    metrics = v1.Metrics()
    pids = dirs.get("pids")
    if pids is not None:
        metrics.pids.current = _read_int(pids / "pids.current")
        metrics.pids.limit = _read_int(pids / "pids.max")
    acct = dirs.get("cpuacct") or dirs.get("cpu,cpuacct")
    if acct is not None:
        metrics.cpu.usage.total = _read_int(acct / "cpuacct.usage")
        stat = _read_kv(acct / "cpuacct.stat")
        ticks = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        metrics.cpu.usage.user = stat.get("user", 0) * ticks
        metrics.cpu.usage.kernel = stat.get("system", 0) * ticks
        try:
            per_cpu = (acct / "cpuacct.usage_percpu").read_text().split()
            metrics.cpu.usage.per_cpu.extend(int(v) for v in per_cpu)
        except OSError:
            pass
    cpu = dirs.get("cpu")
    if cpu is not None:
        throttle = _read_kv(cpu / "cpu.stat")
        metrics.cpu.throttling.periods = throttle.get("nr_periods", 0)
        metrics.cpu.throttling.throttled_periods = throttle.get("nr_throttled", 0)
        metrics.cpu.throttling.throttled_time = throttle.get("throttled_time", 0)
    memory = dirs.get("memory")
    if memory is not None:
        stat = _read_kv(memory / "memory.stat")
        for key, field in V1_MEMORY_STAT_FIELDS.items():
            setattr(metrics.memory, field, stat.get(key, 0))
        for entry, prefix in (("usage", "memory"), ("swap", "memory.memsw"), ("kernel", "memory.kmem"),
                              ("kernel_tcp", "memory.kmem.tcp")):
            target = getattr(metrics.memory, entry)
            target.usage = _read_int(memory / f"{prefix}.usage_in_bytes")
            target.max = _read_int(memory / f"{prefix}.max_usage_in_bytes")
            target.limit = _read_int(memory / f"{prefix}.limit_in_bytes")
            target.failcnt = _read_int(memory / f"{prefix}.failcnt")
    return metrics


def _v1_memory_stat_fields() -> dict[str, str]:
    """memory.stat's keys by the MemoryStat field each fills, its own and its hierarchy's (`total_`), as
    containerd's cgroups library reads them: CRI's stats take page faults from total_pgfault."""
    own = {"cache": "cache", "rss": "rss", "rss_huge": "rss_huge", "mapped_file": "mapped_file", "dirty": "dirty",
           "writeback": "writeback", "pgpgin": "pg_pg_in", "pgpgout": "pg_pg_out", "pgfault": "pg_fault",
           "pgmajfault": "pg_maj_fault", "inactive_anon": "inactive_anon", "active_anon": "active_anon",
           "inactive_file": "inactive_file", "active_file": "active_file", "unevictable": "unevictable"}
    return {**own, **{f"total_{key}": f"total_{field}" for key, field in own.items()},
            "hierarchical_memory_limit": "hierarchical_memory_limit",
            "hierarchical_memsw_limit": "hierarchical_swap_limit"}


V1_MEMORY_STAT_FIELDS = _v1_memory_stat_fields()


def _v2_metrics(directory: Path) -> v2.Metrics:
    metrics = v2.Metrics()
    metrics.pids.current = _read_int(directory / "pids.current")
    metrics.pids.limit = _read_int(directory / "pids.max")
    cpu = _read_kv(directory / "cpu.stat")
    metrics.cpu.usage_usec = cpu.get("usage_usec", 0)
    metrics.cpu.user_usec = cpu.get("user_usec", 0)
    metrics.cpu.system_usec = cpu.get("system_usec", 0)
    metrics.cpu.nr_periods = cpu.get("nr_periods", 0)
    metrics.cpu.nr_throttled = cpu.get("nr_throttled", 0)
    metrics.cpu.throttled_usec = cpu.get("throttled_usec", 0)
    memory = _read_kv(directory / "memory.stat")
    metrics.memory.anon = memory.get("anon", 0)
    metrics.memory.file = memory.get("file", 0)
    metrics.memory.inactive_file = memory.get("inactive_file", 0)
    metrics.memory.usage = _read_int(directory / "memory.current")
    metrics.memory.usage_limit = _read_int(directory / "memory.max")
    return metrics
