"""What every Task API server answers alike, before a sandbox type's backend sees the call."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.errors import NotFound, Unimplemented
from kuasar.common.task_api import TASK_SERVICES, TaskBackend, register_task_service
from kuasar.common.ttrpc import NAMESPACE_KEY, Context
from kuasar.quark.task_relay import QuarkTaskRelay

CHECKPOINT = "/var/lib/containerd/io.containerd.grpc.v1.cri/containers/c1/checkpoint"


def context() -> Context:
    return Context("containerd.task.v3.Task", "Create", {NAMESPACE_KEY: ["k8s.io"]}, None, None, 1)


class Handlers:
    """Stands in for a TtrpcServer: keeps what is registered."""

    def __init__(self) -> None:
        self.unary: dict[tuple[str, str], Any] = {}

    def add_unary(self, service: str, method: str, request_type: type, handler: Any) -> None:
        self.unary[service, method] = handler


class Backend(TaskBackend):
    def __init__(self) -> None:
        self.created: list[str] = []

    async def create(self, req: task.CreateTaskRequest, ctx: Context) -> task.CreateTaskResponse:
        self.created.append(req.id)
        return task.CreateTaskResponse(pid=7)


@pytest.mark.parametrize("service", TASK_SERVICES)
def test_a_restore_from_a_checkpoint_never_reaches_the_backend(service: str) -> None:
    # containerd's CRI restores a checkpointed container with a Create that names the checkpoint; a
    # backend that ignored the field ran a fresh container, which containerd reported as restored.
    handlers, backend = Handlers(), Backend()
    register_task_service(handlers, backend)  # type: ignore[arg-type]
    create = handlers.unary[service, "Create"]
    ctx = context()
    with pytest.raises(Unimplemented, match="checkpoint"):
        asyncio.run(create(task.CreateTaskRequest(id="c1", bundle="/b", checkpoint=CHECKPOINT), ctx))
    assert backend.created == []
    assert asyncio.run(create(task.CreateTaskRequest(id="c1", bundle="/b"), ctx)).pid == 7
    assert backend.created == ["c1"]


def test_the_quark_relay_refuses_a_restore_before_laying_anything_out(tmp_path: Path) -> None:
    relay = QuarkTaskRelay(None, tmp_path / "sandbox")  # type: ignore[arg-type]  # never reached
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text('{"root": {"path": "rootfs"}}')
    with pytest.raises(Unimplemented, match="checkpoint"):
        asyncio.run(relay.create(task.CreateTaskRequest(id="c1", bundle=str(bundle), checkpoint=CHECKPOINT),
                                 context()))
    assert relay.containers.state == {}


class NamespacedBackend(Backend):
    def __init__(self) -> None:
        super().__init__()
        self.namespaces = {"c1": "a"}
        self.deleted: list[str] = []

    def namespace_of(self, container_id: str) -> str | None:
        return self.namespaces.get(container_id)

    async def delete(self, req: task.DeleteRequest, ctx: Context) -> task.DeleteResponse:
        self.deleted.append(req.id)
        return task.DeleteResponse(pid=7)


def in_namespace(namespace: str) -> Context:
    return Context("containerd.task.v3.Task", "Delete", {NAMESPACE_KEY: [namespace]}, None, None, 1)


def test_a_container_is_not_reached_from_another_containerd_namespace() -> None:
    # One id in two namespaces (`ctr -n a run ... c1`, then `ctr -n b run ... c1`): b's Delete reached a's
    # container, and containerd 1.6's clean-up after b's refused Create killed it.
    handlers, backend = Handlers(), NamespacedBackend()
    register_task_service(handlers, backend)  # type: ignore[arg-type]
    delete = handlers.unary["containerd.task.v3.Task", "Delete"]
    with pytest.raises(NotFound, match="namespace b"):
        asyncio.run(delete(task.DeleteRequest(id="c1"), in_namespace("b")))
    assert backend.deleted == []
    assert asyncio.run(delete(task.DeleteRequest(id="c1"), in_namespace("a"))).pid == 7
    assert asyncio.run(delete(task.DeleteRequest(id="c2"), in_namespace("b"))).pid == 7  # unknown: the backend says
    assert backend.deleted == ["c1", "c2"]


def test_a_backend_that_restores_gets_the_restore() -> None:
    class Restoring(Backend):
        restores_checkpoints = True

    handlers, backend = Handlers(), Restoring()
    register_task_service(handlers, backend)  # type: ignore[arg-type]
    create = handlers.unary[TASK_SERVICES[0], "Create"]
    assert asyncio.run(create(task.CreateTaskRequest(id="c1", bundle="/b", checkpoint=CHECKPOINT), context())).pid == 7
    assert backend.created == ["c1"]
