"""quark-sandboxer with its runsc backend (real gVisor) under a real containerd 2.x, driven through CRI.

A second instance of quark-sandboxer, proxy plugin `gvisor`, runtime handler `kuasar-gvisor`: one gVisor
sandbox per pod, every container of the pod a runsc sub-container on the same application kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc
import psutil
import pytest

from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient
from tests.support import containerd as cd
from tests.support import images
from tests.support.setup_hints import fetched_tool_hint

from .conftest import BUSYBOX, Stack, integration_skip_reason, kill_task_server, start_sandboxer, stop_process
from .cri_helpers import (
    cgroups_named,
    check_exit_codes,
    check_failed_start_leaves_a_removable_container,
    check_pod_files,
    check_port_forward,
    check_stop_sends_sigterm_then_sigkill,
    check_user_namespace_refused,
    mounts_containing,
    remove_pod,
    signalled_terminal_exec,
    start_container,
    start_shm_writer_and_reader,
    stop_pod_while_stopped,
    terminal_exec,
    wait_ended_with_task_server,
    wait_log,
    wait_state,
    while_unavailable,
)
from .cri_helpers import run_pod as cri_run_pod

pytestmark = pytest.mark.integration

HANDLER = "kuasar-gvisor"


def runsc_binary() -> str | None:
    candidate = cd.prefix_dir() / "bin" / "runsc"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("runsc")


@contextmanager
def app_kernel_stack(base: Path, *, name: str, handler: str, bridge: str, subnet: str, quark_section: str,
                     extra_path: Sequence[str | Path] = (), log_level: str = "info") -> Iterator[Stack]:
    """containerd + one quark-sandboxer (proxy plugin `name`, runtime handler `handler`), own bridge and sockets."""
    # Unix socket paths must stay short: Quark's per-pod `<dir>/<64-hex id>/quark-task.sock` is ~100 bytes.
    short = Path(f"/run/{bridge.replace('kuasar-', 'k')}-{secrets.token_hex(2)}")
    short.mkdir(mode=0o700)
    sandboxer_socket = short / f"{name}.sock"
    sandboxer_dir = short / name
    config_path = base / f"{name}.toml"
    config_path.write_text(quark_section)
    image_dir = base / "images"
    busybox_tar = images.build_busybox_image(image_dir / "busybox.tar", ref=BUSYBOX)
    pause_tar = images.build_pause_image(image_dir / "pause.tar")
    instance = cd.ContainerdInstance(
        base / "containerd", sandboxers={name: str(sandboxer_socket)},
        runtimes={handler: {"runtime_type": "io.containerd.kuasar-quark.v1", "sandboxer": name}},
        bridge=bridge, subnet=subnet, extra_path=extra_path, log_level=log_level)
    instance.sock_dir = short / "cd"
    instance.address = str(instance.sock_dir / "containerd.sock")
    instance.ttrpc_address = str(instance.sock_dir / "containerd.sock.ttrpc")
    instance.start()
    current: Stack | None = None
    try:
        instance.import_image(busybox_tar)
        instance.import_image(pause_tar)
        log_path = base / f"{name}-sandboxer.log"
        sandboxer = start_sandboxer(sandboxer_socket, sandboxer_dir, log_path, instance.ttrpc_address,
                                    module="kuasar.quark.cli", extra_args=("--config", str(config_path)))
        current = Stack(instance, sandboxer, sandboxer_socket, sandboxer_dir, log_path, base / "logs")
        yield current
    finally:
        instance.stop()
        if current is not None:
            stop_process(current.sandboxer)
        kill_task_server(sandboxer_dir)
        for leftover in ("task-server.log",):
            if (sandboxer_dir / leftover).exists():  # keep it for post-mortems
                shutil.copy(sandboxer_dir / leftover, base / leftover)
        cd.unmount_all(short)
        shutil.rmtree(short, ignore_errors=True)


def runsc_processes(root: Path) -> list[psutil.Process]:
    """Live runsc processes (sandbox, gofer, wait, exec) working on the state root `root`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(arg in (f"--root={root}", str(root)) for arg in cmdline) and any("runsc" in a for a in cmdline[:1]):
            found.append(proc)
    return found


