"""Turn raw samples into summaries, ours/stock ratios and the issue's targets (reported, not enforced)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .sections import summarize_sections
from .stack import HANDLERS
from .startup import SERIAL_KEYS
from .stats import percentile, ratio, slope, summarize

# The targets of issue 4, as limits on ours/stock ratios or absolute values.
SPEED_RATIO = 0.55
PSS_RATIO = 0.15
PSS_RATIO_AT = 50
PER_POD_KB = 200.0
FLOOR_FACTOR = 1.25


@dataclass
class Target:
    name: str
    value: float
    limit: float
    unit: str
    met: bool
    detail: str = ""


def summarize_run(results: dict[str, Any]) -> dict[str, Any]:
    """The runc comparison (when it ran: "serial" in results), its targets, and the other sections."""
    summary = _summarize_runc(results) if "serial" in results else {"targets": []}
    summary["sections"] = summarize_sections(results)
    return summary


def _summarize_runc(results: dict[str, Any]) -> dict[str, Any]:
    serial = {label: {key: summarize(rows[key]) for key in SERIAL_KEYS}
              for label, rows in results["serial"].items()}
    parallel = {size: {label: {"latency_ms": summarize(row["latency_ms"]),
                               "rounds": len(row["wall_ms"]),
                               "wall_ms": percentile(row["wall_ms"], 50),
                               "teardown_wall_ms": percentile(row["teardown_wall_ms"], 50),
                               "errors": len(row["errors"])}
                       for label, row in per.items()}
                for size, per in results["parallel"].items()}
    memory = {label: _memory_summary(rows) for label, rows in results["memory"].items()}
    floor = {key: summarize(values) for key, values in results["floor"].items()}
    # Results from before the floor was also measured between the serial pods have only the loop.
    between = results.get("floor_interleaved")
    floor_between = {key: summarize(values) for key, values in between.items()} if between else None
    ratios = {
        "serial_p50": ratio(serial["ours"]["total_ms"]["p50"], serial["stock"]["total_ms"]["p50"]),
        "parallel_p50": {size: ratio(per["ours"]["latency_ms"]["p50"], per["stock"]["latency_ms"]["p50"])
                         for size, per in parallel.items()},
    }
    summary = {"serial": serial, "parallel": parallel, "memory": memory, "floor": floor,
               "floor_between": floor_between, "ratios": ratios,
               "teardown_errors": teardown_errors(results)}
    summary["targets"] = [asdict(t) for t in targets(summary, results)]
    return summary


def teardown_errors(results: dict[str, Any]) -> dict[str, list[str]]:
    """Every retried StopContainer failure of the run, by path."""
    out: dict[str, list[str]] = {label: list(results["serial"][label].get("teardown_errors", []))
                                 for label in HANDLERS}
    for per in results["parallel"].values():
        for label, row in per.items():
            out[label] += row.get("teardown_errors", [])
    for message in results.get("memory_teardown_errors", []):
        for label, handler in HANDLERS.items():
            if message.startswith(f"{handler}:"):
                out[label].append(message)
    return out


def _memory_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    loaded = [r for r in rows if r["pods"] > 0]
    xs = [r["pods"] for r in loaded]
    ys = [r["management"]["pss_kb"] for r in loaded]
    return {"slope_kb_per_pod": slope(xs, ys),
            "by_pods": {str(r["pods"]): r["management"]["pss_kb"] for r in rows}}


def pss_at(results: dict[str, Any], label: str, pods: int) -> float:
    for row in results["memory"].get(label, []):
        if row["pods"] == pods:
            return float(row["management"]["pss_kb"])
    return math.nan


def _pss_level(results: dict[str, Any]) -> int:
    """50 pods if both paths were measured there, else the largest level both have."""
    levels = [{r["pods"] for r in rows} for rows in results["memory"].values()]
    common = set.intersection(*levels) - {0} if levels else set()
    if PSS_RATIO_AT in common or not common:
        return PSS_RATIO_AT
    return max(common)


def targets(summary: dict[str, Any], results: dict[str, Any]) -> list[Target]:
    out = []
    r = summary["ratios"]["serial_p50"]
    out.append(Target("serial start p50, ours/stock", r, SPEED_RATIO, "x", r <= SPEED_RATIO))
    for size, value in summary["ratios"]["parallel_p50"].items():
        out.append(Target(f"parallel start p50 ({size} pods), ours/stock", value, SPEED_RATIO, "x",
                          value <= SPEED_RATIO))
    level = _pss_level(results)
    value = ratio(pss_at(results, "ours", level), pss_at(results, "stock", level))
    note = "" if level == PSS_RATIO_AT else f"measured at {level} pods: 50 was not in this run"
    out.append(Target(f"management PSS at {level} pods, ours/stock", value, PSS_RATIO, "x",
                      value <= PSS_RATIO, note))
    per_pod = summary["memory"].get("ours", {}).get("slope_kb_per_pod", math.nan)
    out.append(Target("PSS per extra pod, ours (least-squares slope)", per_pod, PER_POD_KB, "KB",
                      per_pod <= PER_POD_KB))
    out.append(floor_target(summary, results))
    return out


def floor_target(summary: dict[str, Any], results: dict[str, Any]) -> Target:
    floor = floor_run_ms(summary)
    create = summary["serial"]["ours"]["create_ms"]["p50"]
    limit = FLOOR_FACTOR * (floor + create)
    ours = summary["serial"]["ours"]["total_ms"]["p50"]
    where = ""
    if summary.get("floor_between"):
        where = (f", the lower of {summary['floor']['run_ms']['p50']:.1f} ms in a loop of its own and "
                 f"{summary['floor_between']['run_ms']['p50']:.1f} ms between the serial pods")
    detail = (f"limit = {FLOOR_FACTOR} x (runc run -d p50 {floor:.1f} ms{where} + containerd's "
              f"CreateContainer p50 {create:.1f} ms)")
    without_ours = (results.get("attribution") or {}).get("without_ours_ms", {}).get("p50", math.nan)
    if not math.isnan(without_ours):
        detail += (f"; less our daemons' own time (containerd and runc only, see *Where our serial start "
                   f"goes*) p50 {without_ours:.1f} ms, {_room(limit, without_ours, ours)}")
    return Target("serial start p50, ours, against the floor", ours, limit, "ms", ours <= limit, detail)


def _room(limit: float, without_ours: float, ours: float) -> str:
    """Whether a sandboxer could meet the floor target at all in this run: containerd's own work in
    RunPodSandbox and StartContainer is in the start but in the limit only through its factor, and it
    grows with a slower machine as runc's does."""
    if without_ours > limit:
        return f"over the limit by itself: no sandboxer could meet it in this run ({without_ours - limit:.1f} ms over)"
    return (f"which leaves our daemons {limit - without_ours:.1f} ms under the limit "
            f"(they took {ours - without_ours:.1f} ms)")


def floor_run_ms(summary: dict[str, Any]) -> float:
    """The floor of the targets: the lower `runc run -d` p50 of the two measurements. Between the serial
    pods, after their idle gap, raw runc is several ms slower while our start hardly changes (most likely
    runc's first cgroup attach waiting for an RCU grace period that our start pays ahead, see the README's
    cgroup attach lock); a floor that paid it would credit us with it."""
    p50s = [floor["run_ms"]["p50"] for floor in (summary["floor"], summary.get("floor_between")) if floor]
    return min(p50s)
