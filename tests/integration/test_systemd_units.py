"""The installed systemd unit under a real systemd: a containerd restarted while the sandboxer is down
(killed, in its RestartSec) waits for it, so the pod stays READY and takes new containers.

Without the unit's `WantedBy=containerd.service` containerd would start at once, ask the pod's Status of a
sandboxer that is not there, and mark the pod NOTREADY for good ("sandbox container ... is not running"
at the next CreateContainer: README, *Known gaps*). Needs systemd as PID 1, which the development machine
lacks: `make test-cgroup2` runs it in a VM booted with systemd. It names its units `containerd.service`
and `kuasar-runc.service`, as the unit's dependencies do, and so refuses to run where either exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient
from tests.support import containerd as cd
from tests.support import images

from . import cri_helpers as h
from .conftest import BUSYBOX, integration_skip_reason, kill_task_server

RUNTIME_UNITS = Path("/run/systemd/system")
CONTAINERD_UNIT = "containerd.service"
SANDBOXER_UNIT = "kuasar-runc.service"
TIMEOUT = 60.0
INSTALL = Path(__file__).resolve().parents[2] / "packaging" / "install.py"


def skip_reason() -> str | None:
    reason = integration_skip_reason()
    if reason:
        return reason
    if not RUNTIME_UNITS.is_dir() or shutil.which("systemctl") is None:
        return "needs systemd as PID 1 (`make test-cgroup2` runs this test in a VM booted with systemd)"
    for unit in (CONTAINERD_UNIT, SANDBOXER_UNIT):
        state = systemctl("show", "--property=LoadState", "--value", unit, check=False).stdout.strip()
        if state != "not-found":
            return f"{unit} exists on this machine ({state}); the test would replace it"
    return None


def systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=TIMEOUT * 3, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"systemctl {' '.join(args)}: {res.stderr}{journal()}")
    return res


def journal() -> str:
    res = subprocess.run(["journalctl", "--no-pager", "-n", "60", "-u", CONTAINERD_UNIT, "-u", SANDBOXER_UNIT],
                         capture_output=True, text=True, timeout=60, check=False)
    return "\n" + res.stdout[-6000:]


def sandboxer_unit(socket: Path, directory: Path, events_address: str) -> str:
    """The unit `make install` writes, running this checkout's sandboxer from the venv instead of the
    frozen binary (everything else as installed: ordering, [Install], Type=notify, KillMode, Restart)."""
    spec = importlib.util.spec_from_file_location("kuasar_install", INSTALL)
    assert spec is not None and spec.loader is not None
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    prefix = cd.prefix_dir()  # the unit's PATH starts with <prefix>/bin: kuasar-pause is there
    text = install.render_unit("runc", install.Layout(str(prefix)))
    command = (f"ExecStart={sys.executable} -m kuasar.runc.cli --listen {socket} --dir {directory} "
               f"--events-address {events_address} --log-level debug\nEnvironment=KUASAR_PREFIX={prefix}")
    lines = [command if line.startswith("ExecStart=") else line for line in text.splitlines()]
    assert command in lines
    return "\n".join(lines) + "\n"


def containerd_unit(command: list[str], path: str) -> str:
    # As containerd's own unit: notify, and only containerd itself is stopped on a restart.
    return "\n".join([
        "[Unit]", "Description=containerd of kuasar-py's systemd test",
        "[Service]", "Type=notify", f"ExecStart={' '.join(command)}", f"Environment=PATH={path}",
        "KillMode=process", "Delegate=yes", "Restart=always", "RestartSec=5", ""])


@pytest.fixture
def units(tmp_path: Path) -> Iterator[cd.ContainerdInstance]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    short = Path(f"/run/ksd-{secrets.token_hex(2)}")
    short.mkdir(mode=0o700)
    instance = cd.ContainerdInstance(tmp_path / "containerd", sandboxers={"runc": str(short / "runc.sock")},
                                     bridge="kuasar-sd0", subnet="10.236.0.0/16", log_level="info")
    instance.sock_dir = short / "cd"
    instance.address = str(instance.sock_dir / "containerd.sock")
    instance.ttrpc_address = str(instance.sock_dir / "containerd.sock.ttrpc")
    command = instance.prepare()
    (RUNTIME_UNITS / CONTAINERD_UNIT).write_text(containerd_unit(command, instance.env()["PATH"]))
    (RUNTIME_UNITS / SANDBOXER_UNIT).write_text(sandboxer_unit(short / "runc.sock", short / "runc",
                                                               instance.ttrpc_address))
    try:
        systemctl("daemon-reload")
        systemctl("enable", "--runtime", SANDBOXER_UNIT)
        yield instance
    finally:
        with contextlib.suppress(Exception):
            asyncio.run(remove_all_pods(instance.address))
        systemctl("stop", CONTAINERD_UNIT, SANDBOXER_UNIT, check=False)
        systemctl("disable", "--runtime", SANDBOXER_UNIT, check=False)
        kill_task_server(short / "runc")  # KillMode=process: the task server outlives its unit's stop
        for unit in (CONTAINERD_UNIT, SANDBOXER_UNIT):
            (RUNTIME_UNITS / unit).unlink(missing_ok=True)
        systemctl("daemon-reload", check=False)
        systemctl("reset-failed", check=False)
        instance.stop()
        shutil.rmtree(short, ignore_errors=True)


async def remove_all_pods(address: str) -> None:
    async with CriClient(address, timeout=TIMEOUT) as client:
        for pod in (await client.list_pod_sandbox()).items:
            await h.remove_pod(client, pod.id)


def active(unit: str) -> str:
    return systemctl("is-active", unit, check=False).stdout.strip()


def test_a_containerd_restarted_while_the_sandboxer_is_down_waits_for_it(units: cd.ContainerdInstance,
                                                                           tmp_path: Path) -> None:
    # Starting containerd alone starts the enabled sandboxer first (WantedBy= + Before=).
    systemctl("start", CONTAINERD_UNIT)
    assert active(SANDBOXER_UNIT) == "active", journal()
    units.import_image(images.build_busybox_image(tmp_path / "busybox.tar", ref=BUSYBOX))
    units.import_image(images.build_pause_image(tmp_path / "pause.tar"))

    async def before() -> tuple[str, cri.PodSandboxConfig]:
        async with CriClient(units.address, timeout=TIMEOUT) as client:
            pod_id, pod = await h.run_pod(client, "sd-pod", tmp_path / "logs", host_network=True)
            await h.start_container(client, pod_id, pod, "first", ["sleep", "3600"])
            return pod_id, pod

    pod_id, pod = asyncio.run(before())

    # The sandboxer dies; systemd restarts it after RestartSec (2 s). containerd is restarted meanwhile.
    systemctl("kill", "--kill-whom=main", "--signal=SIGKILL", SANDBOXER_UNIT)
    systemctl("restart", CONTAINERD_UNIT)
    assert active(SANDBOXER_UNIT) == "active", journal()

    async def after() -> None:
        async with CriClient(units.address, timeout=TIMEOUT) as client:
            status = (await client.pod_sandbox_status(pod_id)).status
            assert status.state == cri.SANDBOX_READY
            listed = {p.id: p.state for p in (await client.list_pod_sandbox()).items}
            assert listed == {pod_id: cri.SANDBOX_READY}, journal()
            # The symptom of the gap: a pod containerd took for unknown refuses new containers.
            cid = await h.start_container(client, pod_id, pod, "second", ["sleep", "3600"])
            await h.wait_state(client, cid, cri.CONTAINER_RUNNING)

    asyncio.run(after())