# [quark] control_timeout of this module's sandboxer: far above what a runsc command takes here (up to
# ~1 s under load), far below the default 30 s, which would make the wedged-sandbox test slow.
CONTROL_TIMEOUT = 10


@pytest.fixture(scope="module")
def gvisor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = integration_skip_reason()
    if reason:
        pytest.skip(reason)
    runsc = runsc_binary()
    if runsc is None:
        pytest.skip(f"gVisor's runsc is not installed ({fetched_tool_hint('runsc')})")
    with gvisor_stack(tmp_path_factory.mktemp("gvisor"), runsc, bridge="kuasar-gv0", subnet="10.254.0.0/16",
                      control_timeout=CONTROL_TIMEOUT) as stack:
        yield stack


def gvisor_stack(base: Path, runsc: str, *, bridge: str, subnet: str, extra_path: Sequence[str | Path] = (),
                 log_level: str = "info", control_timeout: float | None = None):
    """app_kernel_stack with quark-sandboxer's runsc backend: proxy plugin `gvisor`, handler `kuasar-gvisor`."""
    section = f'[quark]\nbackend = "runsc"\nrunsc = "{runsc}"\nplatform = "systrap"\n'
    if control_timeout is not None:
        section += f"control_timeout = {control_timeout}\n"
    return app_kernel_stack(base, name="gvisor", handler=HANDLER, bridge=bridge, subnet=subnet,
                            quark_section=section, extra_path=extra_path, log_level=log_level)


async def run_pod(client: CriClient, name: str, log_root: Path, handler: str = HANDLER,
                  **kwargs) -> tuple[str, cri.PodSandboxConfig]:
    return await cri_run_pod(client, name, log_root, handler=handler, **kwargs)


# -- tests -----------------------------------------------------------------------------------------
def test_two_containers_share_one_gvisor_kernel_and_reach_the_cri_log(gvisor: Stack) -> None:
    started = time.monotonic()

    async def scenario() -> None:
        async with CriClient(gvisor.address) as client:
            pod_id, pod = await run_pod(client, "gv-hello", gvisor.log_dir, host_network=False)
            status = (await client.pod_sandbox_status(pod_id)).status
            assert status.state == cri.SANDBOX_READY
            assert status.network.ip
            # The kernel the container sees is gVisor's (4.4.0, "Starting gVisor..."), not the host's.
            hello = await start_container(client, pod_id, pod, "hello", [
                "sh", "-c", "echo kernel=$(uname -r); dmesg; echo to-stderr >&2"])
            sleeper = await start_container(client, pod_id, pod, "sleeper", ["sleep", "3600"])
            exited = await wait_state(client, hello, cri.CONTAINER_EXITED)
            assert exited.exit_code == 0
            text = await wait_log(pod, "hello", "to-stderr")
            assert "kernel=4.4.0" in text, text
            assert f"kernel={platform.release()}" not in text
            assert "Starting gVisor" in text, text
            await wait_state(client, sleeper, cri.CONTAINER_RUNNING)
            # One application kernel for the pod: gVisor picks its boot messages at random when it
            # boots, and the second container reads the very same kernel log.
            dmesg = await client.exec_sync(sleeper, ["dmesg"], timeout=20)
            assert dmesg.exit_code == 0 and dmesg.stdout.decode().strip() in text, (dmesg.stdout, text)
            # exec: output, stderr and exit code through a foreground `runsc exec`
            result = await client.exec_sync(sleeper, ["sh", "-c", "echo out-$((6*7)); echo err >&2; exit 3"],
                                            timeout=20)
            assert (result.exit_code, result.stdout, result.stderr) == (3, b"out-42\n", b"err\n")
            host = await client.exec_sync(sleeper, ["hostname"], timeout=20)
            assert host.stdout.strip() == b"gv-hello"
            # exactly one gVisor sandbox for the pod, however many containers
            sandboxes = [p for p in runsc_processes(gvisor.sandboxer_dir / "runsc")
                         if "boot" in (p.info["cmdline"] or [])]
            assert len(sandboxes) == 1, [p.info["cmdline"] for p in sandboxes]
            stats = (await client.container_stats(sleeper)).stats
            assert stats.memory.usage_bytes.value > 0 or stats.memory.working_set_bytes.value > 0
            await client.remove_container(hello)
            await remove_pod(client, pod_id)

    gvisor.run(scenario())
    print(f"\ngVisor pod with two containers, exec and teardown: {time.monotonic() - started:.2f}s")


