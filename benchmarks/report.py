"""The Markdown report: run facts, targets, then one table per measurement (ms, KB, ours/stock)."""

from __future__ import annotations

import math
from typing import Any

from . import extra_report
from .stats import ratio
from .summary import pss_at

LABELS = {"stock": "stock (`runc`, podsandbox + shim)", "ours": "ours (`kuasar-runc`, runc-sandboxer)"}
PLOTS = [("serial_cdf.png", "Serial start, CDF"), ("parallel_cdf.png", "Parallel start, CDF"),
         ("pss.png", "Management PSS against pods"), ("serial_breakdown.png", "Serial start by CRI call (p50)")]


def _n(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows), ""]


def _stats_cells(s: dict[str, float]) -> list[str]:
    return [_n(s["min"]), _n(s["p50"]), _n(s["p90"]), _n(s["max"])]


def render(results: dict[str, Any], summary: dict[str, Any]) -> str:
    out: list[str] = ["# runc-sandboxer against containerd's stock runc path, plus wasm, VM and gVisor", ""]
    out += _meta(results["meta"])
    out += _sections(results["meta"])
    if "serial" in results:
        out += _targets(summary["targets"])
        out += _serial(results, summary)
        out += _parallel(summary)
        out += _memory(results, summary)
        out += _floor(summary)
        out += _errors(summary["teardown_errors"])
    else:
        out += ["## runc-sandboxer against the stock path", "", f"Skipped: {results.get('runc_skipped')}.", ""]
    out += extra_report.render(results, summary)
    if "cleanup" in results:
        out += _cleanup(results["cleanup"])
    if "serial" in results:
        out += ["## Plots", ""] + [f"![{title}]({name})" for name, title in PLOTS] + [""]
    return "\n".join(out)


def _sections(meta: dict[str, Any]) -> list[str]:
    states = meta.get("sections", {})
    if not states:
        return []
    return ["Sections (`--only` / `--skip`): " + "; ".join(f"**{name}** {state}" for name, state in states.items())
            + ".", ""]


def _meta(meta: dict[str, Any]) -> list[str]:
    lines = [f"Run of {meta['started']} ({meta['duration_s']:.0f} s), mode `{meta['mode']}`: one containerd "
             f"{meta['containerd']} serving both handlers, runc {meta['runc']}, Python {meta['python']}, "
             f"kernel {meta['kernel']}, {meta['cpus']} CPUs, {meta['memory_gb']:.0f} GB, cgroup {meta['cgroup']}.",
             "",
             f"Load average at start {meta['load_start']}, at the end {meta['load_end']}; other containerd "
             f"processes on the machine at start: {meta['other_containerd']} (their work competes for the "
             "same CPUs, so absolute numbers vary between runs; ratios come from this one run, with the "
             "two paths alternating).", "",
             "Every pod: host network, one busybox container running `sleep 3600`, through CRI from one "
             "long-lived asyncio client. Start = just before RunPodSandbox until StartContainer returned. "
             "Teardown = StopContainer (grace 0) + RemoveContainer + StopPodSandbox + RemovePodSandbox.", ""]
    for note in meta.get("notes", []):
        lines += [f"Note: {note}", ""]
    return lines


def _targets(targets: list[dict[str, Any]]) -> list[str]:
    rows = [[t["name"], f"{_n(t['value'], 3 if t['unit'] == 'x' else 1)} {t['unit']}",
             f"<= {_n(t['limit'], 3 if t['unit'] == 'x' else 1)} {t['unit']}", "met" if t["met"] else "NOT met",
             t.get("detail", "")] for t in targets]
    return ["## Targets", "", *_table(["target", "this run", "limit", "result", "detail"], rows)]


