"""The sections of `make bench` besides runc (wasm, VM, gVisor): selection, skip reasons, the two sections
that need their own containerd (wasm, VM), and their summaries.

Each section's results are either its samples or ``{"skipped": reason}``; the report states the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import gvisor, vm_ready, wasm_start
from .stats import ratio, slope, summarize

SECTIONS = ("runc", "wasm", "vm", "gvisor")
RUNSC_PARTS = ("runsc_sandbox", "runsc_gofer", "runsc_wait", "runsc_other")
NOT_SELECTED = "not selected (--only / --skip)"


def selected(args: argparse.Namespace) -> list[str]:
    chosen = list(SECTIONS) if not args.only else args.only
    return [name for name in chosen if name not in (args.skip or [])]


def section_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return names


def skip_reasons(args: argparse.Namespace) -> dict[str, str | None]:
    """None for each section that runs, else why not."""
    chosen = selected(args)
    checks = {"runc": lambda: None, "wasm": wasm_start.skip_reason, "vm": vm_ready.skip_reason,
              "gvisor": gvisor.skip_reason}
    return {name: (checks[name]() if name in chosen else NOT_SELECTED) for name in SECTIONS}


def run_wasm(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    series, memory, sizes = wasm_start.run_measurement(
        args.wasm_runs, bridge=f"{args.bridge[:13]}w", subnet=args.subnet, with_memory=not args.smoke,
        keep_logs=log_dir)
    return {"runs": args.wasm_runs, "series": [asdict(s) for s in series], "working_set_bytes": memory,
            "module_bytes": sizes, "duration_s": time.monotonic() - t0}


def run_vm(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="kuasar-bench-vm-"))
    short = Path(f"/run/kvb-{secrets.token_hex(2)}")
    short.mkdir(mode=0o700)
    image = vm_ready.built_image()
    assert image is not None
    try:
        raw = asyncio.run(vm_ready.measure(argparse.Namespace(runs=args.vm_runs, config=None), base, short,
                                           image=image, warmup=args.vm_warmup, bridge=f"{args.bridge[:13]}v",
                                           subnet=args.subnet, verbose=False))
    finally:
        shutil.rmtree(short, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    accel = "kvm" if raw.pop("accel", [0.0])[0] else "tcg"
    return {"runs": args.vm_runs, "warmup": args.vm_warmup, "accel": accel, "kernel": image[0],
            "initramfs": image[1], "bare_s": raw["bare"], "pod_s": raw["pod"], "launch_s": raw["launch"],
            "ready_s": raw["ready"], "duration_s": time.monotonic() - t0}


def summarize_sections(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    wasm = results.get("wasm", {})
    if "series" in wasm:
        out["wasm"] = [{"label": s["label"], "sandboxer": s["sandboxer"], "cache": s["cache"],
                        "start_ms": summarize(s["start_ms"]), "exit_ms": summarize(s["exit_ms"])}
                       for s in wasm["series"]]
    vm = results.get("vm", {})
    if "pod_s" in vm:
        gap = [p - b for p, b in zip(vm["pod_s"], vm["bare_s"], strict=True)]
        out["vm"] = {key: summarize(vm[key]) for key in ("bare_s", "pod_s", "launch_s", "ready_s")}
        out["vm"]["gap_s"] = summarize(gap)
        out["vm"]["pod_over_bare_p50"] = ratio(out["vm"]["pod_s"]["p50"], out["vm"]["bare_s"]["p50"])
    gv = results.get("gvisor", {})
    if "start" in gv:
        start = {label: {key: summarize(row[key]) for key in gvisor.START_KEYS} for label, row in gv["start"].items()}
        loaded = [r for r in gv["memory"] if r["pods"] > 0]
        top = loaded[-1] if loaded else None
        per_pod = {}
        if top is not None:
            runsc_kb = sum(top["parts"][k]["pss_kb"] for k in RUNSC_PARTS)
            per_pod = {"pods": top["pods"], "runsc_kb_per_pod": runsc_kb / top["pods"],
                       "management_kb_per_pod": top["management"]["pss_kb"] / top["pods"],
                       "stubs_kb_per_pod": top["parts"]["systrap_stubs"]["pss_kb"] / top["pods"],
                       "slope_kb_per_pod": slope([r["pods"] for r in loaded],
                                                 [r["management"]["pss_kb"] for r in loaded])}
        out["gvisor"] = {"start": start, "memory": per_pod,
                         "ratios": {"gvisor_over_stock_p50": ratio(start["gvisor"]["total_ms"]["p50"],
                                                                   start["stock"]["total_ms"]["p50"]),
                                    "gvisor_over_ours_p50": ratio(start["gvisor"]["total_ms"]["p50"],
                                                                  start["ours"]["total_ms"]["p50"])}}
    return out
