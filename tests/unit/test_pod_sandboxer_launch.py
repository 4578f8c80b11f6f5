"""PodSandboxer.create: the pod's Create request leaves before Create returns; Start gets its pid."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from kuasar.common import pod_files
from kuasar.common.api.kuasar.pods.v1 import pods_pb2 as pods
from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.config import DaemonConfig
from kuasar.common.controller import SandboxController, new_record
from kuasar.common.errors import AlreadyExists, InvalidArgument, RuntimeFailure, Unimplemented
from kuasar.common.pod_sandboxer import PodSandboxer, wants_user_namespace
from kuasar.common.sandboxer import LOST_EXIT_STATUS, SandboxRecord, SandboxState
from kuasar.common.task_server import TaskServerLaunch, TaskServerSettings


class FakeTaskServer:
    """Records when a request is written; replies only when the test says so."""

    address = "unix:///fake/task.sock"

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.replies: dict[str, asyncio.Future[Any]] = {}

    def begin_call(self, method: str, request: Any, response_type: type, timeout: float | None = None
                   ) -> Coroutine[Any, Any, Any]:
        self.sent.append((method, request))
        reply = self.replies.setdefault(method, asyncio.get_running_loop().create_future())

        async def wait() -> Any:
            return await reply

        return wait()

    async def call(self, method: str, request: Any, response_type: type, timeout: float | None = None) -> Any:
        return await self.begin_call(method, request, response_type, timeout)


def make(tmp_path: Path, pod_files: bool = True, user_namespaces: bool = False) -> tuple[PodSandboxer, FakeTaskServer]:
    launch = TaskServerLaunch("kuasar.runc.task_server_main", "runc-task-server", TaskServerSettings(str(tmp_path)))
    sandboxer = PodSandboxer(DaemonConfig(listen=tmp_path / "s.sock", dir=tmp_path), launch, pod_files=pod_files,
                             user_namespaces=user_namespaces)
    fake = FakeTaskServer()
    sandboxer.task_server = fake  # type: ignore[assignment]
    return sandboxer, fake


def record(sandbox_id: str, hostname: str = "web", cgroup_parent: str = "", userns: int | None = None,
           netns: str = "", sysctls: dict[str, str] | None = None) -> SandboxRecord:
    """With `userns` (a NamespaceMode), the pod config carries CRI's userns_options in that mode; with
    `netns`, the pod's network namespace mode is POD, as CRI sends it when it made one."""
    config = cri.PodSandboxConfig(hostname=hostname)
    config.linux.cgroup_parent = cgroup_parent
    config.linux.sysctls.update(sysctls or {})
    config.linux.security_context.namespace_options.network = cri.POD if netns else cri.NODE
    if userns is not None:
        ids = cri.IDMapping(host_id=65536, container_id=0, length=65536)
        config.linux.security_context.namespace_options.userns_options.CopyFrom(
            cri.UserNamespace(mode=userns, uids=[ids], gids=[ids]))
    return new_record(sandbox_id, "runc", netns, config.SerializeToString(), {}, {}, {})


def test_create_writes_the_pod_request_before_it_returns_and_start_collects_the_pid(tmp_path: Path) -> None:
    async def main() -> None:
        sandboxer, fake = make(tmp_path)
        rec = record("a" * 64)
        await sandboxer.create(rec)
        # No yield to the loop since create returned: the request must already be out.
        assert [(m, r.id) for m, r in fake.sent] == [("Create", rec.id)]
        starting = asyncio.ensure_future(sandboxer.start(rec))
        await asyncio.sleep(0.01)
        assert not starting.done()  # Start waits for the pod process
        assert (tmp_path / "pods" / rec.id / "hostname").read_text() == "web\n"
        fake.replies["Create"].set_result(pods.CreatePodResponse(pid=4242))
        result = await starting
        assert (result.pid, result.version) == (4242, 3)

    asyncio.run(main())


def test_a_pod_launched_before_a_restart_is_adopted(tmp_path: Path) -> None:
    async def main() -> None:
        sandboxer, fake = make(tmp_path)
        rec = record("b" * 64)
        starting = asyncio.ensure_future(sandboxer.start(rec))  # no Create in this process's lifetime
        await asyncio.sleep(0)
        fake.replies["Create"].set_exception(AlreadyExists("pod exists"))
        await asyncio.sleep(0.01)
        assert [m for m, _ in fake.sent] == ["Create", "Status"]
        fake.replies["Status"].set_result(pods.PodStatus(id=rec.id, pid=77))
        assert (await starting).pid == 77

    asyncio.run(main())


@pytest.mark.parametrize("pod_files", [True, False])
@pytest.mark.parametrize("bad", [{"hostname": "evil\nhost"}, {"cgroup_parent": "kubepods--pod1.slice"}])
def test_bad_pod_config_is_refused_before_any_request(tmp_path: Path, pod_files: bool, bad: dict) -> None:
    async def main() -> None:
        sandboxer, fake = make(tmp_path, pod_files)
        with pytest.raises(InvalidArgument):
            await sandboxer.create(record("c" * 64, **bad))
        assert fake.sent == [] and not (tmp_path / "pods").exists()

    asyncio.run(main())


