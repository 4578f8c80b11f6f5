"""Pod churn through CRI leaves nothing behind: N cycles of run pod, create+start container, exec,
stop+remove container, stop+remove pod, then no processes, mounts, state entries, IPs or file
descriptors left over, and no memory growth in the sandboxer or its task server.

Run for every sandbox type (tests/integration/flavors.py). N per type, with its override; times
measured on a 2-core machine with pod networking:
runc 400 (KUASAR_CHURN_CYCLES; about 80 s, 0.2 s a cycle), wasm 60 (KUASAR_CHURN_CYCLES_WASM; about
17 s), Linux containers in wasm pods 60 (KUASAR_CHURN_CYCLES_WASM_LINUX; about 15 s), gVisor 15
(KUASAR_CHURN_CYCLES_GVISOR; about 11 s, a gVisor sandbox boots per pod), vmm 2 (KUASAR_CHURN_CYCLES_VMM;
about 17 s, a TCG VM boot per pod, the baseline taken after the first cycle; vmm has no task server,
its pods live in the guests).
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

from .conftest import Stack
from .cri_helpers import children_of, task_server_pid
from .flavors import (
    FLAVORS,
    Flavor,
    exec_sync,
    flavor_stack,
    raise_fifo_races,
    run_pod,
    start_container,
    unemptied_state,
)

pytestmark = pytest.mark.integration

# type: (cycles, bridge, subnet)
CHURN = {
    "runc": (int(os.environ.get("KUASAR_CHURN_CYCLES", "400")), "kuasar-ch0", "10.253.0.0/16"),
    "wasm": (int(os.environ.get("KUASAR_CHURN_CYCLES_WASM", "60")), "kuasar-ch1", "10.246.0.0/16"),
    "wasm-linux": (int(os.environ.get("KUASAR_CHURN_CYCLES_WASM_LINUX", "60")), "kuasar-ch4", "10.238.0.0/16"),
    "gvisor": (int(os.environ.get("KUASAR_CHURN_CYCLES_GVISOR", "15")), "kuasar-ch2", "10.245.0.0/16"),
    "vmm": (int(os.environ.get("KUASAR_CHURN_CYCLES_VMM", "2")), "kuasar-ch3", "10.244.0.0/16"),
}
# Cycles run before the baseline is taken: the first ones load code, warm caches and grow pools.
WARMUP_CYCLES = 3
FD_TOLERANCE = 3
RSS_GROWTH_LIMIT = 5 << 20
# How long the end state may take to settle (containerd closes its task connections after a delete).
SETTLE_TIMEOUT = 10.0
REPORT_EVERY = 25


@pytest.fixture(scope="module", params=list(CHURN))
def flavor(request: pytest.FixtureRequest) -> Flavor:
    return FLAVORS[request.param]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, flavor: Flavor) -> Iterator[Stack]:
    _, bridge, subnet = CHURN[flavor.name]
    yield from flavor_stack(tmp_path_factory, flavor, bridge=bridge, subnet=subnet)


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
    server: psutil.Process | None  # None: no task server (vmm)
    started: float = field(default_factory=time.monotonic)
    samples: list[Sample] = field(default_factory=list)

    def sample(self, cycle: int) -> Sample:
        s = Sample(cycle, time.monotonic() - self.started, fds(self.sandboxer), fds(self.server),
                   rss(self.sandboxer), rss(self.server))
        self.samples.append(s)
        return s


def fds(proc: psutil.Process | None) -> int:
    return len(os.listdir(f"/proc/{proc.pid}/fd")) if proc else 0


def rss(proc: psutil.Process | None) -> int:
    return proc.memory_info().rss if proc else 0


def mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


async def one_cycle(client: CriClient, stack: Stack, flavor: Flavor, n: int, races: list[str]) -> str:
    pod_id, pod = await run_pod(client, flavor, f"churn-{n}", stack.log_dir, host_network=False)
    cid = await start_container(client, flavor, pod_id, pod, "main", flavor.long)
    result = await exec_sync(client, flavor, cid, races)
    assert (result.exit_code, result.stdout) == (0, flavor.exec_stdout), result
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


@pytest.mark.timeout(max(300, 60 + 4 * max(cycles for cycles, _, _ in CHURN.values())))  # room for a loaded machine
def test_pod_churn_leaves_no_processes_mounts_state_fds_or_memory_behind(stack: Stack, flavor: Flavor,
                                                                         record_property) -> None:
    cycles = CHURN[flavor.name][0]
    warmup = min(WARMUP_CYCLES, cycles - 1)  # vmm's two cycles: the baseline after the first one
    assert warmup > 0, f"{flavor.name}: needs at least 2 churn cycles"
    server = psutil.Process(task_server_pid(stack.sandboxer_dir)) if flavor.task_server else None
    watch = Watch(psutil.Process(stack.sandboxer.pid), server)
    pod_ids: list[str] = []
    races: list[str] = []
    baseline: Sample | None = None

    async def churn() -> None:
        nonlocal baseline
        async with CriClient(stack.address, timeout=flavor.cri_timeout) as client:
            for n in range(cycles):
                pod_ids.append(await one_cycle(client, stack, flavor, n, races))
                if n + 1 == warmup:
                    await asyncio.sleep(1.0)  # let connections from the last cycle close
                    baseline = watch.sample(n + 1)
                elif (n + 1) % REPORT_EVERY == 0 and n + 1 < cycles:  # the last one is sampled below
                    watch.sample(n + 1)

    try:
        stack.run(churn())
    finally:
        print(f"\n{flavor.name} churn: {len(pod_ids)} cycles in {time.monotonic() - watch.started:.1f}s, "
              f"{len(races)} exec(s) retried after the FIFO race")
    assert baseline is not None

    # -- nothing left ------------------------------------------------------------------------------
    assert settle(lambda: flavor.leftovers(stack, pod_ids)) == []
    assert settle(lambda: children_of(server.pid if server else stack.sandboxer.pid)) == []
    state = stack.containerd.state_dir
    assert settle(lambda: mounts_under(state, stack.sandboxer_dir)) == [], "mounts left under the state dirs"
    bundles = state / "io.containerd.runtime.v2.task" / "k8s.io"
    assert settle(lambda: os.listdir(bundles) if bundles.exists() else []) == []
    assert unemptied_state(stack, flavor) == []
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
              f"{s.server_fds:3d}  rss sandboxer {mb(s.sandboxer_rss)} task-server {mb(s.server_rss)}"
              if server else f"  cycle {s.cycle:4d} {s.seconds:6.1f}s  fds sandboxer {s.sandboxer_fds:3d}  "
                             f"rss sandboxer {mb(s.sandboxer_rss)}")
    record_property("churn_cycles", len(pod_ids))
    record_property("churn_seconds", round(end.seconds, 1))
    for name in ("sandboxer_fds", "server_fds", "sandboxer_rss", "server_rss"):
        record_property(f"churn_{name}", f"{getattr(baseline, name)} -> {getattr(end, name)}")
    assert fd_problem is None, fd_problem
    assert end.sandboxer_rss - baseline.sandboxer_rss < RSS_GROWTH_LIMIT, \
        f"sandboxer RSS {mb(baseline.sandboxer_rss)} -> {mb(end.sandboxer_rss)}"
    assert end.server_rss - baseline.server_rss < RSS_GROWTH_LIMIT, \
        f"task server RSS {mb(baseline.server_rss)} -> {mb(end.server_rss)}"
    assert stack.sandboxer.poll() is None
    if server is not None:
        assert server.is_running() and task_server_pid(stack.sandboxer_dir) == server.pid
    raise_fifo_races(races)


def leased_ips(stack: Stack) -> list[str]:
    """host-local IPAM keeps one file per leased address (plus `lock` and `last_reserved_ip.*`)."""
    root = stack.containerd.cni_data_dir
    leased = []
    for network in root.iterdir() if root.exists() else []:
        for entry in network.iterdir():
            if entry.name != "lock" and not entry.name.startswith("last_reserved_ip"):
                leased.append(f"{network.name}/{entry.name}")
    return leased

