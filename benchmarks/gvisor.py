"""gVisor (quark-sandboxer, runsc backend): pod + container start next to runc-sandboxer and the stock path,
and the management PSS per pod.

Runs in the same containerd as the runc phases (handler ``kuasar-gvisor``, proxy plugin ``gvisor``), with
the same busybox ``sleep`` pod on the host network. Start = just before RunPodSandbox until
StartContainer returned, the three handlers alternating round by round. Memory: with N gVisor pods
running, the PSS of every runsc process on quark-sandboxer's runsc root (the ``runsc boot`` sandbox, the
gofers, the ``runsc wait`` per container, anything else), plus quark-sandboxer and its task server. The
systrap stub processes (children of the sandbox, which hold the application's address spaces) are reported
apart and left out of the management total, like the workloads on the runc paths.
"""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import psutil

from kuasar.common.cri_client import CriClient
from tests.integration.test_gvisor_cri import runsc_binary

from .memory import Usage
from .pods import Pod, start_pod, teardown
from .stack import GVISOR, OURS, STOCK, Stack
from .startup import SERIAL_KEYS, record_start

HANDLERS = {"stock": STOCK, "ours": OURS, "gvisor": GVISOR}
START_KEYS = SERIAL_KEYS


def skip_reason() -> str | None:
    if runsc_binary() is None:
        return "gVisor's runsc is not installed (`make setup` installs it into .prefix/bin)"
    return None


def _version() -> str:
    try:
        out = subprocess.run([runsc(), "--version"], capture_output=True, text=True, timeout=20, check=False).stdout
    except OSError:
        return "?"
    return out.split("\n", 1)[0].removeprefix("runsc version ").strip() or "?"


def runsc() -> str:
    path = runsc_binary()
    assert path is not None
    return path


async def start_phase(client: CriClient, stack: Stack, runs: int, warmup: int, gap: float) -> dict[str, Any]:
    """`warmup` unrecorded rounds, then `runs` rounds of start + teardown of one pod per handler; the
    handler that goes first rotates from round to round."""
    results: dict[str, Any] = {label: {key: [] for key in (*START_KEYS, "teardown_errors")} for label in HANDLERS}
    items = list(HANDLERS.items())
    for i in range(-warmup, runs):
        k = i % len(items)
        for label, handler in items[k:] + items[:k]:
            pod = await start_pod(client, handler, f"gv-{label}-{i + warmup}", stack.log_dir, stack.pod_cgroup_parent)
            down = await teardown(client, pod, results[label]["teardown_errors"])
            if i >= 0:
                record_start(results[label], pod, down)
            await asyncio.sleep(gap)
    return results


def _runsc_parts(root: str) -> dict[str, Usage]:
    """The runsc processes working on `root`: `runsc boot` (sandbox), gofers, `runsc wait` and anything else;
    the systrap stubs (children of a sandbox, no command line) apart."""
    parts = {name: Usage() for name in ("runsc_sandbox", "runsc_gofer", "runsc_wait", "runsc_other", "systrap_stubs")}
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE or not cmdline or "runsc" not in cmdline[0]:
            continue
        if f"--root={root}" not in cmdline and root not in cmdline:
            continue
        if "boot" in cmdline:
            parts["runsc_sandbox"].add(proc.pid)
            try:
                for stub in proc.children(recursive=True):
                    parts["systrap_stubs"].add(stub.pid)
            except psutil.NoSuchProcess:
                pass
        else:
            part = "runsc_gofer" if "gofer" in cmdline else "runsc_wait" if "wait" in cmdline else "runsc_other"
            parts[part].add(proc.pid)
    return parts


def sample(stack: Stack, pods: int) -> dict[str, Any]:
    gv = stack.gvisor
    assert gv is not None
    server = gv.task_server_pid()
    parts = {"sandboxer": Usage(), "task_server": Usage()}
    parts["sandboxer"].add(gv.proc.pid)
    if server:
        parts["task_server"].add(server)
    parts.update(_runsc_parts(str(gv.directory / "runsc")))
    management = Usage()
    for name, usage in parts.items():
        if name == "systrap_stubs":  # the application's address spaces: reported, not management
            continue
        management.pss_kb += usage.pss_kb
        management.rss_kb += usage.rss_kb
        management.processes += usage.processes
    return {"pods": pods, "management": vars(management), "parts": {k: vars(v) for k, v in parts.items()}}


async def memory_phase(client: CriClient, stack: Stack, levels: list[int], settle: float,
                       errors: list[str]) -> list[dict[str, Any]]:
    rows = [sample(stack, 0)]
    pods: list[Pod] = []
    try:
        for level in sorted(set(levels)):
            while len(pods) < level:
                base = len(pods)
                batch = min(5, level - base)
                pods += await asyncio.gather(*(start_pod(client, GVISOR, f"gv-mem-{base + k}", stack.log_dir,
                                                         stack.pod_cgroup_parent)
                                               for k in range(batch)))
            await asyncio.sleep(settle)
            rows.append(sample(stack, len(pods)))
    finally:
        for pod in pods:
            await teardown(client, pod, errors)
    return rows


async def gvisor_phase(client: CriClient, stack: Stack, runs: int, warmup: int, gap: float, levels: list[int],
                       settle: float) -> dict[str, Any]:
    start = await start_phase(client, stack, runs, warmup, gap)
    errors: list[str] = []
    memory = await memory_phase(client, stack, levels, settle, errors)
    return {"runsc": runsc(), "runsc_version": _version(), "platform": "systrap", "start": start, "memory": memory,
            "memory_teardown_errors": errors}
