"""Pod churn through CRI leaves nothing behind: N cycles of run pod, create+start container, exec,
stop+remove container, stop+remove pod, then no processes, mounts, state entries, IPs or file
descriptors left over, and no memory growth in the sandboxer or its task server.

KUASAR_CHURN_CYCLES sets N. The default, 400, takes about 80 s on a 2-core machine (about 0.2 s a cycle
with pod networking), leaving room under the three-minute CI budget when the machine is busy.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil
import pytest

from kuasar.common.cri_client import CriClient
from tests.support.containerd import mounts_under

from .conftest import Stack, integration_skip_reason
from .cri_helpers import children_of, pod_processes, run_pod, start_container, task_server_pid
from .private_stack import private_stack

pytestmark = pytest.mark.integration

CYCLES = int(os.environ.get("KUASAR_CHURN_CYCLES", "400"))
# Cycles run before the baseline is taken: the first ones load code, warm caches and grow pools.
WARMUP_CYCLES = 3
FD_TOLERANCE = 3
RSS_GROWTH_LIMIT = 5 << 20
# How long the end state may take to settle (containerd closes its task connections after a delete).
SETTLE_TIMEOUT = 10.0
REPORT_EVERY = 25


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = integration_skip_reason()
    if reason:
        pytest.skip(reason)
    with private_stack(tmp_path_factory.mktemp("churn"), bridge="kuasar-ch0", subnet="10.253.0.0/16") as stack:
        yield stack


@dataclass
class Sample:
    cycle: int
    seconds: float
    sandboxer_fds: int
    server_fds: int
    sandboxer_rss: int
    server_rss: int


@dataclass
class Watch:
    sandboxer: psutil.Process
    server: psutil.Process
    started: float = field(default_factory=time.monotonic)
    samples: list[Sample] = field(default_factory=list)

    def sample(self, cycle: int) -> Sample:
        s = Sample(cycle, time.monotonic() - self.started, fds(self.sandboxer.pid), fds(self.server.pid),
                   self.sandboxer.memory_info().rss, self.server.memory_info().rss)
        self.samples.append(s)
        return s


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


async def one_cycle(client: CriClient, stack: Stack, n: int) -> str:
    pod_id, pod = await run_pod(client, f"churn-{n}", stack.log_dir, host_network=False)
    cid = await start_container(client, pod_id, pod, "main", ["sleep", "3600"])
    result = await client.exec_sync(cid, ["sh", "-c", f"echo cycle-{n}"], timeout=20)
    assert (result.exit_code, result.stdout) == (0, f"cycle-{n}\n".encode()), result
    await client.stop_container(cid, timeout=0)
    await client.remove_container(cid)
    await client.stop_pod_sandbox(pod_id)
    await client.remove_pod_sandbox(pod_id)
    return pod_id


def settle(check, timeout: float = SETTLE_TIMEOUT):
    """Poll `check` until it returns something falsy (all fine) or the timeout passes; its last result."""
    deadline = time.monotonic() + timeout
    while (result := check()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return result


@pytest.mark.timeout(max(300, 60 + CYCLES))  # about 0.2 s a cycle here; room for a loaded machine
def test_pod_churn_leaves_no_processes_mounts_state_fds_or_memory_behind(stack: Stack, record_property) -> None:
    assert CYCLES > WARMUP_CYCLES, f"KUASAR_CHURN_CYCLES must be more than the {WARMUP_CYCLES} warm-up cycles"
    server = psutil.Process(task_server_pid(stack.sandboxer_dir))
    watch = Watch(psutil.Process(stack.sandboxer.pid), server)
    pod_ids: list[str] = []
    baseline: Sample | None = None

    async def churn() -> None:
        nonlocal baseline
        async with CriClient(stack.address) as client:
            for n in range(CYCLES):
                pod_ids.append(await one_cycle(client, stack, n))
                if n + 1 == WARMUP_CYCLES:
                    await asyncio.sleep(1.0)  # let connections from the last cycle close
                    baseline = watch.sample(n + 1)
                elif (n + 1) % REPORT_EVERY == 0 and n + 1 < CYCLES:  # the last one is sampled below
                    watch.sample(n + 1)

    try:
        stack.run(churn())
    finally:
        print(f"\nchurn: {len(pod_ids)} cycles in {time.monotonic() - watch.started:.1f}s")
    assert baseline is not None, f"needs more than {WARMUP_CYCLES} cycles"

    # -- nothing left ------------------------------------------------------------------------------
    names = {f"pod-{pod_id[:11]}" for pod_id in pod_ids}  # other stacks on this machine have pods too
    assert settle(lambda: [p.pid for p in pod_processes() if p.info["name"] in names]) == []
    assert settle(lambda: children_of(server.pid)) == []
    state = stack.containerd.state_dir
    assert settle(lambda: mounts_under(state)) == [], "mounts left under containerd's state"
    bundles = state / "io.containerd.runtime.v2.task" / "k8s.io"
    assert settle(lambda: os.listdir(bundles) if bundles.exists() else []) == []
    for sub in ("sandboxes", "console", "runc"):
        assert os.listdir(stack.sandboxer_dir / sub) == [], f"{sub}/ not empty"
    assert leased_ips(stack) == [], "CNI addresses never released"

    # -- no growth ---------------------------------------------------------------------------------
    def fd_growth() -> str | None:
        now = watch.sample(len(pod_ids))
        if now.sandboxer_fds > baseline.sandboxer_fds + FD_TOLERANCE or \
                now.server_fds > baseline.server_fds + FD_TOLERANCE:
            return f"fds sandboxer {baseline.sandboxer_fds}->{now.sandboxer_fds}, " \
                   f"task server {baseline.server_fds}->{now.server_fds}"
        return None

    fd_problem = settle(fd_growth)
    end = watch.samples[-1]
    for s in watch.samples:
        print(f"  cycle {s.cycle:4d} {s.seconds:6.1f}s  fds sandboxer {s.sandboxer_fds:3d} task-server "
              f"{s.server_fds:3d}  rss sandboxer {mb(s.sandboxer_rss)} task-server {mb(s.server_rss)}")
    record_property("churn_cycles", len(pod_ids))
    record_property("churn_seconds", round(end.seconds, 1))
    for name in ("sandboxer_fds", "server_fds", "sandboxer_rss", "server_rss"):
        record_property(f"churn_{name}", f"{getattr(baseline, name)} -> {getattr(end, name)}")
    assert fd_problem is None, fd_problem
    assert end.sandboxer_rss - baseline.sandboxer_rss < RSS_GROWTH_LIMIT, \
        f"sandboxer RSS {mb(baseline.sandboxer_rss)} -> {mb(end.sandboxer_rss)}"
    assert end.server_rss - baseline.server_rss < RSS_GROWTH_LIMIT, \
        f"task server RSS {mb(baseline.server_rss)} -> {mb(end.server_rss)}"
    assert stack.sandboxer.poll() is None and server.is_running()
    assert task_server_pid(stack.sandboxer_dir) == server.pid


def leased_ips(stack: Stack) -> list[str]:
    """host-local IPAM keeps one file per leased address (plus `lock` and `last_reserved_ip.*`)."""
    root = stack.containerd.cni_data_dir
    leased = []
    for network in root.iterdir() if root.exists() else []:
        for entry in network.iterdir():
            if entry.name != "lock" and not entry.name.startswith("last_reserved_ip"):
                leased.append(f"{network.name}/{entry.name}")
    return leased

