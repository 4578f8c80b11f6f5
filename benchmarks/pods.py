"""One busybox pod with one container, started and torn down through CRI with every call timed."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc

from kuasar.common import cgroups
from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient, container_config, pod_config

from .stack import BUSYBOX

# What every benchmark container runs: a long sleep, killed (grace 0) at teardown.
WORKLOAD = ["sleep", "3600"]
# After a failed StopContainer, how long to wait for CRI to see the container's exit.
EXIT_WAIT_S = 10.0


@dataclass
class PodTiming:
    """Milliseconds spent in each CRI call; `total` runs from just before RunPodSandbox until
    StartContainer returned."""

    run_pod: float
    create: float
    start: float
    # CLOCK_MONOTONIC ns before RunPodSandbox and after each of the three calls (see attribution.py).
    marks_ns: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def total(self) -> float:
        return self.run_pod + self.create + self.start


@dataclass
class Pod:
    handler: str
    pod_id: str
    container_id: str
    config: cri.PodSandboxConfig
    timing: PodTiming
    cgroup: cgroups.PodCgroup | None = None  # made beforehand and removed afterwards, as kubelet does


def _ms(start: int) -> float:
    return (time.monotonic_ns() - start) / 1e6


async def start_pod(client: CriClient, handler: str, name: str, log_root: Path, cgroup_parent: str = "") -> Pod:
    """RunPodSandbox (host network) + CreateContainer + StartContainer, each timed separately. With
    `cgroup_parent`, the pod's CRI cgroup parent is `/<cgroup_parent>/pod<uid>`, absolute as kubelet names
    one (runc would put a relative one's containers under the cgroup of whoever runs it, here a shim's)."""
    uid = uuid.uuid4().hex[:12]
    config = pod_config(name, uid=uid, log_directory=str(log_root / f"{name}-{uid}"), host_network=True,
                        cgroup_parent=f"/{cgroup_parent.strip('/')}/pod{uid}" if cgroup_parent else "")
    container = container_config("main", BUSYBOX, WORKLOAD)
    cgroup = None
    if cgroup_parent:  # kubelet makes the pod's cgroup before it asks for the sandbox (untimed there too)
        cgroup = cgroups.PodCgroup(config.linux.cgroup_parent)
        cgroup.create()
    t0 = time.monotonic_ns()
    try:
        pod_id = (await client.run_pod_sandbox(config, runtime_handler=handler)).pod_sandbox_id
    except BaseException:
        if cgroup is not None:
            cgroup.remove()
        raise
    t1 = time.monotonic_ns()
    try:
        container_id = (await client.create_container(pod_id, container, config)).container_id
        t2 = time.monotonic_ns()
        await client.start_container(container_id)
        t3 = time.monotonic_ns()
    except BaseException:
        await remove_pod_only(client, pod_id)
        if cgroup is not None:
            cgroup.remove()
        raise
    timing = PodTiming((t1 - t0) / 1e6, (t2 - t1) / 1e6, (t3 - t2) / 1e6, (t0, t1, t2, t3))
    return Pod(handler, pod_id, container_id, config, timing, cgroup)


async def teardown(client: CriClient, pod: Pod, errors: list[str] | None = None) -> float:
    """StopContainer (grace 0) + RemoveContainer + StopPodSandbox + RemovePodSandbox, in ms.

    A failed StopContainer is recorded in `errors` and recovered from (wait until CRI reports the
    container exited, stop it again), so a flaky Kill shows up in the results instead of ending the run.
    """
    t0 = time.monotonic_ns()
    try:
        await client.stop_container(pod.container_id, timeout=0)
    except grpc.aio.AioRpcError as exc:
        if errors is not None:
            errors.append(f"{pod.handler}: StopContainer: {exc.code().name}: {exc.details()}")
        await _wait_exited(client, pod.container_id)
        await client.stop_container(pod.container_id, timeout=0)
    await client.remove_container(pod.container_id)
    await client.stop_pod_sandbox(pod.pod_id)
    await client.remove_pod_sandbox(pod.pod_id)
    elapsed = _ms(t0)
    if pod.cgroup is not None:  # kubelet's part again, after the runtime's
        pod.cgroup.remove()
    return elapsed


async def _wait_exited(client: CriClient, container_id: str) -> None:
    deadline = time.monotonic() + EXIT_WAIT_S
    while time.monotonic() < deadline:
        if (await client.container_status(container_id)).status.state == cri.CONTAINER_EXITED:
            return
        await asyncio.sleep(0.02)


async def remove_pod_only(client: CriClient, pod_id: str) -> None:
    """Best-effort removal after a failed start (CRI's pod removal takes its containers along)."""
    try:
        await client.stop_pod_sandbox(pod_id)
        await client.remove_pod_sandbox(pod_id)
    except Exception:  # noqa: BLE001 - the original error matters more; remove_all retries at the end
        pass


async def remove_all(client: CriClient) -> int:
    """Stop and remove every pod containerd still lists (whatever the handler); returns how many."""
    pods = (await client.list_pod_sandbox()).items
    for item in pods:
        await client.stop_pod_sandbox(item.id)
        await client.remove_pod_sandbox(item.id)
    return len(pods)