def _serial(results: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    serial = summary["serial"]
    n = serial["stock"]["total_ms"]["n"]
    out = [f"## Serial start ({n} pods per path, one at a time)", ""]
    if summary.get("floor_between"):
        out += ["Each round starts and tears down one pod per path and runs one round of the floor, in a "
                "rotation of six orders: each of the three comes first, second and last equally often and "
                "follows each of the three equally often, as what one leaves to the kernel slows the next.", ""]
    out += ["Start, ms:", ""]
    rows = [[LABELS[label], *_stats_cells(serial[label]["total_ms"])] for label in ("stock", "ours")]
    rows.append(["ours/stock", *(_n(ratio(serial["ours"]["total_ms"][k], serial["stock"]["total_ms"][k]), 3)
                                 for k in ("min", "p50", "p90", "max"))])
    out += _table(["path", "min", "p50", "p90", "max"], rows)
    out += ["By CRI call, p50 ms (p90 in brackets):", ""]
    keys = [("run_pod_ms", "RunPodSandbox"), ("create_ms", "CreateContainer"), ("start_ms", "StartContainer"),
            ("total_ms", "start total"), ("teardown_ms", "teardown")]
    rows = []
    for key, title in keys:
        s, o = serial["stock"][key], serial["ours"][key]
        rows.append([title, f"{_n(s['p50'])} ({_n(s['p90'])})", f"{_n(o['p50'])} ({_n(o['p90'])})",
                     _n(ratio(o["p50"], s["p50"]), 3)])
    return out + _table(["call", "stock", "ours", "ours/stock p50"], rows) + _attribution(results)


def _attribution(results: dict[str, Any]) -> list[str]:
    found = results.get("attribution")
    if not found or not found.get("pods"):
        return []
    out = ["### Where our serial start goes", "",
           f"Our daemons timed every request they answered and every runc command they ran "
           f"({found['intervals']} intervals); each of the {found['pods']} serial pods of ours is split by "
           "CRI call into the time runc ran, the time one of our daemons was answering (less runc), and "
           "the rest: containerd's own work and the benchmark client's gRPC (see benchmarks/attribution.py). "
           "p50 ms (p90 in brackets):", ""]
    rows = []
    for call, parts in found["calls"].items():
        rows.append([call, *(f"{_n(parts[part]['p50'])} ({_n(parts[part]['p90'])})"
                             for part in ("containerd", "ours", "runc"))])
    out += _table(["call", "containerd and client", "our daemons", "runc"], rows)
    without = found["without_ours_ms"]
    out += [f"A start less our daemons' time, i.e. what a sandboxer taking no time at all would leave: "
            f"p50 {_n(without['p50'])} ms (p90 {_n(without['p90'])}).", ""]
    return out + _requests(found.get("requests") or [])


def _requests(requests: list[dict[str, Any]]) -> list[str]:
    if not requests:
        return []
    out = ["Our daemons' requests and runc commands during those starts (`sandbox`: Sandbox API, `ttrpc`: "
           "Task API and pod service, `runc`: commands), largest share first. *Own* is a request's time "
           "less what ran nested inside it in another process (runc inside the Task API's Create, the pod "
           "service's Create inside the Sandbox API's Start); two of our processes may work at once, so own "
           "times can add up to more than our daemons' share above; ms:", ""]
    rows = [[row["kind"], row["method"], _n(row["per_start"], 1), _n(row["ms"]["p50"], 2),
             _n(row["own_ms"]["p50"], 2), _n(row["own_per_start_ms"], 2)] for row in requests]
    return out + _table(["kind", "request", "per start", "each, p50", "own, p50", "own per start (mean)"],
                        rows)


def _parallel(summary: dict[str, Any]) -> list[str]:
    rounds = max((p["rounds"] for per in summary["parallel"].values() for p in per.values()), default=0)
    out = ["## Parallel start (all pods of a round at once, `asyncio.gather`)", "",
           f"{rounds} round(s) per size and path, the paths alternating; per-pod start latency in ms, pooled "
           "over the rounds; wall = first RunPodSandbox until the last StartContainer returned, and "
           "teardown wall, both the median over the rounds.", ""]
    rows = []
    for size, per in summary["parallel"].items():
        for label in ("stock", "ours"):
            p = per[label]
            rows.append([size, label, *_stats_cells(p["latency_ms"]), _n(p["wall_ms"]), _n(p["teardown_wall_ms"]),
                         str(p["errors"])])
        rows.append([size, "ours/stock", *(_n(ratio(per["ours"]["latency_ms"][k], per["stock"]["latency_ms"][k]), 3)
                                           for k in ("min", "p50", "p90", "max")),
                     _n(ratio(per["ours"]["wall_ms"], per["stock"]["wall_ms"]), 3),
                     _n(ratio(per["ours"]["teardown_wall_ms"], per["stock"]["teardown_wall_ms"]), 3), ""])
    return out + _table(["pods", "path", "min", "p50", "p90", "max", "wall", "teardown wall", "failed"], rows)


def _memory(results: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    mem = results["memory"]
    out = ["## Management memory (PSS from /proc/<pid>/smaps_rollup, KB)", "",
           "stock = every containerd-shim-runc-v2 of this containerd + every pause process; ours = "
           "runc-sandboxer + its task server + its `pod-*` processes. Container workloads excluded on both "
           "sides; containerd's own PSS is shown separately (measured during each path's own pass).", ""]
    levels = sorted({r["pods"] for rows in mem.values() for r in rows})
    rows = []
    for pods in levels:
        stock, ours = pss_at(results, "stock", pods), pss_at(results, "ours", pods)
        cd = {label: next((r["containerd"]["pss_kb"] for r in mem.get(label, []) if r["pods"] == pods), math.nan)
              for label in ("stock", "ours")}
        rows.append([str(pods), _n(stock, 0), _n(ours, 0), _n(ratio(ours, stock), 3),
                     _n(stock / pods if pods else math.nan, 0), _n(ours / pods if pods else math.nan, 0),
                     _n(cd["stock"], 0), _n(cd["ours"], 0)])
    out += _table(["pods", "stock", "ours", "ours/stock", "stock per pod", "ours per pod",
                   "containerd (stock pass)", "containerd (ours pass)"], rows)
    out += [f"Slope (least squares over loaded levels): stock {_n(summary['memory']['stock']['slope_kb_per_pod'])} "
            f"KB/pod, ours {_n(summary['memory']['ours']['slope_kb_per_pod'])} KB/pod.", ""]
    out += ["Parts at the largest level:", ""]
    rows = []
    for label in ("stock", "ours"):
        top = mem[label][-1]
        for part, usage in top["parts"].items():
            per = usage["pss_kb"] / usage["processes"] if usage["processes"] else math.nan
            rows.append([label, str(top["pods"]), part, str(usage["processes"]), _n(usage["pss_kb"], 0),
                         _n(per, 0), _n(usage["rss_kb"], 0)])
    return out + _table(["path", "pods", "part", "processes", "PSS", "PSS per process", "RSS"], rows)


def _floor(summary: dict[str, Any]) -> list[str]:
    steps = [("run_ms", "runc run -d"), ("delete_ms", "runc delete -f"), ("create_ms", "runc create"),
             ("start_ms", "runc start")]
    floors = [("between the serial pods", summary.get("floor_between")),
              ("in a loop of its own, before containerd started", summary["floor"])]
    rows = [[title, where, *_stats_cells(floor[key])] for key, title in steps
            for where, floor in floors if floor and key in floor]
    n = " and ".join(f"{floor['run_ms']['n']} {where}" for where, floor in floors if floor)
    return [f"## Floor: raw runc, not through containerd ({n})", "",
            "The same busybox rootfs and `sleep`, host network, a private `--root`; ms. `run -d` is the "
            "floor of the targets; `create` + `start` is what any shim or task server must do instead "
            "(containerd asks for the two steps separately), shown for reference. Between the serial pods "
            "(in the rotation described under *Serial start*) each round follows the same idle gap as every "
            "pod; the loop runs before containerd starts, each round right after the last. The target uses "
            "the lower `run -d` p50 of the two: after an idle spell raw runc is several ms slower (most likely "
            "its first cgroup attach waiting for an RCU grace period, which our start pays ahead: see the "
            "README's *cgroup attach lock*), while our start hardly changes, and a floor that paid it would "
            "credit us with it.", "",
            *_table(["step", "measured", "min", "p50", "p90", "max"], rows)]


def _errors(errors: dict[str, list[str]]) -> list[str]:
    counts = ", ".join(f"{label} {len(errors.get(label, []))}" for label in ("stock", "ours"))
    lines = ["## Errors", "", f"StopContainer failures during teardown: {counts} (each recovered from: wait "
             "until CRI reports the container exited, then stop it again).", ""]
    for label in ("stock", "ours"):
        lines += [f"- {message}" for message in errors.get(label, [])[:5]]
    return lines + [""]


def _cleanup(cleanup: dict[str, Any]) -> list[str]:
    server = ("exited by itself" if cleanup["task_server_exited_by_itself"]
              else "did NOT exit by itself and was killed")
    lines = ["## Cleanup", "",
             f"Pods left in containerd after the run: {cleanup['pods_left']}; pod processes left when "
             f"stopping: {cleanup['leftover_pod_processes']}; containerd stopped through the harness; "
             f"runc-sandboxer stopped with SIGTERM; its task server {server}; leftover mounts: "
             f"{len(cleanup['leftover_mounts'])}.", ""]
    lines += [f"- {note}" for note in cleanup.get("notes", [])]
    return lines + [""]
