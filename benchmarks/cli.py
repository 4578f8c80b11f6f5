"""`make bench` / `make bench-smoke`: run every phase against both paths and write JSON, Markdown, PNGs."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from kuasar.common.cri_client import CriClient
from tests.support import containerd as cd

from . import attribution, plots, report, sections
from .floor import InterleavedFloor, run_floor
from .gvisor import gvisor_phase
from .memory import memory_phase
from .pods import remove_all
from .stack import Stack, start_stack, stop_stack
from .startup import parallel_phase, serial_phase
from .summary import summarize_run

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results"
SMOKE_OUT = DEFAULT_OUT / "smoke"
# RPC deadline: 50 stock pods started at once on 2 cores take several seconds each.
CRI_TIMEOUT = 180.0
FULL = {"serial": 100, "parallel": [10, 30, 50], "memory": [1, 5, 10, 20, 30, 50, 100], "floor": 100,
        "rounds": 3, "warmup": 2, "settle": 2.0, "gap": 0.1,
        "wasm_runs": 7, "vm_runs": 3, "vm_warmup": 1, "gvisor_runs": 20, "gvisor_memory": [1, 5, 10]}
SMOKE = {"serial": 3, "parallel": [3], "memory": [1, 3], "floor": 3, "rounds": 1, "warmup": 1,
         "settle": 0.5, "gap": 0.02,
         "wasm_runs": 1, "vm_runs": 1, "vm_warmup": 0, "gvisor_runs": 1, "gvisor_memory": [1]}
PUBLISHED = ("report.md", "results.json", *(name for name, _ in report.PLOTS))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--smoke", action="store_true", help="short CI mode: " + json.dumps(SMOKE))
    p.add_argument("--serial", type=int, help=f"pods per path in the serial phase (default {FULL['serial']})")
    p.add_argument("--parallel", type=_ints, help="comma-separated round sizes (default 10,30,50)")
    p.add_argument("--rounds", type=int, help="rounds per parallel size and path (default 3)")
    p.add_argument("--memory", type=_ints, help="comma-separated pod counts (default 1,5,10,20,30,50,100)")
    p.add_argument("--floor", type=int, help=f"raw runc runs (default {FULL['floor']})")
    p.add_argument("--warmup", type=int, help="unrecorded rounds before the serial phase and the floor")
    p.add_argument("--settle", type=float, help="seconds to let things settle before memory samples")
    p.add_argument("--gap", type=float, help="seconds between serial pods")
    p.add_argument("--only", type=sections.section_list, default=None,
                   help=f"comma-separated sections to run, of {','.join(sections.SECTIONS)} (default: all); "
                        "runc = floor, serial, parallel and memory of runc-sandboxer against the stock path")
    p.add_argument("--skip", type=sections.section_list, default=None,
                   help="comma-separated sections to leave out, e.g. --skip vm")
    p.add_argument("--wasm-runs", type=int, help="samples per wasm row (default 7)")
    p.add_argument("--vm-runs", type=int, help="rounds of bare boot + VM pod ready (default 3; TCG is slow)")
    p.add_argument("--vm-warmup", type=int, help="unrecorded VM rounds first (default 1)")
    p.add_argument("--gvisor-runs", type=int, help="rounds of gVisor / ours / stock pod start (default 20)")
    p.add_argument("--gvisor-memory", type=_ints, help="comma-separated gVisor pod counts (default 1,5,10)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default benchmarks/results, benchmarks/results/smoke with --smoke)")
    p.add_argument("--publish", type=Path, default=None,
                   help="also copy report.md, results.json and the PNGs here (e.g. benchmarks/latest)")
    p.add_argument("--pod-cgroup-parent", default="",
                   help="give every pod the CRI cgroup parent <this>/pod<uid>, made before RunPodSandbox "
                        "and removed after teardown (untimed), as kubelet does (e.g. kubepods-bench); "
                        "default: none")
    p.add_argument("--bridge", default=None, help="CNI bridge name of the private containerd (<= 15 chars)")
    p.add_argument("--subnet", default=None, help="CNI subnet of the private containerd")
    args = p.parse_args(argv)
    if ".." in args.pod_cgroup_parent.split("/") or args.pod_cgroup_parent.endswith(".slice"):
        p.error("--pod-cgroup-parent: a cgroupfs path without '..' (systemd slices are not supported here)")
    defaults = SMOKE if args.smoke else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or (SMOKE_OUT if args.smoke else DEFAULT_OUT)
    args.bridge = args.bridge or ("kuasar-bs0" if args.smoke else "kuasar-bn0")
    args.subnet = args.subnet or ("10.252.0.0/16" if args.smoke else "10.251.0.0/16")
    return args


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False).stdout
    except OSError:
        return "?"
    return out.split("\n", 1)[0].strip()


def _other_containerds() -> int:
    count = 0
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "containerd":
            count += 1
    return count


def machine_meta(args: argparse.Namespace) -> dict[str, Any]:
    cgroup = "v2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "v1"
    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "mode": "smoke" if args.smoke else "full",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "containerd": cd.containerd_version() or "?",
        "runc": _version(["runc", "--version"]).removeprefix("runc version "),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count() or 0,
        "memory_gb": psutil.virtual_memory().total / 2**30,
        "cgroup": cgroup,
        "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "other_containerd": _other_containerds(),
        "notes": [f"every pod has the CRI cgroup parent `{args.pod_cgroup_parent}/pod<uid>`, made before "
                  "RunPodSandbox and removed after teardown, untimed, as kubelet does (`--pod-cgroup-parent`)"]
                 if args.pod_cgroup_parent else [],
    }


async def cri_phases(stack: Stack, args: argparse.Namespace, timings: dict[str, float],
                     runc: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with CriClient(stack.address, timeout=CRI_TIMEOUT) as client:
        try:
            if runc:
                await _runc_phases(client, stack, args, timings, results)
            if stack.gvisor is not None:
                t0 = time.monotonic()
                try:
                    results["gvisor"] = await gvisor_phase(client, stack, args.gvisor_runs, args.warmup,
                                                           args.gap, args.gvisor_memory, args.settle)
                except Exception as exc:  # noqa: BLE001 - reported, and the run exits non-zero
                    results["gvisor"] = {"failed": repr(exc)[:2000]}
                timings["gvisor_s"] = time.monotonic() - t0
        finally:
            results["pods_left"] = await remove_all(client)
    return results


async def _runc_phases(client: CriClient, stack: Stack, args: argparse.Namespace, timings: dict[str, float],
                       results: dict[str, Any]) -> None:
    t0 = time.monotonic()
    floor = InterleavedFloor()
    try:
        await floor.start(args.warmup)
        results["serial"] = await serial_phase(client, stack, args.serial, args.warmup, args.gap, floor)
    finally:
        await floor.close()
    results["floor_interleaved"] = floor.times
    timings["serial_s"] = time.monotonic() - t0
    results["attribution"] = attribution.attribute(results["serial"]["ours"].get("marks_ns", []),
                                                   attribution.load(stack.timing_dir))
    t0 = time.monotonic()
    results["parallel"] = await parallel_phase(client, stack, args.parallel, args.rounds, args.settle)
    timings["parallel_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    results["memory_teardown_errors"] = []
    results["memory"] = await memory_phase(client, stack, args.memory, args.settle, ["stock", "ours"],
                                           results["memory_teardown_errors"])
    timings["memory_s"] = time.monotonic() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    meta = machine_meta(args)
    timings: dict[str, float] = {}
    skipped = sections.skip_reasons(args)
    meta["sections"] = {name: ("run" if reason is None else f"skipped: {reason}") for name, reason in skipped.items()}
    results: dict[str, Any] = {}
    runc = skipped["runc"] is None
    if runc:
        t0 = time.monotonic()
        results["floor"] = run_floor(args.floor, args.warmup)
        timings["floor_s"] = time.monotonic() - t0
    if runc or skipped["gvisor"] is None:
        base = Path(tempfile.mkdtemp(prefix="kuasar-bench-"))
        stack = start_stack(base, args.bridge, args.subnet,
                            runsc=sections.gvisor.runsc() if skipped["gvisor"] is None else None,
                            pod_cgroup_parent=args.pod_cgroup_parent)
        try:
            results.update(asyncio.run(cri_phases(stack, args, timings, runc)))
        finally:
            cleanup = stop_stack(stack)
            _keep_logs(base, args.out / "logs")
            shutil.rmtree(base, ignore_errors=True)
        pods_left = results.pop("pods_left")
        results["cleanup"] = {**asdict(cleanup), "pods_left": pods_left}
    for name, section in (("wasm", lambda: sections.run_wasm(args, args.out / "logs")),
                          ("vm", lambda: sections.run_vm(args))):
        if skipped[name] is None:
            t0 = time.monotonic()
            try:
                results[name] = section()
            except Exception as exc:  # noqa: BLE001 - reported, and the run exits non-zero
                results[name] = {"failed": repr(exc)[:2000]}
            timings[f"{name}_s"] = time.monotonic() - t0
    for name in ("wasm", "vm", "gvisor"):
        if skipped[name] is not None:
            results[name] = {"skipped": skipped[name]}
    if not runc:
        results["runc_skipped"] = skipped["runc"]
    meta["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["duration_s"] = time.monotonic() - started
    meta["phase_s"] = timings
    results["meta"] = meta
    return results


def _keep_logs(base: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for src in (base / "containerd" / "containerd.log", base / "runc-sandboxer.log", base / "task-server.log",
                base / "gvisor-sandboxer.log", base / "gvisor-task-server.log"):
        if src.exists():
            shutil.copy(src, dest / src.name)


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_outputs(results: dict[str, Any], out: Path) -> dict[str, Any]:
    summary = summarize_run(results)
    out.mkdir(parents=True, exist_ok=True)
    document = {**results, "summary": summary}
    (out / "results.json").write_text(json.dumps(_clean(document), indent=1) + "\n")
    plots.write_all(results, summary, out)
    (out / "report.md").write_text(report.render(results, summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = cd.skip_reason()
    if reason:
        print(f"bench: cannot run: {reason}", file=sys.stderr)
        return 2
    results = run(args)
    summary = write_outputs(results, args.out)
    if args.publish is not None:
        args.publish.mkdir(parents=True, exist_ok=True)
        for name in PUBLISHED:
            if (args.out / name).exists():
                shutil.copy(args.out / name, args.publish / name)
    for target in summary["targets"]:
        print(f"bench: {'met    ' if target['met'] else 'NOT met'} {target['name']}: "
              f"{target['value']:.3f} (limit {target['limit']:.3f} {target['unit']})")
    failed = [name for name in ("wasm", "vm", "gvisor") if "failed" in results.get(name, {})]
    for name in ("wasm", "vm", "gvisor"):
        state = results.get(name, {})
        print(f"bench: section {name}: " + (f"FAILED: {state['failed'][:300]}" if "failed" in state else
                                             f"skipped: {state['skipped']}" if "skipped" in state else "done"))
    print(f"bench: wrote {args.out / 'results.json'}, {args.out / 'report.md'} and plots "
          f"in {results['meta']['duration_s']:.0f} s")
    return 1 if failed else 0
