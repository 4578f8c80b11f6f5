"""quark-sandboxer with its Quark backend under a real containerd 2.x, against a FAKE `quark`.

Quark itself cannot run here (it needs hardware virtualisation and a toolchain we cannot install); the
fake (tests/fakes/fake_quark.py) keeps Quark's command line and socket contract and serves the Task API
itself, so this exercises everything on the sandboxer's side: the bundle and spec, the `quark ... sandbox`
command, the pid file, the per-pod task address containerd dials, Wait through a pidfd, Stop and cleanup.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient

from . import test_gvisor_cri as gv
from .conftest import Stack, integration_skip_reason
from .cri_helpers import check_user_namespace_refused, wait_pod_not_ready, while_unavailable

pytestmark = pytest.mark.integration

HANDLER = "kuasar-quark"
REPO = Path(__file__).resolve().parents[2]


def write_fake_quark(directory: Path) -> Path:
    """An executable named `quark` that runs the fake with this interpreter (no shell involved)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "quark"
    path.write_text(f"#!{sys.executable}\n"
                    "import runpy, sys\n"
                    f"sys.path.insert(0, {str(REPO)!r})\n"
                    "runpy.run_module('tests.fakes.fake_quark', run_name='__main__')\n")
    path.chmod(0o755)
    return path