def test_a_type_without_pod_files_leaves_the_pod_directory_to_its_task_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # gVisor's task server makes its sandbox bundle in that directory while Create is answered.
    monkeypatch.setattr(pod_files, "HOST_HOSTS", tmp_path)  # reading it would fail: it is a directory

    async def main() -> None:
        sandboxer, fake = make(tmp_path, pod_files=False)
        rec = record("d" * 64)
        await sandboxer.create(rec)
        fake.replies["Create"].set_result(pods.CreatePodResponse(pid=9))
        assert (await sandboxer.start(rec)).pid == 9
        assert not (tmp_path / "pods").exists()

    asyncio.run(main())


def test_a_user_namespace_is_asked_for_only_by_userns_options_in_mode_pod() -> None:
    def config(mode: int | None) -> cri.PodSandboxConfig:
        pod = cri.PodSandboxConfig()
        pod.ParseFromString(record("u" * 64, userns=mode).pod_config_bytes)
        return pod

    # Unset options read as mode POD (the enum's zero): only their presence counts.
    assert [wants_user_namespace(config(m)) for m in (None, cri.NODE, cri.POD)] == [False, False, True]


def test_a_user_namespaced_pod_joins_its_netns_owner_where_the_type_supports_it(tmp_path: Path) -> None:
    async def main() -> None:
        sandboxer, fake = make(tmp_path, user_namespaces=True)
        await sandboxer.create(record("e" * 64, userns=cri.POD, netns="/var/run/netns/cni-1"))
        await sandboxer.create(record("f" * 64, userns=cri.NODE, netns="/var/run/netns/cni-2"))
        assert [(r.netns_path, r.userns) for _, r in fake.sent] == [
            ("/var/run/netns/cni-1", True), ("/var/run/netns/cni-2", False)]
        # containerd makes the pod's netns inside its user namespace: without one there is nothing to join.
        with pytest.raises(InvalidArgument, match="needs its own network namespace"):
            await sandboxer.create(record("g" * 64, userns=cri.POD))
        assert len(fake.sent) == 2

    asyncio.run(main())


def test_a_type_whose_containers_cannot_enter_it_refuses_a_user_namespace(tmp_path: Path) -> None:
    async def main() -> None:
        sandboxer, fake = make(tmp_path, user_namespaces=False)
        with pytest.raises(Unimplemented, match="hostUsers: false"):
            await sandboxer.create(record("h" * 64, userns=cri.POD, netns="/var/run/netns/cni-3"))
        assert fake.sent == [] and not (tmp_path / "pods").exists()
        await sandboxer.create(record("i" * 64, userns=cri.NODE, netns="/var/run/netns/cni-4"))
        assert len(fake.sent) == 1

    asyncio.run(main())


def test_the_pod_request_carries_its_sysctls_with_containerds_defaults_and_bad_ones_send_nothing(
        tmp_path: Path) -> None:
    async def main() -> None:
        sandboxer, fake = make(tmp_path)
        await sandboxer.create(record("j" * 64, netns="/var/run/netns/cni-5", sysctls={"net.core.somaxconn": "4096"}))
        await sandboxer.create(record("k" * 64, sysctls={"kernel.shm_rmid_forced": "1"}))
        assert [dict(r.sysctls) for _, r in fake.sent] == [
            {"net.core.somaxconn": "4096", "net.ipv4.ip_unprivileged_port_start": "0",
             "net.ipv4.ping_group_range": "0 2147483647"},
            {"kernel.shm_rmid_forced": "1"}]  # the host network: no defaults, and no net.* allowed
        with pytest.raises(InvalidArgument, match="own network namespace"):
            await sandboxer.create(record("l" * 64, sysctls={"net.core.somaxconn": "1"}))
        assert len(fake.sent) == 2

    asyncio.run(main())


def test_a_cancelled_start_leaves_its_pod_to_shutdown_which_waits_for_it(tmp_path: Path) -> None:
    # The task server's Create goes on after a cancelled call (ttrpc sends no cancel): a Delete sent before
    # it finished found no pod, and the pod made right after it ran on with nobody to remove it.
    async def main() -> None:
        sandboxer, fake = make(tmp_path)
        rec = record("m" * 64)
        await sandboxer.create(rec)
        starting = asyncio.ensure_future(sandboxer.start(rec))
        await asyncio.sleep(0)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        shutting = asyncio.ensure_future(sandboxer.shutdown(rec))
        await asyncio.sleep(0.01)
        assert [m for m, _ in fake.sent] == ["Create"]  # Shutdown waits for the pod being made
        fake.replies["Create"].set_result(pods.CreatePodResponse(pid=4343))
        await asyncio.sleep(0.01)
        assert [m for m, _ in fake.sent] == ["Create", "Delete"]
        fake.replies["Delete"].set_result(None)
        await shutting

    asyncio.run(main())


