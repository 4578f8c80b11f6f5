"""Containers announced through `Controller.Update` + `extensions.tasks`, laid out for Quark as Kuasar does.

Quark's VM sees the sandbox bundle (`<base>/sandbox`) and nothing else of the host, so every container
gets a bundle inside it, `<base>/sandbox/<cid>`: its rootfs mounts are mounted onto `<cbundle>/rootfs`,
each `bind` mount of its spec is bind-mounted to `<cbundle>/rootfs/<destination>` (read-only if its
options say `ro`; dropped from the spec), its stdio FIFOs are bind-mounted onto
`<cbundle>/stdin|stdout|stderr` with the io paths rewritten to `/<cid>/stdout` etc. (the path inside the
sandbox), and the spec is written to `<cbundle>/config.json`. Exec processes get
`<cbundle>/<exec>-stdin|stdout|stderr` the same way.

Only Kuasar's containerd fork and iSulad send this Update; with upstream containerd the task relay
(task_relay.py) lays each container out the same way at its `Task.Create`, since QVisor reads `/<cid>` of
its sandbox bundle in sandbox mode. Unlike Kuasar, a removed exec's FIFO
mounts are released at once (by their host path), and the layout is persisted so a restarted
sandboxer still knows what to unmount.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kuasar.common import beneath, linux, mounts
from kuasar.common.errors import InvalidArgument
from kuasar.common.ids import validate_id
from kuasar.common.rootfs_paths import resolve_in_root
from kuasar.common.state import write_atomic

log = logging.getLogger(__name__)

UMOUNT_NOFOLLOW = 8
STDIO = ("stdin", "stdout", "stderr")
# What the sandbox bundle itself holds (quark_spec): no container may be laid out under these names.
SANDBOX_BUNDLE_NAMES = frozenset({"rootfs", "config.json"})


@dataclass(frozen=True)
class OciMount:
    """A rootfs entry of `extensions.tasks` (OCI mount shape), usable by `mounts.mount_rootfs`."""

    type: str
    source: str
    options: tuple[str, ...]


def parse_tasks(value: str | None) -> dict[str, dict[str, Any]]:
    """`{"tasks": [...]}` -> {task_id: task}; absent or empty means no containers."""
    if not value:
        return {}
    try:
        data = json.loads(value)
    except ValueError:
        raise InvalidArgument("sandbox.extensions[tasks] is not JSON") from None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if tasks is None:
        return {}
    if not isinstance(tasks, list):
        raise InvalidArgument("extensions.tasks: 'tasks' must be a list")
    found: dict[str, dict[str, Any]] = {}
    for entry in tasks:
        if not isinstance(entry, dict):
            raise InvalidArgument("extensions.tasks: every task must be an object")
        found[validate_id(str(entry.get("task_id", "")), "task_id")] = entry
    return found


def unmount(path: Path) -> None:
    try:
        linux.umount(str(path), linux.MNT_DETACH | UMOUNT_NOFOLLOW)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below `directory`, deepest first."""
    return [Path(point) for point in mounts.mount_points_under(directory)]


def unmount_all_under(directory: Path) -> list[Path]:
    """Detach everything mounted under `directory`; return what is still mounted."""
    for _ in range(4):
        points = mounts_under(directory)
        if not points:
            return []
        for point in points:
            unmount(point)
    return mounts_under(directory)


def _undo(what: str, step: Callable[[], None]) -> None:
    """One step of undoing a failed layout: its own failure is logged, so the layout's error is the one
    raised."""
    try:
        step()
    except OSError as exc:
        log.error("quark: undoing the layout of %s: %s", what, exc)


def _receive_only(target: Path) -> None:
    """Make the mount at `target` and those below it slaves. Mounts are shared on a systemd host: a bind
    joins its source's peer group, so what is mounted below it (a volume in a rootfs bound from an image
    directory) appeared in the source and in every other bind of it, stacked over their own (a read-only
    volume showed another container's writable one), and unmounting it there took a hostPath volume's
    own submounts off the host. A slave still sees what the host mounts in the source later."""
    linux.mount("", str(target), "", linux.MS_REC | linux.MS_SLAVE)