def test_containers_of_a_pod_share_one_dev_shm(gvisor: Stack) -> None:
    """As under gVisor's own shim: one tmpfs the sandbox makes (runsc's pod mount hint), so what one
    container writes to /dev/shm another reads, and shm_open (which needs a tmpfs there) works."""
    async def scenario() -> None:
        async with CriClient(gvisor.address) as client:
            pod_id, pod = await run_pod(client, "gv-shm", gvisor.log_dir)
            _, mount = await start_shm_writer_and_reader(client, pod_id, pod)
            assert mount[2] == "tmpfs", mount
            await remove_pod(client, pod_id)

    gvisor.run(scenario())


def test_containers_see_the_pods_hostname_hosts_and_dns_config(gvisor: Stack) -> None:
    gvisor.run(check_pod_files(gvisor.address, HANDLER, gvisor.log_dir, gvisor.sandboxer_dir / "pods"))


def test_port_forward_reaches_a_server_in_the_sandbox(gvisor: Stack) -> None:
    gvisor.run(check_port_forward(gvisor.address, HANDLER, gvisor.log_dir))


def test_exit_codes_are_reported(gvisor: Stack) -> None:
    gvisor.run(check_exit_codes(gvisor.address, HANDLER, gvisor.log_dir))


def test_a_container_whose_start_fails_is_removed_with_its_pod(gvisor: Stack) -> None:
    gvisor.run(check_failed_start_leaves_a_removable_container(gvisor.address, HANDLER, gvisor.log_dir))


def test_stop_sends_sigterm_then_sigkill(gvisor: Stack) -> None:
    gvisor.run(check_stop_sends_sigterm_then_sigkill(gvisor.address, HANDLER, gvisor.log_dir))


def test_an_oom_kill_in_the_pods_cgroup_is_reported_as_oomkilled(gvisor: Stack) -> None:
    """kubelet bounds a pod's memory with its pod cgroup, to which gVisor's whole sandbox is charged (its
    memory limits inside are not enforced on the host): an OOM kill there ends the sandbox and each of its
    containers is reported OOMKilled, as gVisor's own shim reports it (TaskOOM per container)."""
    from kuasar.common import cgroups

    parent = f"kuasar-it-{os.getpid()}-gvoom"
    if cgroups.is_unified():  # as kubelet makes it: the limit on the pod's cgroup, memory enabled above
        memory = cgroups.CGROUP_ROOT / parent
        memory.mkdir()
        cgroups.enable_controllers(f"{parent}/pod")
        (memory / "memory.max").write_text(str(256 << 20))
        if (memory / "memory.swap.max").exists():  # else the sandbox swaps instead of being killed
            (memory / "memory.swap.max").write_text("0")
    else:
        memory = cgroups.CGROUP_ROOT / "memory" / parent
        memory.mkdir()
        (memory / "memory.limit_in_bytes").write_text(str(256 << 20))

    async def scenario() -> None:
        async with CriClient(gvisor.address) as client:
            pod_id, pod = await run_pod(client, "gv-oom", gvisor.log_dir, cgroup_parent=parent)
            try:
                cid = await start_container(client, pod_id, pod, "hog",
                                            ["sh", "-c", "sleep 0.3; x=aaaaaaaa; while true; do x=$x$x; done"])
                status = await wait_state(client, cid, cri.CONTAINER_EXITED, timeout=60)
                assert status.reason == "OOMKilled", status
            finally:  # (also when it failed: the pod's cgroups must go before their parent)
                await remove_pod(client, pod_id)

    try:
        gvisor.run(scenario())
    finally:
        for directory in cgroups_named(parent):
            for below in sorted(directory.rglob("*"), key=lambda p: -len(p.parts)):
                if below.is_dir():
                    below.rmdir()
            directory.rmdir()
    assert_nothing_left(gvisor)


