"""Container cgroups: the path from the spec, OCI LinuxResources written as v1 or v2 files, freezing.

The cgroup itself is a `kuasar.common.cgroups.PodCgroup` (created under every v1 controller the
runc pods use, or the unified tree), so stats, OOM watching and removal work as for pods.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from pathlib import Path
from typing import Any

from kuasar.common import cgroups
from kuasar.common.errors import FailedPrecondition, InvalidArgument, RuntimeFailure

log = logging.getLogger(__name__)

# How long Pause waits for the freezer to report every process frozen.
FREEZE_TIMEOUT = 10.0


def _dirs(cgroup: cgroups.PodCgroup) -> dict[str, Path]:
    """Controller -> directory ("" for the unified hierarchy)."""
    if cgroups.is_unified():
        return {"": cgroups.CGROUP_ROOT / cgroup.path}
    return {c: cgroups.CGROUP_ROOT / c / cgroup.path for c in cgroups.V1_CONTROLLERS
            if (cgroups.CGROUP_ROOT / c).is_dir()}


def _write(path: Path, value: object) -> None:
    try:
        cgroups.write_knob(path, str(value))
    except FileNotFoundError:
        return  # the controller or knob does not exist on this kernel: nothing to limit with
    except OSError as exc:
        raise RuntimeFailure(f"writing {value!r} to {path}: {exc.strerror}") from None


def _int(section: dict[str, Any], key: str) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"resources: {key} must be an integer, not {value!r}")
    return value


def apply_resources(cgroup: cgroups.PodCgroup, resources: dict[str, Any]) -> None:
    """Write OCI `linux.resources` (memory, cpu, pids; `unified` on v2) into the container's cgroup."""
    if not isinstance(resources, dict):
        raise InvalidArgument("resources must be a JSON object (OCI LinuxResources)")
    dirs = _dirs(cgroup)
    memory = resources.get("memory") or {}
    cpu = resources.get("cpu") or {}
    pids = resources.get("pids") or {}
    if "" in dirs:
        _apply_v2(dirs[""], memory, cpu, pids, resources.get("unified") or {})
    else:
        _apply_v1(dirs, memory, cpu, pids)


def _apply_v1(dirs: dict[str, Path], memory: dict, cpu: dict, pids: dict) -> None:
    mem = dirs.get("memory")
    if mem is not None:
        limit, swap = _int(memory, "limit"), _int(memory, "swap")
        if limit is not None and swap is not None:
            # memsw must stay >= limit at every step: the order depends on the direction of change.
            try:
                _write(mem / "memory.limit_in_bytes", limit)
                _write(mem / "memory.memsw.limit_in_bytes", swap)
            except RuntimeFailure:
                _write(mem / "memory.memsw.limit_in_bytes", swap)
                _write(mem / "memory.limit_in_bytes", limit)
        elif limit is not None:
            _write(mem / "memory.limit_in_bytes", limit)
        reservation = _int(memory, "reservation")
        if reservation is not None:
            _write(mem / "memory.soft_limit_in_bytes", reservation)
    cpu_dir = dirs.get("cpu")
    if cpu_dir is not None:
        if (shares := _int(cpu, "shares")) is not None and shares > 0:
            _write(cpu_dir / "cpu.shares", shares)
        if (period := _int(cpu, "period")) is not None and period > 0:
            _write(cpu_dir / "cpu.cfs_period_us", period)
        if (quota := _int(cpu, "quota")) is not None and quota != 0:
            _write(cpu_dir / "cpu.cfs_quota_us", quota)
    cpuset = dirs.get("cpuset")
    if cpuset is not None:
        for key in ("cpus", "mems"):
            if cpu.get(key):
                _write(cpuset / f"cpuset.{key}", cpu[key])
    pids_dir = dirs.get("pids")
    if pids_dir is not None and (limit := _int(pids, "limit")) is not None and limit != 0:
        _write(pids_dir / "pids.max", "max" if limit < 0 else limit)