def _require_source(source: str) -> None:
    if not os.path.isabs(source) or not os.path.exists(source):
        raise InvalidArgument(f"bind source {source!r} must be an existing absolute path")


class QuarkContainers:
    """The container bundles of one Quark sandbox; `state` is the persisted part (a JSON-able dict)."""

    def __init__(self, sandbox_bundle: Path, state: dict[str, Any]) -> None:
        self.bundle = sandbox_bundle
        self.state = state  # {cid: {"mounts": [host paths], "io": {...}, "execs": {exec: [host paths]}}}

    def apply(self, tasks: dict[str, dict[str, Any]]) -> None:
        """Diff the announced tasks against what is laid out and append, update or remove.

        A failed Update leaves the sandbox's record as it was (the controller restores it), so a failure
        here undoes what this call laid out before it is raised: mounts the record no longer names would
        stay for good. What is removed cannot be put back, so removals come last, once nothing new can fail.
        """
        added: list[str] = []  # containers laid out by this call
        added_execs: list[tuple[str, str]] = []  # (cid, exec id) of execs added to containers already there
        try:
            for cid, entry in tasks.items():
                if cid not in self.state:
                    self.append(cid, entry)
                    added.append(cid)
                else:
                    self._add_execs(cid, entry, added_execs)
            for cid in [c for c in self.state if c not in tasks]:
                self.remove(cid)
            for cid, entry in tasks.items():
                self._remove_execs(cid, entry)
        except BaseException:
            for cid, exec_id in reversed(added_execs):
                _undo(f"exec {exec_id} of {cid}", lambda cid=cid, exec_id=exec_id: self.remove_exec(cid, exec_id))
            for cid in reversed(added):
                _undo(f"container {cid}", lambda cid=cid: self.remove(cid))
            raise

    def _bind(self, source: str, target: Path, done: list[str], readonly: bool = False) -> None:
        _require_source(source)
        if os.path.isdir(source):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch(exist_ok=True)
        linux.mount(source, str(target), "", linux.MS_BIND | linux.MS_REC)
        done.append(str(target))
        _receive_only(target)
        if readonly:
            # The mount leaves the spec (Quark sees the bind, not the entry), so its `ro` is applied here,
            # to the bind and every mount below it, as Kuasar remounts its binds read-only.
            linux.set_readonly_recursive(str(target))

    def _bind_beneath(self, source: str, rootfs: Path, target: Path, done: list[str], readonly: bool) -> None:
        _require_source(source)

        def settle(mount: str) -> None:
            _receive_only(Path(mount))
            if readonly:  # the bind and every mount below it (see _bind)
                linux.set_readonly_recursive(mount)

        done.append(str(target))  # before it exists: remove() unmounts what is there, if anything
        beneath.bind_beneath(source, rootfs, str(target.relative_to(rootfs)), recursive=True, then=settle)

    def append(self, cid: str, entry: dict[str, Any]) -> None:
        """Lay a new container out; on failure, undo all of it (see apply) before raising."""
        validate_id(cid, "task_id")
        if cid in SANDBOX_BUNDLE_NAMES:  # its bundle would be the sandbox's own, and its removal QVisor's root
            raise InvalidArgument(f"container id {cid!r} is reserved in a Quark sandbox")
        try:
            self._lay_out(cid, entry)
        except BaseException:
            _undo(f"container {cid}", lambda: self.remove(cid))
            raise
        log.info("quark: container %s laid out in %s", cid, self.bundle / cid)

    def _lay_out(self, cid: str, entry: dict[str, Any]) -> None:
        cbundle = self.bundle / cid
        rootfs = cbundle / "rootfs"
        done: list[str] = []
        record: dict[str, Any] = {"mounts": done, "io": {}, "execs": {}}
        self.state[cid] = record  # recorded first: what a failure half-way made is in it for remove()
        spec = dict(entry.get("spec") or {})
        rootfs_mounts = [OciMount(str(m.get("type", "")), str(m.get("source", "")), tuple(m.get("options") or ()))
                         for m in entry.get("rootfs") or []]
        if rootfs_mounts:
            mounts.mount_rootfs(rootfs_mounts, rootfs)
            done.append(str(rootfs))
            _receive_only(rootfs)  # the volumes bound below it next
        else:
            rootfs.mkdir(parents=True, exist_ok=True)
        kept = []
        for m in spec.get("mounts") or []:
            options = m.get("options") or []
            if m.get("type") == "bind" or "bind" in options or "rbind" in options:
                destination = str(m.get("destination", "")).lstrip("/")
                if not destination or ".." in Path(destination).parts:
                    raise InvalidArgument(f"task {cid}: bad mount destination {m.get('destination')!r}")
                # Through the image's symlinks as the container would see them, never onto the host: the
                # place is resolved, then reached without following a symlink (the pod writes its volumes
                # and rootfs, and could swap one in between), and the mount goes onto it by fd.
                target = resolve_in_root(rootfs, "/" + destination)
                self._bind_beneath(str(m.get("source", "")), rootfs, target, done, readonly="ro" in options)
            else:
                kept.append(m)
        spec["mounts"] = kept
        for name in STDIO:
            path = str(entry.get(name) or "")
            if path:
                self._bind(path, cbundle / name, done)
                record["io"][name] = f"/{cid}/{name}"
        write_atomic(cbundle / "config.json", json.dumps(spec).encode())
        for process in entry.get("processes") or []:
            self.add_exec(cid, process)

    def add_exec(self, cid: str, process: dict[str, Any]) -> str:
        """Bind an exec's stdio; on failure, undo that (see apply) before raising."""
        exec_id = validate_id(str(process.get("exec_id", "")), "exec_id")
        self.state[cid]["execs"][exec_id] = done = []
        try:
            for name in STDIO:
                path = str(process.get(name) or "")
                if path:
                    self._bind(path, self.bundle / cid / f"{exec_id}-{name}", done)
        except BaseException:
            _undo(f"exec {exec_id} of {cid}", lambda: self.remove_exec(cid, exec_id))
            raise
        return exec_id

    def _add_execs(self, cid: str, entry: dict[str, Any], added: list[tuple[str, str]]) -> None:
        """Lay out the container's execs that are new in `entry`, each noted in `added` once it is."""
        for process in entry.get("processes") or []:
            if str(process.get("exec_id", "")) not in self.state[cid]["execs"]:
                added.append((cid, self.add_exec(cid, process)))

    def _remove_execs(self, cid: str, entry: dict[str, Any]) -> None:
        """Release the container's execs that `entry` no longer has."""
        wanted = {str(p.get("exec_id", "")) for p in entry.get("processes") or []}
        for exec_id in [e for e in self.state[cid]["execs"] if e not in wanted]:
            self.remove_exec(cid, exec_id)

    def remove_exec(self, cid: str, exec_id: str) -> None:
        for target in reversed(self.state[cid]["execs"].pop(exec_id, [])):
            unmount(Path(target))
            Path(target).unlink(missing_ok=True)

    def remove(self, cid: str) -> None:
        record = self.state.pop(cid, None) or {}
        for targets in (record.get("execs") or {}).values():
            for target in reversed(targets):
                unmount(Path(target))
        for target in reversed(record.get("mounts") or []):
            unmount(Path(target))
        cbundle = self.bundle / cid
        left = unmount_all_under(cbundle) if cbundle.exists() else []
        if left:
            log.error("quark: %s still mounted under %s; not removing it", left, cbundle)
            return
        shutil.rmtree(cbundle, ignore_errors=True)