def test_host_network_pod_gets_loopback_only(gvisor: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(gvisor.address) as client:
            pod_id, pod = await run_pod(client, "gv-hostnet", gvisor.log_dir, host_network=True)
            cid = await start_container(client, pod_id, pod, "main", ["sleep", "3600"])
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            links = await client.exec_sync(cid, ["ip", "-o", "link"], timeout=20)
            assert links.exit_code == 0, links.stderr
            names = [line.split(":")[1].strip() for line in links.stdout.decode().splitlines()]
            assert names == ["lo"], names
            await remove_pod(client, pod_id)

    gvisor.run(scenario())


def test_pod_stop_and_remove_leave_nothing_behind(gvisor: Stack) -> None:
    cgroup_parent = f"kuasar-gv-{os.getpid()}/pod-a"

    async def scenario() -> None:
        async with CriClient(gvisor.address) as client:
            pod_id, pod = await run_pod(client, "gv-teardown", gvisor.log_dir, host_network=False,
                                        cgroup_parent=cgroup_parent)
            cid = await start_container(client, pod_id, pod, "main", ["sleep", "3600"])
            other = await start_container(client, pod_id, pod, "other", ["sleep", "3600"])
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            await wait_state(client, other, cri.CONTAINER_RUNNING)
            assert runsc_processes(gvisor.sandboxer_dir / "runsc")
            await client.stop_pod_sandbox(pod_id)
            for container in (cid, other):
                assert (await client.container_status(container)).status.state == cri.CONTAINER_EXITED
            assert (await client.pod_sandbox_status(pod_id)).status.state == cri.SANDBOX_NOTREADY
            await client.remove_pod_sandbox(pod_id)
            with pytest.raises(grpc.aio.AioRpcError):
                await client.pod_sandbox_status(pod_id)

    gvisor.run(scenario())
    assert_nothing_left(gvisor)
    assert cgroups_named(cgroup_parent.split("/")[0]) == [], "the parent is gone from every hierarchy"


def assert_nothing_left(stack: Stack) -> None:
    deadline = time.monotonic() + 10
    while runsc_processes(stack.sandboxer_dir / "runsc") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p.info["cmdline"] for p in runsc_processes(stack.sandboxer_dir / "runsc")] == []
    assert list((stack.sandboxer_dir / "sandboxes").iterdir()) == []
    assert list((stack.sandboxer_dir / "runsc").iterdir()) == []
    assert not (stack.sandboxer_dir / "pods").exists() or list((stack.sandboxer_dir / "pods").iterdir()) == []
    assert mounts_containing(str(stack.containerd.state_dir)) == []  # ours only: other stacks may run


