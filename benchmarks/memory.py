"""PSS of the management processes of each path as pods accumulate (from /proc/<pid>/smaps_rollup).

stock: every ``containerd-shim-runc-v2`` of this containerd (``-address`` names its socket) plus every
pause process (the sandbox pid containerd reports). ours: the runc-sandboxer process, its task server
and the task server's ``pod-*`` children. Container workloads are excluded on both sides; containerd's
own PSS is reported separately.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict, dataclass, field

import psutil

from kuasar.common.cri_client import CriClient
from tests.support.procs import live_children

from .pods import Pod, start_pod, teardown
from .stack import HANDLERS, Stack

# Pods started at once while filling up to the next level (only the totals are measured here).
FILL_BATCH = 5


@dataclass
class Usage:
    pss_kb: int = 0
    rss_kb: int = 0
    processes: int = 0

    def add(self, pid: int) -> None:
        pss, rss = read_smaps_rollup(pid)
        if pss or rss:
            self.pss_kb += pss
            self.rss_kb += rss
            self.processes += 1


@dataclass
class Sample:
    pods: int
    management: Usage
    parts: dict[str, Usage] = field(default_factory=dict)
    containerd: Usage = field(default_factory=Usage)
    workloads: Usage = field(default_factory=Usage)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def read_smaps_rollup(pid: int) -> tuple[int, int]:
    """(Pss, Rss) in kB of one process, (0, 0) if it is gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0, 0
    return pss, rss


def shim_pids(address: str) -> list[int]:
    """containerd-shim-runc-v2 processes started by the containerd listening on `address`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info["cmdline"] or []
        if not args or "containerd-shim-runc-v2" not in os.path.basename(args[0]) or "-address" not in args:
            continue
        i = args.index("-address")
        if i + 1 < len(args) and args[i + 1] in (address, f"unix://{address}"):
            found.append(proc.pid)
    return found


def pod_process_pids(task_server: int | None) -> list[int]:
    return [] if task_server is None else [proc.pid for proc in live_children(task_server, "pod-")]


def _info_pid(response: object) -> int:
    info = getattr(response, "info", {}).get("info", "")
    try:
        return int(json.loads(info).get("pid", 0)) if info.startswith("{") else 0
    except ValueError:
        return 0


async def sandbox_pid(client: CriClient, pod: Pod) -> int:
    """The pause process of a stock pod (containerd's verbose status); 0 when none is reported."""
    return _info_pid(await client.pod_sandbox_status(pod.pod_id, verbose=True))


async def container_pid(client: CriClient, pod: Pod) -> int:
    return _info_pid(await client.container_status(pod.container_id, verbose=True))


def _usage(pids: list[int]) -> Usage:
    usage = Usage()
    for pid in pids:
        usage.add(pid)
    return usage


async def sample(client: CriClient, stack: Stack, label: str, pods: list[Pod]) -> Sample:
    workloads = [await container_pid(client, pod) for pod in pods]
    if label == "stock":
        pauses = [await sandbox_pid(client, pod) for pod in pods]
        parts = {"shims": _usage(shim_pids(stack.address)), "pause": _usage([p for p in pauses if p])}
    else:
        server = stack.task_server_pid()
        parts = {"sandboxer": _usage([stack.sandboxer.pid]), "task_server": _usage([server] if server else []),
                 "pod_processes": _usage(pod_process_pids(server))}
    management = Usage()
    for part in parts.values():
        management.pss_kb += part.pss_kb
        management.rss_kb += part.rss_kb
        management.processes += part.processes
    containerd = _usage([stack.containerd.pid] if stack.containerd.pid else [])
    return Sample(len(pods), management, parts, containerd, _usage([p for p in workloads if p]))


async def _fill(client: CriClient, stack: Stack, handler: str, label: str, pods: list[Pod], level: int) -> None:
    while len(pods) < level:
        batch = min(FILL_BATCH, level - len(pods))
        base = len(pods)
        pods += await asyncio.gather(*(start_pod(client, handler, f"mem-{label}-{base + k}", stack.log_dir,
                                                 stack.pod_cgroup_parent)
                                       for k in range(batch)))


async def _drain(client: CriClient, pods: list[Pod], errors: list[str]) -> None:
    while pods:
        batch, pods[:] = pods[:FILL_BATCH], pods[FILL_BATCH:]
        await asyncio.gather(*(teardown(client, pod, errors) for pod in batch))


async def memory_phase(client: CriClient, stack: Stack, levels: list[int], settle: float,
                       order: list[str], errors: list[str]) -> dict[str, list[dict[str, object]]]:
    """For each path in `order`: grow to every level, let it settle, sample, then remove all pods
    (teardown errors, retried, are appended to `errors`)."""
    results: dict[str, list[dict[str, object]]] = {}
    for label in order:
        handler = HANDLERS[label]
        pods: list[Pod] = []
        rows = [(await sample(client, stack, label, pods)).to_json()]
        try:
            for level in sorted(set(levels)):
                await _fill(client, stack, handler, label, pods, level)
                await asyncio.sleep(settle)
                rows.append((await sample(client, stack, label, pods)).to_json())
        finally:
            await _drain(client, pods, errors)
        results[label] = rows
        await asyncio.sleep(settle)
    return results
