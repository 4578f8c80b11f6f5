"""The report's sections for wasm, VM and gVisor (each: its table, or why it was skipped or failed)."""

from __future__ import annotations

import math
from typing import Any

from .stats import ratio

GVISOR_LABELS = {"stock": "stock (`runc`, podsandbox + shim)", "ours": "ours (`kuasar-runc`, runc-sandboxer)",
                 "gvisor": "gVisor (`kuasar-gvisor`, quark-sandboxer + runsc)"}


def _n(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    line = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    return [line(header), line(["---"] * len(header)), *(line(r) for r in rows), ""]


def _stats(s: dict[str, float], digits: int = 1) -> list[str]:
    return [_n(s["min"], digits), _n(s["p50"], digits), _n(s["p90"], digits), _n(s["max"], digits), str(s["n"])]


def _not_run(title: str, state: dict[str, Any]) -> list[str] | None:
    if "skipped" in state:
        return [title, "", f"Skipped: {state['skipped']}.", ""]
    if "failed" in state:
        return [title, "", f"FAILED: `{state['failed'][:600]}`", ""]
    return None


def render(results: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    sections = summary.get("sections", {})
    return [*_wasm(results.get("wasm", {}), sections.get("wasm")), *_vm(results.get("vm", {}), sections.get("vm")),
            *_gvisor(results.get("gvisor", {}), sections.get("gvisor"))]


def _wasm(state: dict[str, Any], rows: list[dict[str, Any]] | None) -> list[str]:
    title = "## wasm container start (wasm-sandboxer), cold and cached module, next to runc"
    skipped = _not_run(title, state)
    if skipped is not None or rows is None:
        return skipped or []
    out = [title, "",
           f"Own private containerd with runc-sandboxer (`kuasar-runc`) and wasm-sandboxer (`kuasar-wasm`), "
           f"{state['runs']} sample(s) per row (`benchmarks/wasm_start.py`, run in {state['duration_s']:.0f} s). "
           "Each sample: CreateContainer + StartContainer of a container that prints a line and exits, in an "
           "already running pod of that sandboxer; `created -> exited` runs from CreateContainer sent until the "
           "process exited. cold = wasm-sandboxer's compiled-module cache emptied first; cached = right after "
           "a cold run, the module is deserialized instead of compiled. ms.", ""]
    runc = next((r for r in rows if r["sandboxer"] == "runc"), None)
    table = []
    for r in rows:
        rel = ratio(r["start_ms"]["p50"], runc["start_ms"]["p50"]) if runc else math.nan
        table.append([r["label"], r["sandboxer"], r["cache"], *_stats(r["start_ms"])[:4], _n(r["exit_ms"]["p50"]),
                      _n(rel, 2), str(r["start_ms"]["n"])])
    out += _table(["workload", "sandboxer", "module cache", "start min", "start p50", "start p90", "start max",
                   "created -> exited p50", "start p50 / runc", "n"], table)
    memory = state.get("working_set_bytes") or {}
    if memory:
        out += _table(["running container", "working set (cgroup)"],
                      [[name, f"{value / (1 << 20):.1f} MiB"] for name, value in memory.items()])
    return out


def _vm(state: dict[str, Any], s: dict[str, Any] | None) -> list[str]:
    title = "## VM pod ready (vmm-sandboxer) against a bare boot of the same kernel"
    skipped = _not_run(title, state)
    if skipped is not None or s is None:
        return skipped or []
    out = [title, "",
           f"Own private containerd with vmm-sandboxer (`kuasar-vmm`), accelerator **{state['accel'].upper()}**, "
           f"{state['runs']} round(s) after {state['warmup']} warm-up round(s), the two alternating "
           f"(`benchmarks/vm_ready.py`, run in {state['duration_s']:.0f} s). bare boot = QEMU with the "
           "sandboxer's own settings, kernel and initramfs but `rdinit=/bin/sh` and no devices, from spawn to "
           "a shell answering on the serial console; pod ready = RunPodSandbox of a CNI-networked pod (netns, "
           "taps, vhost-device-vsock, QEMU, the guest agent's READY, SetupSandbox). Seconds.", ""]
    rows = [("bare boot (QEMU spawn -> shell on the serial console)", "bare_s"),
            ("VM pod ready (RunPodSandbox through CRI)", "pod_s"),
            ("... of which: host side until QEMU runs (netns, taps, vsock, QMP, proxy)", "launch_s"),
            ("... of which: QEMU running -> agent READY", "ready_s"),
            ("pod ready - bare boot (same round)", "gap_s")]
    out += _table(["measurement", "min", "p50", "p90", "max", "n"], [[t, *_stats(s[k], 2)] for t, k in rows])
    out += [f"Pod ready / bare boot, p50: {_n(s['pod_over_bare_p50'], 2)} x.", ""]
    return out


def _gvisor(state: dict[str, Any], s: dict[str, Any] | None) -> list[str]:
    title = "## gVisor (quark-sandboxer, runsc backend) next to runc-sandboxer and the stock path"
    skipped = _not_run(title, state)
    if skipped is not None or s is None:
        return skipped or []
    n = s["start"]["gvisor"]["total_ms"]["n"]
    out = [title, "",
           "Same containerd as the runc comparison, handler `kuasar-gvisor` (runsc "
           f"{state.get('runsc_version', '?')}, platform {state['platform']}); {n} round(s) of one pod per "
           "handler, the handler that goes first rotating. "
           "Start = just before RunPodSandbox until StartContainer returned (busybox `sleep`, host network), ms.",
           ""]
    rows = []
    for label, title_ in GVISOR_LABELS.items():
        st = s["start"][label]
        rows.append([title_, *_stats(st["total_ms"])[:4], _n(st["run_pod_ms"]["p50"]), _n(st["create_ms"]["p50"]),
                     _n(st["start_ms"]["p50"]), _n(st["teardown_ms"]["p50"])])
    out += _table(["path", "min", "p50", "p90", "max", "RunPodSandbox p50", "CreateContainer p50",
                   "StartContainer p50", "teardown p50"], rows)
    r = s["ratios"]
    out += [f"gVisor / stock p50: {_n(r['gvisor_over_stock_p50'], 2)} x; gVisor / ours p50: "
            f"{_n(r['gvisor_over_ours_p50'], 2)} x.", ""]
    out += ["Management PSS (KB) with N gVisor pods: quark-sandboxer + its task server + every runsc process on "
            "its runsc root (`runsc boot` = the pod's sandbox, i.e. its application kernel; `runsc gofer`; the "
            "`runsc wait` per container; anything else). The systrap stubs (children of the sandbox holding the "
            "application's address spaces) are shown apart and not counted, like the workloads on the runc "
            "paths.", ""]
    parts = ("sandboxer", "task_server", "runsc_sandbox", "runsc_gofer", "runsc_wait", "runsc_other",
             "systrap_stubs")
    rows = []
    for row in state["memory"]:
        pods = row["pods"]
        rows.append([str(pods), *(f"{row['parts'][p]['pss_kb']} ({row['parts'][p]['processes']})" for p in parts),
                     str(row["management"]["pss_kb"]),
                     _n(row["management"]["pss_kb"] / pods if pods else math.nan, 0)])
    out += _table(["pods", "sandboxer", "task server", "runsc sandbox", "runsc gofer", "runsc wait", "runsc other",
                   "(systrap stubs)", "total", "total per pod"], rows)
    out += ["(processes in brackets)", ""]
    mem = s.get("memory") or {}
    if mem:
        out += [f"At {mem['pods']} pod(s): runsc processes {_n(mem['runsc_kb_per_pod'], 0)} KB PSS per pod "
                f"(+ {_n(mem['stubs_kb_per_pod'], 0)} KB of systrap stubs); all management "
                f"{_n(mem['management_kb_per_pod'], 0)} KB per pod including the fixed sandboxer and task server; "
                f"slope over the loaded levels {_n(mem['slope_kb_per_pod'], 0)} KB per extra pod (the runc "
                "paths' figures are in the management memory table above, when it ran).", ""]
    errors = state.get("memory_teardown_errors", []) + [e for st in state["start"].values()
                                                         for e in st.get("teardown_errors", [])]
    if errors:
        out += [f"StopContainer failures (recovered): {len(errors)}", "", *(f"- {e}" for e in errors[:5]), ""]
    return out