def test_task_api_pause_resume_pids_and_what_gvisor_does_not_do(gvisor: Stack) -> None:
    from google.protobuf import empty_pb2

    from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
    from kuasar.common.api.containerd.types.task import task_pb2 as types
    from kuasar.common.errors import Unimplemented
    from kuasar.common.ttrpc import TtrpcClient

    service, ns = "containerd.task.v3.Task", {"containerd-namespace-ttrpc": "k8s.io"}

    async def scenario() -> None:
        async with CriClient(gvisor.address) as client:
            pod_id, pod = await run_pod(client, "gv-direct", gvisor.log_dir)
            cid = await start_container(client, pod_id, pod, "main", ["sleep", "3600"])
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            tasks = await TtrpcClient.connect_unix(str(gvisor.sandboxer_dir / "task.sock"))
            try:
                async def call(method: str, request, response=empty_pb2.Empty):
                    return await tasks.call(service, method, request, response, metadata=ns)

                pids = await call("Pids", task.PidsRequest(id=cid), task.PidsResponse)
                assert len(pids.processes) == 1
                await call("Pause", task.PauseRequest(id=cid))
                state = await call("State", task.StateRequest(id=cid), task.StateResponse)
                assert state.status == types.PAUSED and not state.terminal
                await call("Resume", task.ResumeRequest(id=cid))
                state = await call("State", task.StateRequest(id=cid), task.StateResponse)
                assert state.status == types.RUNNING
                for method, request in (("Checkpoint", task.CheckpointTaskRequest(id=cid)),
                                        ("Update", task.UpdateTaskRequest(id=cid))):
                    with pytest.raises(Unimplemented):
                        await call(method, request)
                # without a terminal: accepted and ignored, as containerd's shims answer it
                await call("ResizePty", task.ResizePtyRequest(id=cid, width=80, height=24))
            finally:
                await tasks.close()
            ok = await client.exec_sync(cid, ["echo", "resumed"], timeout=20)
            assert ok.stdout == b"resumed\n"
            # Paused again and left so: the pod's removal resumes it (runsc signals nothing in a paused
            # sandbox, and its delete --force waited for ever: RemovePodSandbox hung).
            tasks = await TtrpcClient.connect_unix(str(gvisor.sandboxer_dir / "task.sock"))
            try:
                await tasks.call(service, "Pause", task.PauseRequest(id=cid), empty_pb2.Empty, metadata=ns)
            finally:
                await tasks.close()
            async with asyncio.timeout(60):
                await remove_pod(client, pod_id)

    gvisor.run(scenario())


def test_terminals_a_tty_container_and_an_interactive_exec_with_resize(gvisor: Stack) -> None:
    from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
    from kuasar.common.ttrpc import TtrpcClient

    async def scenario() -> None:
        async with CriClient(gvisor.address) as client:
            pod_id, pod = await run_pod(client, "gv-tty", gvisor.log_dir)
            on_a_terminal = "[ -t 0 ] && [ -t 1 ] && echo on-a-terminal; exec sleep 3600"
            # `tty: true`: the sub-container's stdio is a pty (runsc sends its master at create), and
            # what it writes reaches the CRI log through our copy.
            cid = await start_container(client, pod_id, pod, "term", ["sh", "-c", on_a_terminal], tty=True, stdin=True)
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            await wait_log(pod, "term", "on-a-terminal")
            tasks = await TtrpcClient.connect_unix(str(gvisor.sandboxer_dir / "task.sock"))
            try:  # State says so (it said no terminal for every gVisor container)
                state = await tasks.call("containerd.task.v3.Task", "State", task.StateRequest(id=cid),
                                         task.StateResponse, metadata={"containerd-namespace-ttrpc": "k8s.io"})
                assert state.terminal and state.stdin
            finally:
                await tasks.close()
            await terminal_exec(client, cid)  # the exec's pty: made here, passed through runsc exec's stdio
            # ... and runsc exec's controlling terminal, so that a resize and ^C reach the process as signals
            await signalled_terminal_exec(client, cid)
            await remove_pod(client, pod_id)
            assert not list(gvisor.sandboxer_dir.glob("console-*.sock")), "console sockets are removed"

    gvisor.run(scenario())


