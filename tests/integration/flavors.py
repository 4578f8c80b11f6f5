"""One description per sandbox type, so a CRI scenario (containerd restart, churn) runs unchanged on each.

A `Flavor` says how to build a private stack of its type (reusing private_stack, wasm_stack and
test_gvisor_cri's app_kernel_stack), which image and commands its containers run, and how to find the
processes and state its pods would leave behind.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest

from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient, container_config, pod_config
from tests.support.setup_hints import fetched_tool_hint

from . import test_gvisor_cri as gv
from . import test_vmm_cri as vmm
from .conftest import Stack, integration_skip_reason, shim_dir
from .cri_helpers import BUSYBOX, pod_processes
from .private_stack import private_stack
from .wasm_stack import WASM_HANDLER, WASM_IMAGE, wasm_stack


@dataclass(frozen=True)
class Flavor:
    name: str
    shim: str  # containerd-shim-kuasar-<type>-v1: what containerd 2.1 needs on its PATH to re-attach
    handler: str
    image: str
    long: list[str]  # runs until stopped
    short: list[str]  # exits with code 7 after about a second
    exec: list[str]  # run in the long container; prints exec_stdout
    exec_stdout: bytes
    state_subdirs: tuple[str, ...]  # entries of the sandboxer's dir that must be empty once the pods are gone
    build: Callable[[Path, str, str, Sequence[Path], str], AbstractContextManager[Stack]]
    leftovers: Callable[[Stack, list[str]], list[int]]  # live pids of these pods' workloads
    skip: Callable[[], str | None] = lambda: None
    task_server: bool = True  # a task server (task-server.pid) holds the pods; vmm's are in the guests
    cri_timeout: float = 30.0


# containerd's fifo package opens its read end of an exec's stdout/stderr FIFO in a goroutine, after
# handing the paths over, so a task server opening first must not fail with ENXIO (common.console.open_fifo
# falls back to read-write). The churn retries such an exec so every leak check still runs, then fails.

class FifoRace(AssertionError):
    """An exec failed because the task server opened its stdout/stderr FIFO before containerd's reader."""


async def exec_sync(client: CriClient, flavor: Flavor, cid: str, races: list[str], tries: int = 3):
    """ExecSync of `flavor.exec`, retried when it hits the FIFO race (recorded in `races`, so a test can
    finish its other checks and report the race at the end)."""
    for attempt in range(tries):
        try:
            return await client.exec_sync(cid, flavor.exec, timeout=20)
        except grpc.aio.AioRpcError as err:
            details = err.details() or ""
            if "opening stdio" not in details or "No such device or address" not in details or attempt + 1 == tries:
                raise
            races.append(details)
    raise AssertionError("unreachable")


def raise_fifo_races(races: list[str]) -> None:
    if races:
        raise FifoRace(f"{len(races)} exec(s) failed opening stdio with ENXIO (retried), first: {races[0]}")


def runc_leftovers(stack: Stack, pod_ids: list[str]) -> list[int]:
    names = {f"pod-{pod_id[:11]}" for pod_id in pod_ids}  # other stacks on this machine have pods too
    return [p.pid for p in pod_processes() if p.info["name"] in names]


def wasm_leftovers(stack: Stack, pod_ids: list[str]) -> list[int]:
    from .test_wasm_cri import container_processes

    return [p.pid for p in container_processes()]


def gvisor_leftovers(stack: Stack, pod_ids: list[str]) -> list[int]:
    return [p.pid for p in gv.runsc_processes(stack.sandboxer_dir / "runsc")]


