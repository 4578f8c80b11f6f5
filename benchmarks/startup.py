"""Start-up latency through CRI: serial (one pod at a time) and parallel (K pods at once) phases.

The two paths alternate so that drift on a shared machine hits both alike: serially pod by pod, with
a round of the raw runc floor between them, in parallel round by round.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

from kuasar.common.cri_client import CriClient

from .floor import InterleavedFloor
from .pods import Pod, start_pod, teardown
from .stack import HANDLERS, Stack

SERIAL_KEYS = ("total_ms", "run_pod_ms", "create_ms", "start_ms", "teardown_ms")
StartupResults = dict[str, dict[str, list]]
FLOOR = "floor"
# The order of the serial phase's rounds, repeated: each of the three comes first, second and last
# equally often, and follows each of the three (itself across a round's boundary) equally often. What
# the previous step leaves to the kernel (a pod's teardown, runc's delete) slows the next one, so each
# is measured after the same mix of predecessors.
SERIAL_ORDERS = (("stock", "ours", FLOOR), (FLOOR, "stock", "ours"), ("ours", "stock", FLOOR),
                 (FLOOR, "ours", "stock"), ("stock", FLOOR, "ours"), ("ours", FLOOR, "stock"))


def alternate(i: int) -> Iterator[tuple[str, str]]:
    """(label, handler) pairs, stock first on even rounds and ours first on odd ones."""
    items = list(HANDLERS.items())
    yield from (items if i % 2 == 0 else reversed(items))


async def serial_phase(client: CriClient, stack: Stack, count: int, warmup: int, gap: float,
                       floor: InterleavedFloor) -> StartupResults:
    """`warmup` unrecorded rounds, then `count` rounds of start + teardown of one pod per path and one
    round of `floor` (its times are kept there), in SERIAL_ORDERS. Teardown errors (retried, see
    pods.teardown) are listed under "teardown_errors"."""
    results: StartupResults = {label: {key: [] for key in (*SERIAL_KEYS, "teardown_errors")}
                               for label in HANDLERS}
    for i in range(-warmup, count):
        for label in SERIAL_ORDERS[i % len(SERIAL_ORDERS)]:
            if label == FLOOR:
                await floor.round(record=i >= 0)
            else:
                pod = await start_pod(client, HANDLERS[label], f"serial-{label}-{i + warmup}", stack.log_dir,
                                      stack.pod_cgroup_parent)
                down = await teardown(client, pod, results[label]["teardown_errors"])
                if i >= 0:
                    record_start(results[label], pod, down)
            await asyncio.sleep(gap)
    return results


def record_start(row: dict[str, list], pod: Pod, teardown_ms: float) -> None:
    """One pod's start timings and teardown time into a results row keyed by SERIAL_KEYS."""
    row["total_ms"].append(pod.timing.total)
    row["run_pod_ms"].append(pod.timing.run_pod)
    row["create_ms"].append(pod.timing.create)
    row["start_ms"].append(pod.timing.start)
    row["teardown_ms"].append(teardown_ms)
    row.setdefault("marks_ns", []).append(list(pod.timing.marks_ns))


async def _parallel_round(client: CriClient, stack: Stack, label: str, handler: str, size: int,
                          into: dict[str, list]) -> None:
    t0 = time.perf_counter()
    outcomes = await asyncio.gather(
        *(start_pod(client, handler, f"par{size}-{label}-{k}", stack.log_dir, stack.pod_cgroup_parent)
          for k in range(size)),
        return_exceptions=True)
    wall = (time.perf_counter() - t0) * 1000.0
    pods = [p for p in outcomes if isinstance(p, Pod)]
    into["errors"] += [repr(e)[:300] for e in outcomes if isinstance(e, BaseException)]
    t1 = time.perf_counter()
    await asyncio.gather(*(teardown(client, pod, into["teardown_errors"]) for pod in pods))
    down = (time.perf_counter() - t1) * 1000.0
    if not pods:
        raise RuntimeError(f"parallel {size} on {handler}: every pod failed: {into['errors'][-3:]}")
    into["latency_ms"] += [p.timing.total for p in pods]
    into["run_pod_ms"] += [p.timing.run_pod for p in pods]
    into["create_ms"] += [p.timing.create for p in pods]
    into["start_ms"] += [p.timing.start for p in pods]
    into["wall_ms"].append(wall)
    into["teardown_wall_ms"].append(down)


PARALLEL_KEYS = ("latency_ms", "run_pod_ms", "create_ms", "start_ms", "wall_ms", "teardown_wall_ms", "errors",
                 "teardown_errors")


async def parallel_phase(client: CriClient, stack: Stack, sizes: list[int], rounds: int,
                         settle: float) -> dict[str, dict[str, dict[str, list]]]:
    """`rounds` passes over `sizes`; each size gets one round per path per pass (which path goes first
    alternates), all pods removed between rounds. Per-pod numbers are pooled over the rounds; wall
    and teardown times are kept per round."""
    results = {str(size): {label: {key: [] for key in PARALLEL_KEYS} for label in HANDLERS} for size in sizes}
    for r in range(rounds):
        for i, size in enumerate(sizes):
            for label, handler in alternate(r * len(sizes) + i):
                await _parallel_round(client, stack, label, handler, size, results[str(size)][label])
                await asyncio.sleep(settle)
    return results
