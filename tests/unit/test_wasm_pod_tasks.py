"""WasmPodTasks: which backend, wasm or runc, creates a container and answers for it afterwards."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RuntimeFailure,
    Unimplemented,
)
from kuasar.common.task_api import TASK_METHODS, backend_method_name
from kuasar.wasm.module import NotAModule, locate_module
from kuasar.wasm.pod_tasks import NOT_ROUTED, WasmPodTasks
from kuasar.wasm.sandboxer import task_server_options
from kuasar.wasm.task_server_main import make_backend

CTX: Any = SimpleNamespace(namespace="k8s.io")


class Backend:
    """Stands for WasmTasks or RuncTasks: records what it was asked, holds what it created."""

    def __init__(self, name: str, refuse: Exception | None = None) -> None:
        self.name, self.refuse = name, refuse
        self.containers: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.attach_warmer = object()
        self.runc = SimpleNamespace(binary="sh")  # a program that is on PATH

    async def create(self, req: task.CreateTaskRequest, ctx: Any) -> task.CreateTaskResponse:
        self.calls.append(("create", req.id))
        await asyncio.sleep(0)
        if self.refuse is not None:
            raise self.refuse
        self.containers[req.id] = self.name
        return task.CreateTaskResponse(pid=1 if self.name == "wasm" else 2)

    def __getattr__(self, method: str) -> Any:
        async def call(req: Any, ctx: Any) -> str:
            self.calls.append((method, req.id))
            if req.id not in self.containers:
                raise NotFound(f"container {req.id} not found")
            return self.name
        return call

    def namespace_of(self, container_id: str) -> str | None:
        return "k8s.io" if container_id in self.containers else None

    def pod_container_ids(self, pod_id: str) -> list[str]:
        return sorted(self.containers)

    async def kill_pod_containers(self, pod_id: str, sig: int) -> None:
        self.calls.append(("kill_pod", pod_id))

    async def wait_pod_containers(self, pod_id: str, timeout: float) -> bool:
        return self.name == "wasm"

    async def remove_pod_containers(self, pod_id: str) -> None:
        self.calls.append(("remove_pod", pod_id))

    async def sweep_leftovers(self) -> None:
        self.calls.append(("sweep", ""))


BUNDLE: list[Path] = []  # the bundle every Create of the running test names


def write_bundle(directory: Path, pid_namespace_path: str = "") -> Path:
    directory.mkdir(exist_ok=True)
    pid = {"type": "pid", "path": pid_namespace_path} if pid_namespace_path else {"type": "pid"}
    (directory / "config.json").write_text(json.dumps({"linux": {"namespaces": [pid]}}))
    return directory


@pytest.fixture(autouse=True)
def bundle(tmp_path: Path) -> Iterator[Path]:
    """A spec with a PID namespace of the container's own."""
    BUNDLE[:] = [write_bundle(tmp_path / "bundle")]
    yield BUNDLE[0]
    BUNDLE.clear()


def create_request(cid: str) -> task.CreateTaskRequest:
    return task.CreateTaskRequest(id=cid, bundle=str(BUNDLE[0]))


def create(tasks: WasmPodTasks, cid: str) -> task.CreateTaskResponse:
    return asyncio.run(tasks.create(create_request(cid), CTX))


def test_an_image_without_a_module_goes_to_runc_and_each_container_is_answered_by_its_backend() -> None:
    wasm, linux = Backend("wasm"), Backend("runc")
    tasks = WasmPodTasks(wasm, linux)  # type: ignore[arg-type]
    assert create(tasks, "module").pid == 1
    wasm.refuse = NotAModule("'sleep' is no module")
    assert create(tasks, "sidecar").pid == 2
    assert wasm.calls == [("create", "module"), ("create", "sidecar")] and linux.calls == [("create", "sidecar")]
    assert tasks.containers == {"module": "wasm", "sidecar": "runc"}
    assert tasks.namespace_of("sidecar") == "k8s.io"
    for method in TASK_METHODS:
        if method in NOT_ROUTED:
            continue
        name = backend_method_name(method)
        for cid, owner in (("module", "wasm"), ("sidecar", "runc")):
            assert asyncio.run(getattr(tasks, name)(SimpleNamespace(id=cid), CTX)) == owner, method
    with pytest.raises(NotFound):  # an unknown id: the wasm backend says so
        asyncio.run(tasks.state(task.StateRequest(id="nobody"), CTX))
    assert tasks.pod_container_ids("pod") == ["module", "sidecar"]
    assert asyncio.run(tasks.wait_pod_containers("pod", 1.0)) is False  # runc's are still running
    asyncio.run(tasks.kill_pod_containers("pod", 9))
    asyncio.run(tasks.remove_pod_containers("pod"))
    asyncio.run(tasks.sweep_leftovers())
    for backend in (wasm, linux):
        assert backend.calls[-3:] == [("kill_pod", "pod"), ("remove_pod", "pod"), ("sweep", "")]


def test_one_id_is_one_container_across_both_backends_even_while_it_is_being_created() -> None:
    wasm, linux = Backend("wasm", refuse=NotAModule("no module")), Backend("runc")
    tasks = WasmPodTasks(wasm, linux)  # type: ignore[arg-type]

    async def twice() -> list[Any]:
        return await asyncio.gather(*(tasks.create(create_request("c1"), CTX) for _ in range(2)),
                                    return_exceptions=True)

    first, second = asyncio.run(twice())
    assert first.pid == 2 and isinstance(second, AlreadyExists)
    with pytest.raises(AlreadyExists):
        create(tasks, "c1")
    assert linux.calls == [("create", "c1")]