def vmm_leftovers(stack: Stack, pod_ids: list[str]) -> list[int]:
    """QEMU, vhost-device-vsock and proxy processes: everything but the sandboxer naming its directory."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.pid != stack.sandboxer.pid and proc.info["status"] != psutil.STATUS_ZOMBIE and \
                any(str(stack.sandboxer_dir) in arg for arg in proc.info["cmdline"] or []):
            found.append(proc.pid)
    return found


@contextmanager
def vmm_stack(base: Path, bridge: str, subnet: str, extra_path: Sequence[Path], log_level: str) -> Iterator[Stack]:
    """test_vmm_cri's vm_stack seen as a Stack (no shim helper: vmm's containerd restart is not tested here)."""
    with vmm.vm_stack(base, bridge=bridge, subnet=subnet) as vm:
        yield Stack(vm.containerd, vm.sandboxer, vm.socket, vm.directory, vm.log, vm.log_dir)


def gvisor_skip() -> str | None:
    return None if gv.runsc_binary() else f"gVisor's runsc is not installed ({fetched_tool_hint('runsc')})"


FLAVORS = {
    "runc": Flavor(
        "runc", "containerd-shim-kuasar-runc-v1", "kuasar-runc", BUSYBOX,
        long=["sleep", "3600"], short=["sh", "-c", "sleep 1; exit 7"],
        exec=["sh", "-c", "echo exec-$((6*7))"], exec_stdout=b"exec-42\n",
        state_subdirs=("sandboxes", "console", "runc"),
        build=lambda base, bridge, subnet, extra_path, log_level: private_stack(
            base, bridge=bridge, subnet=subnet, extra_path=extra_path, log_level=log_level),
        leftovers=runc_leftovers),
    "wasm": Flavor(
        "wasm", "containerd-shim-kuasar-wasm-v1", WASM_HANDLER, WASM_IMAGE,
        long=["/loop.wasm"], short=["/sleepexit.wasm"],
        exec=["/hello.wasm"], exec_stdout=b"hello from wasm\n",
        state_subdirs=("sandboxes",),
        build=lambda base, bridge, subnet, extra_path, log_level: wasm_stack(
            base, bridge=bridge, subnet=subnet, extra_path=extra_path, log_level=log_level),
        leftovers=wasm_leftovers),
    # Linux containers in wasm-sandboxer's pods (run with runc by its task server beside the modules).
    "wasm-linux": Flavor(
        "wasm-linux", "containerd-shim-kuasar-wasm-v1", WASM_HANDLER, BUSYBOX,
        long=["sleep", "3600"], short=["sh", "-c", "sleep 1; exit 7"],
        exec=["sh", "-c", "echo exec-$((6*7))"], exec_stdout=b"exec-42\n",
        state_subdirs=("sandboxes", "console", "runc", "pods"),
        build=lambda base, bridge, subnet, extra_path, log_level: wasm_stack(
            base, bridge=bridge, subnet=subnet, extra_path=extra_path, log_level=log_level),
        leftovers=lambda stack, pod_ids: runc_leftovers(stack, pod_ids) + wasm_leftovers(stack, pod_ids)),
    "gvisor": Flavor(
        "gvisor", "containerd-shim-kuasar-quark-v1", gv.HANDLER, BUSYBOX,  # io.containerd.kuasar-quark.v1
        long=["sleep", "3600"], short=["sh", "-c", "sleep 1; exit 7"],
        exec=["sh", "-c", "echo exec-$((6*7))"], exec_stdout=b"exec-42\n",
        state_subdirs=("sandboxes", "runsc", "pods"),
        build=lambda base, bridge, subnet, extra_path, log_level: gv.gvisor_stack(
            base, str(gv.runsc_binary()), bridge=bridge, subnet=subnet, extra_path=extra_path, log_level=log_level),
        leftovers=gvisor_leftovers, skip=gvisor_skip),
    "vmm": Flavor(
        "vmm", "containerd-shim-kuasar-vmm-v1", vmm.HANDLER, BUSYBOX,
        long=["sleep", "3600"], short=["sh", "-c", "sleep 1; exit 7"],
        exec=["sh", "-c", "echo exec-$((6*7))"], exec_stdout=b"exec-42\n",
        state_subdirs=("sandboxes", "vm"), build=vmm_stack, leftovers=vmm_leftovers, skip=vmm.vm_skip_reason,
        task_server=False, cri_timeout=vmm.TIMEOUT),
}


def flavor_stack(factory: pytest.TempPathFactory, flavor: Flavor, *, bridge: str, subnet: str,
                 with_shim: bool = False, log_level: str = "info") -> Iterator[Stack]:
    """Body of a module-scoped `stack` fixture: a private stack of `flavor`'s type, skipped when it cannot
    run here. `with_shim` puts the type's containerd-shim-kuasar-<type>-v1 helper on containerd's PATH."""
    reason = integration_skip_reason() or flavor.skip()
    if reason:
        pytest.skip(reason)
    base = factory.mktemp(f"{flavor.name}-{bridge}")
    extra_path: list[Path] = []
    if with_shim:
        extra_path.append(shim_dir(base, flavor.shim))
    with flavor.build(base, bridge, subnet, extra_path, log_level) as stack:
        yield stack


async def run_pod(client: CriClient, flavor: Flavor, name: str, log_root: Path,
                  **kwargs) -> tuple[str, cri.PodSandboxConfig]:
    uid = uuid.uuid4().hex[:12]
    config = pod_config(name, uid=uid, log_directory=str(log_root / f"{name}-{uid}"), **kwargs)
    response = await client.run_pod_sandbox(config, runtime_handler=flavor.handler)
    return response.pod_sandbox_id, config


async def start_container(client: CriClient, flavor: Flavor, pod_id: str, pod: cri.PodSandboxConfig, name: str,
                          command: list[str], stdin: bool = False) -> str:
    config = container_config(name, flavor.image, command, log_path=f"{name}.log", stdin=stdin)
    cid = (await client.create_container(pod_id, config, pod)).container_id
    await client.start_container(cid)
    return cid


def unemptied_state(stack: Stack, flavor: Flavor) -> list[str]:
    """Entries left in the sandboxer's per-pod state folders."""
    left = []
    for sub in flavor.state_subdirs:
        path = stack.sandboxer_dir / sub
        left += [f"{sub}/{entry}" for entry in (os.listdir(path) if path.is_dir() else [])]
    return left