def _apply_v2(directory: Path, memory: dict, cpu: dict, pids: dict, unified: dict) -> None:
    limit, swap = _int(memory, "limit"), _int(memory, "swap")
    if limit is not None and limit != 0:
        _write(directory / "memory.max", "max" if limit < 0 else limit)
    if swap is not None and swap != 0:
        # OCI's swap is memory+swap; cgroup v2 limits swap alone.
        _write(directory / "memory.swap.max", "max" if swap < 0 or limit is None or limit < 0
               else max(swap - limit, 0))
    if (reservation := _int(memory, "reservation")) is not None and reservation > 0:
        _write(directory / "memory.low", reservation)
    if (shares := _int(cpu, "shares")) is not None and shares > 0:
        # runc's conversion of cgroup v1 shares [2, 262144] to v2 weight [1, 10000].
        _write(directory / "cpu.weight", 1 + ((min(max(shares, 2), 262144) - 2) * 9999) // 262142)
    quota, period = _int(cpu, "quota"), _int(cpu, "period")
    if quota is not None or period is not None:
        quota_text = "max" if quota is None or quota <= 0 else str(quota)
        _write(directory / "cpu.max", f"{quota_text} {period if period and period > 0 else 100000}")
    for key in ("cpus", "mems"):
        if cpu.get(key):
            _write(directory / f"cpuset.{key}", cpu[key])
    if (limit := _int(pids, "limit")) is not None and limit != 0:
        _write(directory / "pids.max", "max" if limit < 0 else limit)
    for key, value in unified.items():
        if "/" in key or key.startswith("."):
            raise InvalidArgument(f"resources.unified: {key!r} is not a cgroup file name")
        _write(directory / key, value)


def _freezer(cgroup: cgroups.PodCgroup | None, frozen: bool) -> tuple[Path, str, Path | None]:
    """(knob, value to write, v2 cgroup.events or None on v1) that freeze or thaw the container."""
    if cgroup is None:
        raise FailedPrecondition("container has no cgroup to freeze")
    dirs = _dirs(cgroup)
    if "" in dirs:
        return dirs[""] / "cgroup.freeze", "1" if frozen else "0", dirs[""] / "cgroup.events"
    if "freezer" in dirs:
        return dirs["freezer"] / "freezer.state", "FROZEN" if frozen else "THAWED", None
    raise FailedPrecondition("no freezer controller on this host")


async def freeze(cgroup: cgroups.PodCgroup | None, frozen: bool) -> None:
    """Freeze (Pause) or thaw (Resume) every process of the container through its cgroup."""
    knob, want, events = _freezer(cgroup, frozen)
    try:
        _write(knob, want)
        await _settle(knob, want, events, frozen)
    except BaseException:
        if frozen:
            # A Pause that fails, times out or is cancelled leaves the container running as far as its
            # State goes: its cgroup must not stay frozen (or freezing) behind that.
            thaw_now(cgroup)
        raise


async def _settle(knob: Path, want: str, events: Path | None, frozen: bool) -> None:
    """Wait until the freezer reports `want` for every process."""
    deadline = time.monotonic() + FREEZE_TIMEOUT
    while True:
        try:
            if events is None:
                done = knob.read_text().strip() == want
            else:
                done = f"frozen {want}" in events.read_text()
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise FailedPrecondition("container cgroup is gone") from None
            raise
        if done:
            return
        if time.monotonic() > deadline:
            raise RuntimeFailure(f"cgroup {knob.parent} did not reach {want} within {FREEZE_TIMEOUT} s")
        if events is None and frozen:
            _write(knob, want)  # v1 may fall back to THAWED if a task was busy; ask again
        await asyncio.sleep(0.01)


def thaw_now(cgroup: cgroups.PodCgroup | None) -> None:
    """Thaw without waiting for the freezer, on the way out of a Pause that did not happen (the error
    being raised is what the caller hears; a thaw that fails too is only logged)."""
    knob, want, _ = _freezer(cgroup, False)
    try:
        _write(knob, want)
    except RuntimeFailure as exc:
        log.warning("thawing after a failed freeze: %s", exc.message)