def fake_daemons(directory: Path) -> list[psutil.Process]:
    """Live fake QVisor daemons (and their guardians), and task relays, serving sandboxes under `directory`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and ("--task-socket" in cmdline or "--upstream" in cmdline) \
                and any(str(directory) in arg for arg in cmdline):
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def quark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = integration_skip_reason()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("quark")
    binary = write_fake_quark(base / "fake-bin")
    section = f'[quark]\nbackend = "quark"\nquark = "{binary}"\n'
    with gv.app_kernel_stack(base, name="quark", handler=HANDLER, bridge="kuasar-qk0", subnet="10.251.0.0/16",
                             quark_section=section) as stack:
        try:
            yield stack
        finally:  # a failed test may leave fake daemons: kill them before the stack goes
            for proc in fake_daemons(stack.sandboxer_dir):
                proc.kill()


def test_fake_quark_pod_runs_containers_through_the_task_relay(quark: Stack) -> None:
    started = time.monotonic()

    async def scenario() -> None:
        async with CriClient(quark.address) as client:
            pod_id, pod = await gv.run_pod(client, "qk-hello", quark.log_dir, handler=HANDLER, host_network=False)
            status = (await client.pod_sandbox_status(pod_id, verbose=True)).status
            assert status.state == cri.SANDBOX_READY
            # The bundle Kuasar's quark-sandboxer writes, and the daemon the fake `quark` left running.
            base = quark.sandboxer_dir / pod_id
            assert (base / "sandbox" / "config.json").is_file() and (base / "sandbox" / "rootfs" / "dev").is_dir()
            pid = int((base / "pid").read_text())
            assert (base / "pid").read_text() == str(pid)  # bare digits, as Kuasar parses them
            # containerd dials the relay (v3); the fake, as QVisor, serves v2 only and reads containers
            # from its bundle, where the relay lays them out
            assert (base / "quark-task.sock").is_socket() and (base / "task.sock").is_socket()
            assert "relaying" in (base / "relay.log").read_text()
            assert psutil.Process(pid).is_running()
            hello = await gv.start_container(client, pod_id, pod, "hello",
                                             ["sh", "-c", "echo hello-from-quark; hostname; echo to-stderr >&2"])
            sleeper = await gv.start_container(client, pod_id, pod, "sleeper", ["sleep", "3600"])
            assert (await gv.wait_state(client, hello, cri.CONTAINER_EXITED)).exit_code == 0
            text = await gv.wait_log(pod, "hello", "to-stderr")
            assert "hello-from-quark" in text and "qk-hello" in text
            await gv.wait_state(client, sleeper, cri.CONTAINER_RUNNING)
            result = await client.exec_sync(sleeper, ["sh", "-c", "echo out-$((6*7)); echo err >&2; exit 3"],
                                            timeout=20)
            assert (result.exit_code, result.stdout, result.stderr) == (3, b"out-42\n", b"err\n")
            # the fake is what containerd talked to: it logged the sandbox it serves
            assert "FAKE-QUARK" in (base / "fake-quark.log").read_text()
            await client.remove_container(hello)
            await gv.remove_pod(client, pod_id)
            assert not base.exists()
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    quark.run(scenario())
    print(f"\nfake-Quark pod with two containers, exec and teardown: {time.monotonic() - started:.2f}s")


def test_exit_codes_and_stop(quark: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(quark.address) as client:
            pod_id, pod = await gv.run_pod(client, "qk-codes", quark.log_dir, handler=HANDLER)
            seven = await gv.start_container(client, pod_id, pod, "seven", ["sh", "-c", "exit 7"])
            polite = await gv.start_container(client, pod_id, pod, "polite",
                                              ["sh", "-c", "trap 'echo got-term; exit 143' TERM; "
                                                           "while true; do sleep 0.1; done"])
            assert (await gv.wait_state(client, seven, cri.CONTAINER_EXITED)).exit_code == 7
            await gv.wait_state(client, polite, cri.CONTAINER_RUNNING)
            await client.stop_container(polite, timeout=10)
            assert (await client.container_status(polite)).status.exit_code == 143
            await gv.remove_pod(client, pod_id)

    quark.run(scenario())


def test_pod_stop_kills_the_daemon_and_remove_leaves_nothing(quark: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(quark.address) as client:
            pod_id, pod = await gv.run_pod(client, "qk-teardown", quark.log_dir, handler=HANDLER,
                                           host_network=False)
            cid = await gv.start_container(client, pod_id, pod, "main", ["sleep", "3600"])
            await gv.wait_state(client, cid, cri.CONTAINER_RUNNING)
            pid = int((quark.sandboxer_dir / pod_id / "pid").read_text())
            await client.stop_pod_sandbox(pod_id)
            assert (await client.container_status(cid)).status.state == cri.CONTAINER_EXITED
            assert (await client.pod_sandbox_status(pod_id)).status.state == cri.SANDBOX_NOTREADY
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            await client.remove_pod_sandbox(pod_id)
            with pytest.raises(grpc.aio.AioRpcError):
                await client.pod_sandbox_status(pod_id)

    quark.run(scenario())
    deadline = time.monotonic() + 10
    while fake_daemons(quark.sandboxer_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fake_daemons(quark.sandboxer_dir) == []
    assert list((quark.sandboxer_dir / "sandboxes").iterdir()) == []
    assert [p.name for p in quark.sandboxer_dir.iterdir() if p.name != "sandboxes"] == []
    assert gv.mounts_containing(str(quark.containerd.state_dir)) == []


def test_a_dead_daemon_is_reported_by_wait(quark: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(quark.address) as client:
            pod_id, _ = await gv.run_pod(client, "qk-dies", quark.log_dir, handler=HANDLER)
            pid = int((quark.sandboxer_dir / pod_id / "pid").read_text())
            os.kill(pid, 9)  # QVisor dies on its own: Controller.Wait must notice (Kuasar's does not)
            await wait_pod_not_ready(client, pod_id, "pod still ready after its QVisor died", timeout=20)
            await gv.remove_pod(client, pod_id)

    quark.run(scenario())


def test_sandboxer_sigkill_and_restart_reattaches_to_the_quark_daemon(quark: Stack) -> None:
    import signal

    from .conftest import start_sandboxer

    async def before() -> tuple[str, str]:
        async with CriClient(quark.address) as client:
            pod_id, pod = await gv.run_pod(client, "qk-restart", quark.log_dir, handler=HANDLER)
            cid = await gv.start_container(client, pod_id, pod, "main", ["sleep", "3600"])
            await gv.wait_state(client, cid, cri.CONTAINER_RUNNING)
            return pod_id, cid

    pod_id, cid = quark.run(before())
    pid = int((quark.sandboxer_dir / pod_id / "pid").read_text())
    quark.sandboxer.send_signal(signal.SIGKILL)
    quark.sandboxer.wait(10)
    quark.sandboxer = start_sandboxer(quark.sandboxer_socket, quark.sandboxer_dir, quark.sandboxer_log,
                                      quark.containerd.ttrpc_address, module="kuasar.quark.cli",
                                      extra_args=("--config", str(quark.sandboxer_log.parent / "quark.toml")))

    async def after() -> None:
        async with CriClient(quark.address) as client:
            status = (await while_unavailable(lambda: client.pod_sandbox_status(pod_id))).status
            assert status.state == cri.SANDBOX_READY  # re-attached to the same live daemon
            assert psutil.Process(pid).is_running()
            result = await client.exec_sync(cid, ["echo", "still-here"], timeout=20)
            assert result.stdout == b"still-here\n"
            await gv.remove_pod(client, pod_id)  # the restarted sandboxer's Wait sees the kill
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    quark.run(after())


def test_a_pod_with_its_own_user_namespace_is_refused_at_run_pod_sandbox(quark: Stack) -> None:
    quark.run(check_user_namespace_refused(quark.address, HANDLER, quark.log_dir, "quark"))
