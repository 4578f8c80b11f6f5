"""containerd restarted under running pods: it re-attaches to the sandboxer's tasks through the
`containerd-shim-kuasar-<type>-v1` helper on its PATH (reference: containerd-sandbox-protocol.md 11, 13.3).

One scenario, run for every sandbox type whose CRI path is tested here: runc, wasm and gVisor
(quark-sandboxer's runsc backend, runtime type io.containerd.kuasar-quark.v1)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import grpc
import pytest

from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient

from .conftest import Stack
from .cri_helpers import children_of, mounts_containing, task_server_pid, wait_state, while_unavailable
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

# How long containerd stays down: long enough for a short container to exit meanwhile.
DOWNTIME = 3.0
CHATTY = ["sh", "-c", "while :; do echo tick; sleep 0.05; done"]
READER = ["sh", "-c", "cat > /dev/null; exit 9"]
NETWORKS = {"runc": ("kuasar-rl0", "10.252.0.0/16"), "wasm": ("kuasar-rl1", "10.248.0.0/16"),
            "wasm-linux": ("kuasar-rl3", "10.237.0.0/16"), "gvisor": ("kuasar-rl2", "10.247.0.0/16")}



class LostExit(AssertionError):
    """The exit of a container that ended while containerd was down was not reported with its code."""


@pytest.fixture(scope="module", params=list(NETWORKS))
def flavor(request: pytest.FixtureRequest) -> Flavor:
    return FLAVORS[request.param]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, flavor: Flavor) -> Iterator[Stack]:
    bridge, subnet = NETWORKS[flavor.name]
    # debug: containerd then passes -debug to the helper and logs what it says on stderr.
    yield from flavor_stack(tmp_path_factory, flavor, bridge=bridge, subnet=subnet, with_shim=True,
                            log_level="debug")


def task_bundles(stack: Stack) -> list[str]:
    root = stack.containerd.state_dir / "io.containerd.runtime.v2.task" / "k8s.io"
    return sorted(os.listdir(root)) if root.is_dir() else []


def test_containerd_restart_keeps_pods_and_containers_manageable(stack: Stack, flavor: Flavor) -> None:
    async def before() -> dict[str, str]:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, flavor, "survivor", stack.log_dir)
            long_cid = await start_container(client, flavor, pod_id, pod, "long", flavor.long)
            short_cid = await start_container(client, flavor, pod_id, pod, "short", flavor.short)
            await wait_state(client, long_cid, cri.CONTAINER_RUNNING)
            made = {"pod": pod_id, "long": long_cid, "short": short_cid}
            if flavor.name != "wasm":  # one that writes all the time: nobody reads while containerd is down
                made["chatty"] = await start_container(client, flavor, pod_id, pod, "chatty", CHATTY)
                await wait_state(client, made["chatty"], cri.CONTAINER_RUNNING)
                # One reading its stdin (`stdin: true`): nobody writes while containerd is down.
                made["reader"] = await start_container(client, flavor, pod_id, pod, "reader", READER, stdin=True)
                await wait_state(client, made["reader"], cri.CONTAINER_RUNNING)
            return made

    ids = stack.run(before())
    server = task_server_pid(stack.sandboxer_dir)
    workloads = children_of(server)  # the host processes of the pod and its containers (gVisor: none)
    # One task bundle per container; the short one's may be gone already (on a slow machine it can exit,
    # and CRI delete its task, before the last container is up).
    running = {cid for name, cid in ids.items() if name not in ("pod", "short")}
    assert running <= set(task_bundles(stack)) <= running | {ids["short"]}

    stack.containerd.terminate()
    time.sleep(DOWNTIME)  # the short container exits while nobody listens
    stack.containerd.restart()

    async def after() -> None:
        async with CriClient(stack.address) as client:
            pod = await while_unavailable(lambda: client.pod_sandbox_status(ids["pod"]))
            assert pod.status.state == cri.SANDBOX_READY
            long = (await client.container_status(ids["long"])).status
            assert long.state == cri.CONTAINER_RUNNING, cri.ContainerState.Name(long.state)
            if "chatty" in ids:
                # It held the only ends of its output FIFOs while containerd was gone: its first write
                # then killed it (SIGPIPE) before the task server kept a read end of its own.
                chatty = (await client.container_status(ids["chatty"])).status
                assert chatty.state == cri.CONTAINER_RUNNING, (cri.ContainerState.Name(chatty.state), chatty.exit_code)
                await client.stop_container(ids["chatty"], timeout=0)
                await client.remove_container(ids["chatty"])
                # containerd's end of its stdin went with containerd; ours, as its shim's, kept the
                # container from reading end of input (a shell would have exited).
                reader = (await client.container_status(ids["reader"])).status
                assert reader.state == cri.CONTAINER_RUNNING, (cri.ContainerState.Name(reader.state), reader.exit_code)
                await client.stop_container(ids["reader"], timeout=0)
                await client.remove_container(ids["reader"])
            short = await wait_state(client, ids["short"], cri.CONTAINER_EXITED)
            short_codes.append(short.exit_code)
            result = await exec_sync(client, flavor, ids["long"], races)
            assert (result.exit_code, result.stdout) == (0, flavor.exec_stdout)
            await client.stop_container(ids["long"], timeout=2)
            stopped = (await client.container_status(ids["long"])).status
            assert stopped.state == cri.CONTAINER_EXITED and stopped.exit_code in (137, 143)
            await client.remove_container(ids["long"])
            await client.remove_container(ids["short"])
            await client.stop_pod_sandbox(ids["pod"])
            await client.remove_pod_sandbox(ids["pod"])
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await client.pod_sandbox_status(ids["pod"])
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    # checked last, so the rest of the scenario is checked whatever they are
    short_codes: list[int] = []
    races: list[str] = []
    stack.run(after())
    assert task_server_pid(stack.sandboxer_dir) == server, "the task server was replaced"
    assert [pid for pid in workloads if exists(pid)] == []
    log = stack.containerd.log_text()
    assert "binary not installed" not in log, "containerd did not find the shim helper"
    # The tasks were re-attached, so their deletion ran the helper (`... -debug delete`), which found
    # the task server had already forgotten them.
    assert "failed to clean up after shim disconnected" not in log
    assert f"kuasar.shim: INFO: task server no longer knows container {ids['long']}" in log
    assert_nothing_left(stack, flavor, [ids["pod"]])
    if short_codes != [7]:
        raise LostExit(f"the exit seen while containerd was down was reported as {short_codes}, not [7]")
    raise_fifo_races(races)


def exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_nothing_left(stack: Stack, flavor: Flavor, pod_ids: list[str]) -> None:
    deadline = time.monotonic() + 10
    while (task_bundles(stack) or flavor.leftovers(stack, pod_ids)) and time.monotonic() < deadline:
        time.sleep(0.1)  # containerd removes bundles after delete; runsc processes take a moment to go
    assert task_bundles(stack) == []
    assert flavor.leftovers(stack, pod_ids) == []
    assert mounts_containing(str(stack.containerd.state_dir / "io.containerd.runtime.v2.task")) == []
    assert unemptied_state(stack, flavor) == []
    assert children_of(task_server_pid(stack.sandboxer_dir)) == []
