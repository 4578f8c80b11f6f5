"""Where our serial pod starts go: containerd, our daemons, or runc.

The sandboxer runs with request timing on (see kuasar.common.request_timing): our two daemons log when
each Sandbox API call, Task API / pod service request and runc command began and ended. Every serial
pod's three CRI calls are timed on the same clock, one pod at a time, so for each call:

* **runc**: time some runc command of ours was running;
* **our daemons**: time one of our daemons was answering a request, less the runc time inside it;
* **containerd**: the rest of the call, when none of ours was answering: containerd's own work, and
  the benchmark client's gRPC on both ends of the CRI call.

Long-lived calls (containerd's Wait on a sandbox or task, the sandboxer's Wait on a pod) span the
pod's life and are left out. A sandboxer that took no time at all would still have needed the
call's time less "our daemons"; that figure is what the floor target is set against here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kuasar.common.request_timing import FILE_SUFFIX

from .stats import summarize

CALLS = ("RunPodSandbox", "CreateContainer", "StartContainer")
TOTAL = "start total"
PARTS = ("containerd", "ours", "runc")
# Methods that stay open for a sandbox's or task's whole life: not time spent starting it.
LONG_LIVED = "Wait"
NS_PER_MS = 1e6


@dataclass(frozen=True)
class Interval:
    kind: str  # "sandbox", "ttrpc" or "runc"
    method: str
    start: int  # ns, CLOCK_MONOTONIC
    end: int


def load(directory: Path) -> list[Interval]:
    """Every interval our processes recorded in `directory`; a torn last line is skipped."""
    found: list[Interval] = []
    for path in sorted(directory.glob(f"*{FILE_SUFFIX}")):
        for line in path.read_text(errors="replace").splitlines():
            fields = line.split("\t")
            if len(fields) != 4:
                continue
            try:
                found.append(Interval(fields[0], fields[1], int(fields[2]), int(fields[3])))
            except ValueError:
                continue
    found.sort(key=lambda i: i.start)
    return found


def covered(spans: Iterable[tuple[int, int]]) -> int:
    """Length of the union of [start, end) spans."""
    total, current_start, current_end = 0, None, None
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def _long_lived(interval: Interval) -> bool:
    return interval.method.rpartition("/")[2] == LONG_LIVED


def split_call(start: int, end: int, intervals: Sequence[Interval]) -> dict[str, float]:
    """One CRI call's wall time [start, end] split into PARTS, in ms."""
    clipped = [(i.kind, max(i.start, start), min(i.end, end)) for i in intervals
               if not _long_lived(i) and i.start < end and i.end > start]
    busy = covered((a, b) for _, a, b in clipped)
    runc = covered((a, b) for kind, a, b in clipped if kind == "runc")
    return {"containerd": (end - start - busy) / NS_PER_MS, "ours": (busy - runc) / NS_PER_MS,
            "runc": runc / NS_PER_MS}


def attribute(marks: Sequence[Sequence[int]], intervals: Sequence[Interval]) -> dict[str, Any]:
    """Per call and per part, the values and their summary over pods, from each pod's four marks
    (before RunPodSandbox, after it, after CreateContainer, after StartContainer; ns); plus
    `without_ours_ms`: each pod's start less our daemons' time."""
    per_call: dict[str, dict[str, list[float]]] = {call: {part: [] for part in PARTS}
                                                   for call in (*CALLS, TOTAL)}
    without_ours: list[float] = []
    for pod in marks:
        total = dict.fromkeys(PARTS, 0.0)
        for call, start, end in zip(CALLS, pod[:-1], pod[1:], strict=True):
            split = split_call(start, end, intervals)
            for part in PARTS:
                per_call[call][part].append(split[part])
                total[part] += split[part]
        for part in PARTS:
            per_call[TOTAL][part].append(total[part])
        without_ours.append((pod[-1] - pod[0]) / NS_PER_MS - total["ours"])
    return {
        "calls": {call: {part: summarize(values) for part, values in parts.items()}
                  for call, parts in per_call.items()},
        "without_ours_ms": summarize(without_ours),
        "requests": by_request(marks, intervals),
        "pods": len(marks),
        "intervals": len(intervals),
    }


def by_request(marks: Sequence[Sequence[int]], intervals: Sequence[Interval]) -> list[dict[str, Any]]:
    """Each kind of request our daemons answered (and runc command they ran) during the pods' starts:
    how many per start, how long each took, and of that its own time: less what ran nested inside it
    in another process (runc inside the Task API's Create, the pod service's Create inside the
    sandboxer's Start). Own times add up to our daemons' share, or more where two of our processes
    worked at once (the pod service's Create begins inside the sandboxer's Create and may end after
    it). Largest own time per start first. A request counts for the start it began in, up to the
    moment StartContainer returned."""
    spans: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for pod in marks:
        begin, end = pod[0], pod[-1]
        inside = [i for i in intervals if not _long_lived(i) and begin <= i.start < end]
        for outer in inside:
            stop = min(outer.end, end)
            nested = covered((i.start, i.end) for i in inside
                             if outer.start <= i.start and i.end <= stop and i.end - i.start < stop - outer.start)
            spans.setdefault((outer.kind, outer.method), []).append(
                ((stop - outer.start) / NS_PER_MS, (stop - outer.start - nested) / NS_PER_MS))
    pods = max(len(marks), 1)
    rows = [{"kind": kind, "method": method, "per_start": len(found) / pods,
             "ms": summarize([whole for whole, _ in found]), "own_ms": summarize([own for _, own in found]),
             "own_per_start_ms": sum(own for _, own in found) / pods}
            for (kind, method), found in spans.items()]
    return sorted(rows, key=lambda row: (-row["own_per_start_ms"], row["kind"], row["method"]))