def test_without_linux_containers_or_runc_the_wasm_refusal_stands_and_runcs_own_is_joined_to_it() -> None:
    refusal = NotAModule("'/app' is not a WebAssembly module (no \\0asm header)")
    with pytest.raises(NotAModule):
        create(WasmPodTasks(Backend("wasm", refuse=refusal), None), "c1")  # type: ignore[arg-type]
    linux = Backend("runc")
    linux.runc.binary = "/no/such/runc"
    with pytest.raises(FailedPrecondition, match="not a WebAssembly module.*runc '/no/such/runc' is not installed"):
        create(WasmPodTasks(Backend("wasm", refuse=refusal), linux), "c1")  # type: ignore[arg-type]
    failing = Backend("runc", refuse=RuntimeFailure("runc create failed: exec: no such file or directory"))
    with pytest.raises(Exception) as both:
        create(WasmPodTasks(Backend("wasm", refuse=refusal), failing), "c1")  # type: ignore[arg-type]
    assert str(both.value) == ("'/app' is not a WebAssembly module (no \\0asm header); as a Linux container: "
                               "runc create failed: exec: no such file or directory")
    plain = Backend("wasm", refuse=InvalidArgument("process.args is empty"))  # not a question of kind
    with pytest.raises(InvalidArgument, match="args is empty"):
        create(WasmPodTasks(plain, Backend("runc")), "c1")  # type: ignore[arg-type]


def test_only_a_name_that_is_no_wasm_file_reads_as_a_linux_program(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sh").write_bytes(b"\x7fELF\x02\x01\x01\x00")
    (tmp_path / "broken.wasm").write_bytes(b"#!/bin/sh\n")
    (tmp_path / "future.wasm").write_bytes(b"\0asm\x0e\x00\x01\x00")
    for args in (["sleep"], ["/bin/sh"], ["bin/sh"]):
        with pytest.raises(NotAModule):
            locate_module(tmp_path, args)
    for args, reason in ((["/gone.wasm"], "not found"), (["/broken.wasm"], "no \\\\0asm header"),
                         (["/future.wasm"], "unknown version"), ([], "args is empty")):
        with pytest.raises(InvalidArgument, match=reason) as refused:
            locate_module(tmp_path, args)
        assert not isinstance(refused.value, NotAModule), args


def test_the_task_server_runs_linux_containers_with_the_configured_runc_unless_turned_off(tmp_path: Path) -> None:
    on = make_backend(task_server_options({"runc": "/opt/runc"}), None, None, tmp_path / "on")  # type: ignore[arg-type]
    assert on.linux is not None and on.linux.runc.binary == "/opt/runc"
    assert on.linux.runc.root == tmp_path / "on" / "runc"  # swept after a crash, as runc-sandboxer's
    off = make_backend(task_server_options({"linux_containers": False}), None, None, tmp_path / "off")  # type: ignore[arg-type]
    assert off.linux is None and off.wasm.settings.runtime == "wasmtime"


def test_a_linux_container_may_not_join_the_hosts_pid_namespace_a_modules_process_lives_in(tmp_path: Path) -> None:
    # kubectl debug --target of a wasm container: CRI names that container's PID namespace, the host's.
    tasks = WasmPodTasks(Backend("wasm", refuse=NotAModule("no module")), Backend("runc"))  # type: ignore[arg-type]
    module = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # a module's process
    try:
        for host in ("/proc/self/ns/pid", f"/proc/{module.pid}/ns/pid"):
            write_bundle(BUNDLE[0], host)
            with pytest.raises(FailedPrecondition, match="is the host's"):
                create(tasks, "debugger")
    finally:
        module.kill()
        module.wait()
    assert tasks.containers == {}
    # Another container's own PID namespace (a Linux target) is joined as asked.
    other = subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for _ in range(200):
            children = Path(f"/proc/{other.pid}/task/{other.pid}/children").read_text().split()
            if children:
                break
            time.sleep(0.01)
        write_bundle(BUNDLE[0], f"/proc/{children[0]}/ns/pid")
        assert create(tasks, "debugger").pid == 2
    finally:
        other.kill()
        other.wait()


def test_a_restore_goes_to_runc_without_asking_the_wasm_backend_and_is_refused_without_linux_containers() -> None:
    # Only a Linux container can have been checkpointed (a module's Checkpoint is UNIMPLEMENTED).
    wasm, linux = Backend("wasm"), Backend("runc")
    restore = task.CreateTaskRequest(id="restored", bundle=str(BUNDLE[0]), checkpoint="/var/lib/ckpt")
    assert asyncio.run(WasmPodTasks(wasm, linux).create(restore, CTX)).pid == 2  # type: ignore[arg-type]
    assert wasm.calls == [] and linux.calls == [("create", "restored")]
    with pytest.raises(Unimplemented, match="restoring from a checkpoint"):
        asyncio.run(WasmPodTasks(wasm, None).create(restore, CTX))  # type: ignore[arg-type]
    assert wasm.calls == []