def test_pods_and_pod_files_of_sandboxes_without_a_record_are_removed_at_start_up(tmp_path: Path) -> None:
    # Killed after the pod's Create was sent but before the sandbox's record was saved: containerd's
    # Create failed with us and nothing would ever ask for that pod again. One whose Create is still
    # under way in the task server is not listed yet: its files name it, and Delete waits for it.
    async def main() -> None:
        sandboxer, fake = make(tmp_path)
        known, orphan, being_made = "k" * 64, "o" * 64, "f" * 64
        for pod_id in (known, orphan, being_made):
            (tmp_path / "pods" / pod_id).mkdir(parents=True)
        removing = asyncio.ensure_future(sandboxer.remove_unrecorded({known}))
        await asyncio.sleep(0)
        fake.replies["List"].set_result(pods.PodList(pods=[pods.PodStatus(id=known, pid=1),
                                                           pods.PodStatus(id=orphan, pid=2)]))
        await asyncio.sleep(0.01)
        fake.replies["Delete"].set_result(None)
        await asyncio.wait_for(removing, 5)
        assert sorted(r.id for m, r in fake.sent if m == "Delete") == [being_made, orphan]
        assert sorted(p.name for p in (tmp_path / "pods").iterdir()) == [known]

    asyncio.run(main())


def test_a_pod_that_cannot_be_removed_at_start_up_keeps_neither_us_nor_the_others_from_going_on(
        tmp_path: Path) -> None:
    class OneDeleteFails(FakeTaskServer):
        def begin_call(self, method: str, request: Any, response_type: type, timeout: float | None = None
                       ) -> Coroutine[Any, Any, Any]:
            if method == "Delete" and request.id == "a" * 64:
                self.sent.append((method, request))

                async def fail() -> Any:
                    raise RuntimeFailure("runc delete: device or resource busy")

                return fail()
            return super().begin_call(method, request, response_type, timeout)

    async def main() -> None:
        sandboxer, _ = make(tmp_path)
        fake = OneDeleteFails()
        sandboxer.task_server = fake  # type: ignore[assignment]
        for pod_id in ("a" * 64, "b" * 64):
            (tmp_path / "pods" / pod_id).mkdir(parents=True)
        removing = asyncio.ensure_future(sandboxer.remove_unrecorded(set()))
        await asyncio.sleep(0)
        fake.replies["List"].set_result(pods.PodList())
        fake.replies["Delete"] = asyncio.get_running_loop().create_future()
        fake.replies["Delete"].set_result(None)
        await asyncio.wait_for(removing, 5)
        assert [r.id for m, r in fake.sent if m == "Delete"] == ["a" * 64, "b" * 64]
        assert [p.name for p in (tmp_path / "pods").iterdir()] == ["a" * 64]  # kept with its pod

    asyncio.run(main())


def test_a_ready_pod_its_task_server_no_longer_has_is_found_exited_now(tmp_path: Path) -> None:
    # Its exit time is when it was found gone, not 0: CRI stores it, and Wait would say 1970.
    sandboxer, fake = make(tmp_path)
    gone, alive = record("a" * 64), record("b" * 64)
    for rec in (gone, alive):
        rec.state, rec.pid = SandboxState.READY, 42

    async def scenario() -> None:
        fake.replies["List"] = asyncio.get_running_loop().create_future()
        fake.replies["List"].set_result(pods.PodList(pods=[pods.PodStatus(id=alive.id, pid=42, running=True)]))
        before = time.time_ns()
        await sandboxer.recover([gone, alive])
        assert (gone.state, gone.exit_status) == (SandboxState.STOPPED, LOST_EXIT_STATUS)
        assert before <= gone.exited_at_ns <= time.time_ns()
        assert (alive.state, alive.exited_at_ns, alive.address) == (SandboxState.READY, 0, fake.address)

    asyncio.run(scenario())


def test_stop_of_a_sandbox_never_started_ends_the_pod_launched_at_create(tmp_path: Path) -> None:
    # Stop of a CREATED sandbox only marked it exited: the pod process launched at Create went on holding
    # its namespaces and cgroup (Start now refused, so nothing collected it) until a Shutdown.
    async def main() -> None:
        sandboxer, fake = make(tmp_path)
        controller = SandboxController(sandboxer, tmp_path / "sandboxes")
        rec = record("s" * 64)
        await controller.create(rec)
        fake.replies["Create"].set_result(pods.CreatePodResponse(pid=4242))
        stopping = asyncio.ensure_future(controller.stop(rec.id, 0))
        await asyncio.sleep(0.01)
        assert [m for m, _ in fake.sent] == ["Create", "Kill"]
        fake.replies["Kill"].set_result(None)
        await stopping
        assert (await asyncio.wait_for(controller.wait(rec.id), 1)).state == SandboxState.STOPPED

    asyncio.run(main())
