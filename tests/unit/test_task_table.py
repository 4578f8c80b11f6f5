"""ContainerTasks: what every backend answers alike, under concurrent calls for one container id."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.errors import InvalidArgument, NotFound
from kuasar.common.task_table import ContainerTasks, TaskContainer, TaskProcess, read_bundle_spec, shares_pid_namespace

CONTAINER = "c1"


@dataclass
class Container(TaskContainer):
    namespace: str = "k8s.io"
    init: TaskProcess = field(default_factory=lambda: TaskProcess("", pid=1, status=types.STOPPED))


class Events:
    def __init__(self) -> None:
        self.topics: list[str] = []

    def publish(self, topic: str, message: Any, namespace: str | None) -> None:
        self.topics.append(topic)


class Backend(ContainerTasks):
    """A backend whose removal takes a while, as `runc delete --force` does."""

    def __init__(self) -> None:
        super().__init__()
        self.events = Events()  # type: ignore[assignment]
        self.removed: list[Container] = []

    async def _remove(self, container: Any) -> None:
        await asyncio.sleep(0.05)
        self.removed.append(container)
        self._forget(container.id)

    async def create(self, container_id: str) -> Container:  # as the backends' Create: under the id's lock
        async with self._lock(container_id):
            container = self.containers[container_id] = Container(container_id, Path("/bundle"))
            return container


def delete(backend: Backend) -> Any:
    return backend.delete(task.DeleteRequest(id=CONTAINER), None)  # type: ignore[arg-type]


def test_a_second_concurrent_delete_is_not_found_and_removes_nothing_twice() -> None:
    async def main() -> None:
        backend = Backend()
        await backend.create(CONTAINER)
        first, second = await asyncio.gather(delete(backend), delete(backend), return_exceptions=True)
        assert isinstance(first, task.DeleteResponse)
        assert isinstance(second, NotFound)
        assert len(backend.removed) == 1
        assert backend.events.topics == ["/tasks/delete"]
    asyncio.run(main())


def test_a_late_delete_leaves_a_container_created_again_under_the_same_id() -> None:
    async def main() -> None:
        backend = Backend()
        old = await backend.create(CONTAINER)
        first = asyncio.ensure_future(delete(backend))
        retried = asyncio.ensure_future(delete(backend))  # waits for the first one's lock
        await first
        new = await backend.create(CONTAINER)
        with pytest.raises(NotFound):
            await retried
        assert backend.containers[CONTAINER] is new
        assert backend.removed == [old]
    asyncio.run(main())


def test_holding_refuses_a_container_deleted_while_the_caller_waited() -> None:
    async def main() -> None:
        backend = Backend()
        await backend.create(CONTAINER)

        async def start() -> None:  # what Start and Exec do
            async with backend._holding(CONTAINER):
                raise AssertionError("ran on a deleted container")

        deleting = asyncio.ensure_future(delete(backend))
        await asyncio.sleep(0)  # the Delete holds the lock now
        with pytest.raises(NotFound):
            await start()
        await deleting
    asyncio.run(main())


@pytest.mark.parametrize(("namespaces", "shared"), [
    ([{"type": "pid"}], False),  # its own: the kernel ends the rest when the init exits
    ([{"type": "network", "path": "/proc/9/ns/net"}, {"type": "pid", "path": ""}], False),
    ([{"type": "pid", "path": "/proc/9/ns/pid"}], True),  # the pod's
    ([{"type": "mount"}], True),  # none: the host's
    (None, True),
    (["pid", 3, {"type": "pid", "path": "/proc/9/ns/pid"}], True),  # what is not an OCI namespace is skipped
])
def test_a_container_shares_a_pid_namespace_unless_the_spec_gives_it_a_new_one(namespaces: Any,
                                                                                  shared: bool) -> None:
    assert shares_pid_namespace({"linux": {"namespaces": namespaces}}) is shared
    assert shares_pid_namespace({}) is True  # as containerd's shim reads a spec without `linux`


@pytest.mark.parametrize(("spec", "words"), [
    ("[]", "not a JSON object"), ('{"process": []}', "process is not a JSON object"),
    ('{"mounts": {}}', "mounts is not a JSON array"), ('{"root": {"path": 5}}', "root.path is not a string"),
    ("{nope", "not JSON"),
])
def test_a_bundle_spec_of_the_wrong_shape_is_invalid_argument(tmp_path: Path, spec: str, words: str) -> None:
    (tmp_path / "config.json").write_text(spec)
    with pytest.raises(InvalidArgument, match=words):
        read_bundle_spec(tmp_path)
    (tmp_path / "config.json").write_text('{"root": {"path": "rootfs"}, "mounts": []}')
    assert read_bundle_spec(tmp_path)["root"] == {"path": "rootfs"}


def test_pids_of_a_container_not_seen_to_stop_never_fail_nor_come_back_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    # containerd's reload after its restart takes an error or an empty list for a leaked shim and deletes the
    # task of a container that still runs (CRI then reports 255 and kubelet starts a second copy); a `runc
    # ps` right after the init exited fails or finds nothing, and a hung one held containerd's start.
    from kuasar.common import task_table
    from kuasar.common.errors import RuntimeFailure

    monkeypatch.setattr(task_table, "PIDS_TIMEOUT", 0.2)
    init = TaskProcess("", pid=4242, status=types.RUNNING)

    async def listing(pids: list[int] | None = None, error: Exception | None = None, hang: bool = False) -> list[int]:
        if hang:
            await asyncio.sleep(60)
        if error is not None:
            raise error
        return pids or []

    async def scenario() -> None:
        assert await task_table.running_pids(init, listing([1, 2])) == [1, 2]
        assert await task_table.running_pids(init, listing([])) == [4242]
        assert await task_table.running_pids(init, listing(error=RuntimeFailure("runc ps: container not running"))) \
            == [4242]
        assert await task_table.running_pids(init, listing(hang=True)) == [4242]

    asyncio.run(scenario())


def test_no_pid_is_signalled_as_no_process_not_as_our_process_group() -> None:
    # A restore's container has no pid (0) until its Start: kill(2) would take 0 for the caller's own
    # process group, the task server's. Run in a session of its own, so that it would be the only victim.
    program = ("import signal; from kuasar.common.task_table import signal_quietly; "
               "signal_quietly(0, signal.SIGTERM); print('alive')")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30,
                          start_new_session=True)
    assert (done.returncode, done.stdout.strip()) == (0, "alive"), done