def test_sandboxer_sigkill_and_restart_reattaches_to_gvisor_pods(gvisor: Stack) -> None:
    async def before() -> tuple[str, str]:
        async with CriClient(gvisor.address) as client:
            pod_id, pod = await run_pod(client, "gv-restart", gvisor.log_dir)
            cid = await start_container(client, pod_id, pod, "main", ["sleep", "3600"])
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            return pod_id, cid

    pod_id, cid = gvisor.run(before())
    gvisor.sandboxer.send_signal(signal.SIGKILL)
    gvisor.sandboxer.wait(10)
    gvisor.sandboxer = start_sandboxer(gvisor.sandboxer_socket, gvisor.sandboxer_dir, gvisor.sandboxer_log,
                                       gvisor.containerd.ttrpc_address, module="kuasar.quark.cli",
                                       extra_args=("--config", str(gvisor.sandboxer_log.parent / "gvisor.toml")))

    async def after() -> None:
        async with CriClient(gvisor.address) as client:
            status = (await while_unavailable(lambda: client.pod_sandbox_status(pod_id))).status
            assert status.state == cri.SANDBOX_READY
            result = await client.exec_sync(cid, ["uname", "-r"], timeout=20)
            assert result.stdout == b"4.4.0\n"
            await remove_pod(client, pod_id)

    gvisor.run(after())
    assert_nothing_left(gvisor)


async def sleeping_pod(client: CriClient, stack: Stack, name: str) -> tuple[str, str, psutil.Process]:
    """A pod with one container running `sleep`: the pod's id, the container's, and the pod's sandbox
    process (runsc-sandbox, the sentry) as the sandboxer recorded it."""
    pod_id, pod = await run_pod(client, name, stack.log_dir)
    cid = await start_container(client, pod_id, pod, "main", ["sleep", "3600"])
    await wait_state(client, cid, cri.CONTAINER_RUNNING)
    record = json.loads((stack.sandboxer_dir / "sandboxes" / pod_id / "sandbox.json").read_text())
    sentry = psutil.Process(record["pid"])
    assert "runsc-sandbox" in sentry.cmdline()[0]
    return pod_id, cid, sentry


