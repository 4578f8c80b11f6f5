"""SandboxController under calls for one sandbox that overlap, and under a state disk that fails or holds
files that are not records."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from kuasar.common import controller as controller_module
from kuasar.common import state
from kuasar.common.controller import SandboxController, new_record
from kuasar.common.errors import AlreadyExists, Cancelled, InvalidArgument, NotFound
from kuasar.common.keyed_locks import KeyedLocks
from kuasar.common.sandboxer import ExitInfo, SandboxRecord, SandboxState, StartResult
from tests.unit.test_sandbox_api import SID, MemorySandboxer


class SlowShutdown(MemorySandboxer):
    """A sandboxer whose Shutdown takes a while, as tearing a pod down does."""

    def __init__(self) -> None:
        super().__init__()
        self.shutdown_delay = 0.0

    async def shutdown(self, record: SandboxRecord) -> None:
        await asyncio.sleep(self.shutdown_delay)
        await super().shutdown(record)


def record() -> SandboxRecord:
    return new_record(SID, "memory", "", b"", {}, {}, {})


def files_under(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


def disk_full(*_args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


async def shutting_down(state_dir: Path, delay: float) -> tuple[SlowShutdown, SandboxController, asyncio.Future]:
    """A sandbox made, and its Shutdown under way for `delay` seconds."""
    sandboxer = SlowShutdown()
    controller = SandboxController(sandboxer, state_dir)
    await controller.create(record())
    sandboxer.shutdown_delay = delay
    return sandboxer, controller, asyncio.ensure_future(controller.shutdown(SID))


def test_update_arriving_during_shutdown_is_not_found_and_writes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        _, controller, shutting = await shutting_down(tmp_path / "state", 0.1)
        await asyncio.sleep(0.02)
        updating = asyncio.ensure_future(controller.update(SID, lambda _record: None, []))
        await shutting
        with pytest.raises(NotFound):
            await updating
        # Its save would have brought the sandbox back at the next start of the sandboxer.
        assert files_under(tmp_path / "state") == []
        restarted = SandboxController(MemorySandboxer(), tmp_path / "state")
        await restarted.recover()
        assert restarted.records == {}
    asyncio.run(main())


def test_a_retried_shutdown_leaves_a_sandbox_created_again_under_the_same_id(tmp_path: Path) -> None:
    async def main() -> None:
        sandboxer, controller, first = await shutting_down(tmp_path / "state", 0.05)
        retried = asyncio.ensure_future(controller.shutdown(SID))  # waits for the first one's lock
        await first
        sandboxer.shutdown_delay = 0.0
        await controller.create(record())  # the next RunPodSandbox reuses the id
        await retried
        assert SID in controller.records
        assert (tmp_path / "state" / SID / state.STATE_FILE).exists()
        assert sandboxer.shut == [SID]
    asyncio.run(main())


def test_locks_are_kept_only_while_a_call_holds_or_waits_for_them(tmp_path: Path) -> None:
    async def main() -> None:
        controller = SandboxController(MemorySandboxer(), tmp_path / "state")
        for _ in range(3):
            with pytest.raises(NotFound):
                await controller.start(SID)
        await controller.create(record())
        for _ in range(3):  # kubelet retrying a RunPodSandbox: one lock each, kept for good until now
            with pytest.raises(AlreadyExists):
                await controller.create(record())
        await controller.start(SID)
        assert len(controller._locks) == 0
    asyncio.run(main())


def test_keyed_locks_exclude_a_waiter_from_a_later_caller() -> None:
    async def main() -> None:
        locks, inside, overlaps = KeyedLocks(), [], []

        async def hold(name: str) -> None:
            async with locks.hold("id"):
                if inside:
                    overlaps.append((inside[0], name))
                inside.append(name)
                await asyncio.sleep(0.01)
                inside.remove(name)

        first = asyncio.ensure_future(hold("first"))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(hold("second"))  # waits
        await first
        await asyncio.gather(second, hold("third"))
        assert overlaps == []
        assert len(locks) == 0
    asyncio.run(main())


def test_wait_returns_when_saving_the_exit_fails(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(controller_module, "STOP_EXIT_TIMEOUT", 0.2)

    async def main() -> None:
        sandboxer = MemorySandboxer()
        controller = SandboxController(sandboxer, tmp_path / "state")
        await controller.create(record())
        await controller.start(SID)
        waiting = asyncio.ensure_future(controller.wait(SID))
        monkeypatch.setattr(controller.store, "save", disk_full)
        sandboxer.exits[SID].set_result(ExitInfo(3))
        done, _ = await asyncio.wait([waiting], timeout=5)
        assert done, "Wait never returned"
        assert (await waiting).exit_status == 3
    asyncio.run(main())


def test_a_started_pod_whose_record_cannot_be_saved_is_stopped_and_removed(tmp_path: Path, monkeypatch) -> None:
    # containerd forgets a sandbox whose Start failed; a pod left running then had nobody to stop it.
    async def main() -> None:
        sandboxer = MemorySandboxer()
        controller = SandboxController(sandboxer, tmp_path / "state")
        await controller.create(record())
        monkeypatch.setattr(controller.store, "save", disk_full)
        with pytest.raises(OSError, match="No space left"):
            await asyncio.wait_for(controller.start(SID), 2)
        assert sandboxer.exits[SID].result().exit_status == 137  # stopped, and its exit was seen
        assert sandboxer.shut == [SID]
        assert SID not in controller.records and files_under(tmp_path / "state") == []
        with pytest.raises(NotFound):
            await controller.wait(SID)
    asyncio.run(main())


class FailingStart(MemorySandboxer):
    def __init__(self, shutdown_fails: bool = False) -> None:
        super().__init__()
        self.shutdown_fails = shutdown_fails

    async def start(self, record: SandboxRecord) -> StartResult:
        raise InvalidArgument("the pod's sysctl could not be set")

    async def shutdown(self, record: SandboxRecord) -> None:
        await super().shutdown(record)
        if self.shutdown_fails:
            raise OSError(errno.EBUSY, "busy")


def test_a_failed_start_removes_the_sandbox_and_what_its_create_made(tmp_path: Path) -> None:
    # CRI never calls Shutdown for a sandbox whose Start failed: its record and files stayed for good.
    async def main() -> None:
        sandboxer = FailingStart()
        controller = SandboxController(sandboxer, tmp_path / "state")
        await controller.create(record())
        with pytest.raises(InvalidArgument, match="sysctl"):
            await controller.start(SID)
        assert sandboxer.shut == [SID]
        assert SID not in controller.records and files_under(tmp_path / "state") == []
        await controller.shutdown(SID)  # a late Shutdown of it succeeds and does nothing more
        assert sandboxer.shut == [SID]
    asyncio.run(main())


def test_a_failed_start_whose_removal_fails_keeps_the_record_for_a_later_shutdown(tmp_path: Path) -> None:
    async def main() -> None:
        sandboxer = FailingStart(shutdown_fails=True)
        controller = SandboxController(sandboxer, tmp_path / "state")
        await controller.create(record())
        with pytest.raises(InvalidArgument, match="sysctl"):
            await controller.start(SID)
        assert SID in controller.records and files_under(tmp_path / "state") != []
        sandboxer.shutdown_fails = False
        await controller.shutdown(SID)
        assert sandboxer.shut == [SID, SID]
        assert SID not in controller.records and files_under(tmp_path / "state") == []
    asyncio.run(main())


def test_a_create_whose_record_cannot_be_saved_leaves_no_state(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(state, "_write_all", disk_full)

    async def main() -> None:
        sandboxer = MemorySandboxer()
        controller = SandboxController(sandboxer, tmp_path / "state")
        with pytest.raises(OSError, match="No space left"):
            await controller.create(record())
        assert sandboxer.shut == [SID]  # what the sandboxer made is undone
        assert files_under(tmp_path / "state") == []  # and so is the record's directory
        assert SID not in controller.records
    asyncio.run(main())


def test_a_short_write_never_replaces_the_record(tmp_path: Path, monkeypatch) -> None:
    store = state.StateStore(tmp_path)
    store.save("abc", {"id": "abc", "version": 1})
    real_write = os.write
    # write(2) may take fewer bytes than asked (a nearly full disk); the rest must follow, not be lost.
    monkeypatch.setattr(state.os, "write", lambda fd, data: real_write(fd, bytes(data[:10])))
    store.save("abc", {"id": "abc", "version": 2, "padding": "x" * 100})
    monkeypatch.undo()
    assert store.load_all() == {"abc": {"id": "abc", "version": 2, "padding": "x" * 100}}
    assert files_under(tmp_path) == ["abc", "abc/sandbox.json"]


def started_record() -> SandboxRecord:
    started = record()
    started.state, started.pid = SandboxState.READY, 4242
    return started


def test_a_state_file_that_is_not_a_record_is_skipped_at_recovery(tmp_path: Path) -> None:
    async def main() -> None:
        store = state.StateStore(tmp_path / "state")
        store.save(SID, started_record().to_json())
        (tmp_path / "state" / ("b" * 64)).mkdir()
        (tmp_path / "state" / ("b" * 64) / state.STATE_FILE).write_text("[]")
        (tmp_path / "state" / ("c" * 64)).mkdir()
        (tmp_path / "state" / ("c" * 64) / state.STATE_FILE).write_text("{}")
        store.save("d" * 64, started_record().to_json())  # a copy of another sandbox's record
        controller = SandboxController(MemorySandboxer(), tmp_path / "state")
        await controller.recover()
        assert list(controller.records) == [SID]
    asyncio.run(main())


def test_a_sandbox_created_but_never_started_before_a_restart_is_removed_at_recovery(tmp_path: Path) -> None:
    # Its Start was under way when the sandboxer died (containerd sends it right after Create): failed for
    # containerd, which forgets the sandbox, while what that Start had made (a pod process, a VM) ran on.
    async def main() -> None:
        store = state.StateStore(tmp_path / "state")
        store.save(SID, record().to_json())
        other = started_record()
        other.id = "e" * 64
        store.save(other.id, other.to_json())
        sandboxer = MemorySandboxer()
        controller = SandboxController(sandboxer, tmp_path / "state")
        await controller.recover()
        assert sandboxer.shut == [SID]
        assert list(controller.records) == [other.id]
        assert files_under(tmp_path / "state") == [other.id, f"{other.id}/{state.STATE_FILE}"]
    asyncio.run(main())


def test_a_timeout_of_the_sandbox_types_own_is_not_reported_as_the_operation_bound(tmp_path: Path) -> None:
    class TimesOut(MemorySandboxer):
        async def start(self, record: SandboxRecord) -> StartResult:
            raise TimeoutError("connecting to the task server timed out")

    async def main() -> None:
        controller = SandboxController(TimesOut(), tmp_path / "state")
        await controller.create(record())
        with pytest.raises(TimeoutError, match="task server"):
            await controller.start(SID)
    asyncio.run(main())


def test_a_failed_update_changes_nothing(tmp_path: Path) -> None:
    class RefusesUpdates(MemorySandboxer):
        async def update(self, record: SandboxRecord, fields: list[str]) -> None:
            raise InvalidArgument("no such field")

    def apply(target: SandboxRecord) -> None:
        target.labels = {"new": "label"}
        target.extra.setdefault("extensions", {})["x"] = "y"

    async def main() -> None:
        controller = SandboxController(RefusesUpdates(), tmp_path / "state")
        await controller.create(new_record(SID, "memory", "", b"", {}, {"old": "label"}, {}))
        with pytest.raises(InvalidArgument):
            await controller.update(SID, apply, ["labels", "extensions.x"])
        current = controller.records[SID]
        assert current.labels == {"old": "label"} and "extensions" not in current.extra
        controller.save(current)  # what the next change of state writes
        assert state.StateStore(tmp_path / "state").load_all()[SID]["labels"] == {"old": "label"}
    asyncio.run(main())


def test_a_failed_update_keeps_an_exit_seen_meanwhile(tmp_path: Path) -> None:
    # The rollback restored the whole record: a pod that exited during the Update was READY again in
    # memory (stopped on disk), Stop did nothing, Wait said NOT_FOUND and the next save wrote READY.
    class ExitsDuringAFailedUpdate(MemorySandboxer):
        async def update(self, record: SandboxRecord, fields: list[str]) -> None:
            self.exits[record.id].set_result(ExitInfo(137))
            await asyncio.sleep(0.05)  # the exit watcher records it meanwhile
            raise InvalidArgument("update refused")

    async def main() -> None:
        controller = SandboxController(ExitsDuringAFailedUpdate(), tmp_path / "state")
        await controller.create(new_record(SID, "memory", "", b"", {}, {"old": "label"}, {}))
        await controller.start(SID)
        with pytest.raises(InvalidArgument):
            await controller.update(SID, lambda r: r.labels.update(new="label"), ["labels"])
        current = controller.records[SID]
        assert (current.state, current.exit_status, current.labels) == (SandboxState.STOPPED, 137, {"old": "label"})
        assert (await asyncio.wait_for(controller.wait(SID), 1)).exit_status == 137
        on_disk = state.StateStore(tmp_path / "state").load_all()[SID]
        assert (on_disk["state"], on_disk["exit_status"], on_disk["labels"]) == ("stopped", 137, {"old": "label"})
        await controller.close()
    asyncio.run(main())


def test_a_failed_start_whose_removal_failed_is_removed_by_a_restart(tmp_path: Path) -> None:
    # Marked exited before its removal failed, it was neither started nor created for a restart to remove.
    async def main() -> None:
        controller = SandboxController(FailingStart(shutdown_fails=True), tmp_path / "state")
        await controller.create(record())
        with pytest.raises(InvalidArgument):
            await controller.start(SID)
        restarted = MemorySandboxer()
        await SandboxController(restarted, tmp_path / "state").recover()
        assert restarted.shut == [SID]
        assert files_under(tmp_path / "state") == []
    asyncio.run(main())


def test_a_start_cancelled_twice_holds_the_lock_until_its_removal_is_done(tmp_path: Path) -> None:
    class Slow(MemorySandboxer):
        def __init__(self) -> None:
            super().__init__()
            self.gate = asyncio.Event()
            self.running = 0
            self.overlap = False

        async def start(self, record: SandboxRecord) -> StartResult:
            await asyncio.sleep(3600)
            raise AssertionError("not reached")

        async def shutdown(self, record: SandboxRecord) -> None:
            self.running += 1
            self.overlap |= self.running > 1
            await self.gate.wait()
            self.running -= 1
            await super().shutdown(record)

    async def main() -> None:
        sandboxer = Slow()
        controller = SandboxController(sandboxer, tmp_path / "state")
        await controller.create(record())
        starting = asyncio.create_task(controller.start(SID))
        await asyncio.sleep(0.01)
        starting.cancel()  # the client's deadline
        await asyncio.sleep(0.01)  # the removal is in the sandboxer's shutdown now
        starting.cancel()  # the server stopping
        await asyncio.sleep(0.01)
        assert not starting.done()
        other = asyncio.create_task(controller.shutdown(SID))  # the shim helper's clean-up, or containerd's
        await asyncio.sleep(0.01)
        sandboxer.gate.set()
        results = await asyncio.gather(starting, other, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError) and results[1] is None
        assert not sandboxer.overlap, "two shutdowns of one sandbox ran at once"
        assert sandboxer.shut == [SID] and SID not in controller.records
    asyncio.run(main())


def test_a_state_directory_whose_first_save_was_cut_short_is_removed_at_recovery(tmp_path: Path) -> None:
    async def main() -> None:
        store = state.StateStore(tmp_path / "state")
        store.save(SID, started_record().to_json())
        torn = tmp_path / "state" / ("t" * 64)
        torn.mkdir()
        (torn / f".{state.STATE_FILE}.tmp").write_text('{"id": ')
        controller = SandboxController(MemorySandboxer(), tmp_path / "state")
        await controller.recover()
        assert files_under(tmp_path / "state") == [SID, f"{SID}/{state.STATE_FILE}"]
    asyncio.run(main())


def test_a_failed_start_whose_removal_fails_stays_created_on_disk_for_a_restart(tmp_path: Path) -> None:
    # The save after Start failed once; the removal's Stop ended the pod and its watcher saved the exit
    # (the disk had room again), then Shutdown failed: a restart found a stopped record and kept it.
    async def main() -> None:
        sandboxer = FailingStart(shutdown_fails=True)
        sandboxer.start = MemorySandboxer.start.__get__(sandboxer)  # type: ignore[method-assign]
        controller = SandboxController(sandboxer, tmp_path / "state")
        await controller.create(record())
        real_save, calls = controller.store.save, []

        def save_fails_once(*args: object) -> None:
            calls.append(1)
            if len(calls) == 1:
                disk_full()
            real_save(*args)  # type: ignore[arg-type]

        controller.store.save = save_fails_once  # type: ignore[method-assign]
        with pytest.raises(OSError):
            await controller.start(SID)
        await asyncio.sleep(0.01)  # the watcher has seen the exit
        restarted = MemorySandboxer()
        await SandboxController(restarted, tmp_path / "state").recover()
        assert restarted.shut == [SID]
        assert files_under(tmp_path / "state") == []
    asyncio.run(main())


class RemovesUnrecorded(MemorySandboxer):
    def __init__(self) -> None:
        super().__init__()
        self.recorded: set[str] | None = None

    async def remove_unrecorded(self, recorded: set[str]) -> None:
        self.recorded = recorded
        raise RuntimeError("the task server is not answering")


def test_start_up_tells_the_type_every_recorded_id_even_unreadable_ones_and_survives_its_failure(
        tmp_path: Path) -> None:
    # A record that cannot be read must not get its pod removed as one without a record; and what a
    # type fails to remove must not keep the sandboxer from serving the sandboxes it knows.
    async def main() -> None:
        store = state.StateStore(tmp_path / "state")
        store.save(SID, started_record().to_json())
        (tmp_path / "state" / ("b" * 64)).mkdir()
        (tmp_path / "state" / ("b" * 64) / state.STATE_FILE).write_text("[]")
        sandboxer = RemovesUnrecorded()
        controller = SandboxController(sandboxer, tmp_path / "state")
        await controller.recover()
        assert sandboxer.recorded == {SID, "b" * 64}
        assert list(controller.records) == [SID]
    asyncio.run(main())


def test_a_start_replies_before_it_saves_the_sandbox_ready(tmp_path: Path) -> None:
    # Saved first, a crash between the save and the reply left a pod that containerd forgot (its Start
    # failed for it, and it never calls Shutdown then) and that a restart kept as READY for good.
    async def main() -> None:
        controller = SandboxController(MemorySandboxer(), tmp_path / "state")
        await controller.create(record())
        on_disk_at_reply: list[str] = []

        async def reply(started: SandboxRecord) -> bool:
            assert started.state == SandboxState.READY and started.pid == 4242
            on_disk_at_reply.append(json.loads((tmp_path / "state" / SID / state.STATE_FILE).read_text())["state"])
            shutil.copytree(tmp_path / "state", tmp_path / "crashed-here")  # what a kill -9 now leaves
            return True

        await controller.start(SID, reply)
        assert on_disk_at_reply == [SandboxState.CREATED]
        assert json.loads((tmp_path / "state" / SID / state.STATE_FILE).read_text())["state"] == SandboxState.READY
        # A sandboxer restarted from what the crash left removes that sandbox, as containerd's Wait
        # then learns (NotFound), so kubelet makes the pod anew rather than two of it running.
        restarted = MemorySandboxer()
        recovered = SandboxController(restarted, tmp_path / "crashed-here")
        await recovered.recover()
        assert restarted.shut == [SID] and SID not in recovered.records
        assert files_under(tmp_path / "crashed-here") == []
    asyncio.run(main())


async def not_delivered(_: SandboxRecord) -> bool:
    return False


def test_a_start_cancelled_while_its_reply_waits_for_the_client_removes_the_sandbox(tmp_path: Path) -> None:
    # A reply waiting for the client's flow-control window, the client resets the call: containerd takes
    # the Start as failed and forgets the pod.
    async def main() -> None:
        sandboxer = MemorySandboxer()
        controller = SandboxController(sandboxer, tmp_path / "state")
        await controller.create(record())
        waiting = asyncio.Event()

        async def reply(_: SandboxRecord) -> bool:
            waiting.set()
            await asyncio.sleep(3600)
            return True

        starting = asyncio.ensure_future(controller.start(SID, reply))
        await waiting.wait()
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        assert sandboxer.shut == [SID]
        assert SID not in controller.records and files_under(tmp_path / "state") == []
    asyncio.run(main())


def test_a_start_whose_reply_does_not_get_out_removes_the_sandbox(tmp_path: Path) -> None:
    async def main() -> None:
        sandboxer = MemorySandboxer()
        controller = SandboxController(sandboxer, tmp_path / "state")
        await controller.create(record())
        with pytest.raises(Cancelled, match="did not get out"):
            await controller.start(SID, not_delivered)
        assert sandboxer.exits[SID].result().exit_status == 137  # its pod was stopped
        assert sandboxer.shut == [SID]
        assert SID not in controller.records and files_under(tmp_path / "state") == []
        await controller.shutdown(SID)  # containerd's late clean-up, if any, finds nothing to do
        assert sandboxer.shut == [SID]
    asyncio.run(main())


def test_a_create_whose_reply_does_not_get_out_removes_the_sandbox(tmp_path: Path) -> None:
    async def main() -> None:
        sandboxer = MemorySandboxer()
        controller = SandboxController(sandboxer, tmp_path / "state")
        with pytest.raises(Cancelled, match="did not get out"):
            await controller.create(record(), not_delivered)
        assert sandboxer.shut == [SID]
        assert SID not in controller.records and files_under(tmp_path / "state") == []
        await controller.create(record())  # containerd may make it again under the same id
        assert SID in controller.records
    asyncio.run(main())


def test_a_start_replied_to_whose_record_cannot_be_saved_is_removed_all_the_same(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    # containerd has it READY by then; a restart would find its record created and remove it, so it goes
    # now, and containerd's Wait on it ends (NotFound): kubelet makes the pod anew.
    async def main() -> None:
        sandboxer = MemorySandboxer()
        controller = SandboxController(sandboxer, tmp_path / "state")
        await controller.create(record())
        waiting: list[asyncio.Future] = []

        async def reply(_: SandboxRecord) -> bool:
            waiting.append(asyncio.ensure_future(controller.wait(SID)))
            monkeypatch.setattr(controller.store, "save", disk_full)
            return True

        with pytest.raises(OSError, match="No space left"):
            await controller.start(SID, reply)
        assert sandboxer.exits[SID].result().exit_status == 137 and sandboxer.shut == [SID]
        assert SID not in controller.records and files_under(tmp_path / "state") == []
        with pytest.raises(NotFound):
            await asyncio.wait_for(waiting[0], 2)
    asyncio.run(main())