def test_a_sandbox_killed_from_outside_ends_the_pod_and_its_containers(gvisor: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(gvisor.address) as client:
            pod_id, cid, sentry = await sleeping_pod(client, gvisor, "gv-killed")
            started = time.monotonic()
            os.kill(sentry.pid, signal.SIGKILL)  # the runsc-sandbox process: the pod's kernel dies
            exited = await wait_state(client, cid, cri.CONTAINER_EXITED, timeout=20)
            assert exited.exit_code == 255  # the sentry died with the status: reported lost
            while (await client.pod_sandbox_status(pod_id)).status.state != cri.SANDBOX_NOTREADY:
                assert time.monotonic() - started < 20, "pod still ready after its sandbox died"
                await asyncio.sleep(0.1)
            await remove_pod(client, pod_id)

    gvisor.run(scenario())
    assert_nothing_left(gvisor)


def test_a_sandbox_that_stops_answering_is_ended_by_the_pods_stop(gvisor: Stack) -> None:
    # A wedged sentry (here: stopped; in CI, one that lost a systrap stub to the OOM killer) accepts on
    # its control socket and answers nothing, and runsc waits for ever: StopPodSandbox hung until the
    # client's deadline, and every retry with it. A SIGKILL it does not answer within control_timeout
    # now ends the sandbox.
    async def scenario() -> None:
        async with CriClient(gvisor.address) as client:
            pod_id, cid, sentry = await sleeping_pod(client, gvisor, "gv-wedged")
            took = await stop_pod_while_stopped(client, pod_id, sentry.pid)
            assert CONTROL_TIMEOUT <= took < CONTROL_TIMEOUT + 30, took
            assert not sentry.is_running() or sentry.status() == psutil.STATUS_ZOMBIE
            status = (await client.container_status(cid)).status
            assert (status.state, status.exit_code) == (cri.CONTAINER_EXITED, 137)
            assert (await client.pod_sandbox_status(pod_id)).status.state == cri.SANDBOX_NOTREADY
            await remove_pod(client, pod_id)

    gvisor.run(scenario())
    assert_nothing_left(gvisor)


def test_a_killed_task_server_leaves_no_sandbox_behind(gvisor: Stack) -> None:
    """Its successor deletes the runsc sandboxes (and their gofers) in its root before it serves: two pods
    of two containers each, which it deletes at the same time (a sandbox and its sub-containers too)."""

    async def before() -> list[tuple[str, list[str]]]:
        made = []
        async with CriClient(gvisor.address) as client:
            for index in range(2):
                pod_id, pod = await run_pod(client, f"gv-crash-{index}", gvisor.log_dir)
                cids = [await start_container(client, pod_id, pod, name, ["sleep", "3600"])
                        for name in ("main", "side")]
                for cid in cids:
                    await wait_state(client, cid, cri.CONTAINER_RUNNING)
                made.append((pod_id, cids))
        return made

    made = gvisor.run(before())
    assert runsc_processes(gvisor.sandboxer_dir / "runsc")
    os.kill(int((gvisor.sandboxer_dir / "task-server.pid").read_text()), signal.SIGKILL)

    async def after() -> None:
        async with CriClient(gvisor.address) as client:
            for pod_id, cids in made:
                await wait_ended_with_task_server(client, pod_id, cids)
                await remove_pod(client, pod_id)

    gvisor.run(after())
    assert_nothing_left(gvisor)


CREATE_CATCH_ATTEMPTS = 10


def test_a_runsc_create_still_running_when_its_task_server_dies_is_ended_by_the_next(gvisor: Stack) -> None:
    """A SIGKILL of the task server during `runsc create` (~0.1-0.2 s of every RunPodSandbox) left the
    create running. runsc saves a sandbox's state only at the end of its create, so the next task
    server's sweep (`runsc list`) did not see it, and the sandbox it then finished (runsc-sandbox, gofer,
    its cgroup) lived on until the task server after that. The next task server now ends the create,
    and what it started, before it sweeps."""

    root = gvisor.sandboxer_dir / "runsc"
    cgroup = f"kuasar-it-gv-create-{os.getpid()}"

    def creating() -> bool:
        return any("create" in (p.info["cmdline"] or []) for p in runsc_processes(root))

    async def attempt(index: int) -> bool:
        """Whether the task server was killed while a create ran (a create missed is a pod removed)."""
        async with CriClient(gvisor.address) as client:
            name = f"gv-hung-create-{index}"
            running = asyncio.ensure_future(run_pod(client, name, gvisor.log_dir, cgroup_parent=cgroup))
            while not running.done() and not creating():  # noqa: ASYNC110 - runsc is another process: polled
                await asyncio.sleep(0.005)
            if running.done():
                pod_id, _ = running.result()
                await remove_pod(client, pod_id)
                return False
            os.kill(int((gvisor.sandboxer_dir / "task-server.pid").read_text()), signal.SIGKILL)
            with contextlib.suppress(Exception):  # its Start failed with its task server: the pod is removed
                pod_id, _ = await running
                await remove_pod(client, pod_id)
            return True

    try:
        assert any(gvisor.run(attempt(index)) for index in range(CREATE_CATCH_ATTEMPTS)), \
            "no RunPodSandbox was caught during its runsc create"
        time.sleep(2)  # past the end a create left running would have reached

        async def next_pod() -> None:
            # The next task server, which sweeps, starts with the next call that needs one: the failed
            # Start's removal may have found none to ask (its connection was the dead one's).
            async with CriClient(gvisor.address) as client:
                pod_id, _ = await run_pod(client, "gv-after-hung-create", gvisor.log_dir)
                await remove_pod(client, pod_id)

        gvisor.run(next_pod())
        assert_nothing_left(gvisor)
        assert cgroups_named(cgroup) == []  # the sandbox's, and the pod's parent made for it
    finally:
        for directory in sorted(cgroups_named(cgroup), reverse=True):  # left only if the test failed
            for child in directory.iterdir():
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
            with contextlib.suppress(OSError):
                directory.rmdir()


def test_a_pod_with_its_own_user_namespace_is_refused_at_run_pod_sandbox(gvisor: Stack) -> None:
    """Our gVisor sandbox is not made in the pod's user namespace, so its containers could not be."""
    gvisor.run(check_user_namespace_refused(gvisor.address, HANDLER, gvisor.log_dir, "quark(runsc)"))
