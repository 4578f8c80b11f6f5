"""Sandbox lifecycle shared by every sandbox type: ids, locking, state transitions, persistence, Wait.

The gRPC layer (`sandbox_api.py`) only translates messages; this module decides what each call means.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from . import shim_orphans
from .errors import AlreadyExists, Cancelled, FailedPrecondition, KuasarError, NotFound, Unavailable
from .ids import validate_id
from .keyed_locks import KeyedLocks
from .sandboxer import LOST_EXIT_STATUS, ExitInfo, Sandboxer, SandboxRecord, SandboxState, StartResult
from .state import StateStore

log = logging.getLogger(__name__)

T = TypeVar("T")


class SandboxGone(NotFound):
    """The sandbox a call is for is not (or no longer) known here."""

# Bounds every lifecycle step so a stuck runtime cannot wedge a sandbox's lock forever.
OPERATION_TIMEOUT = 120.0
# How long Stop waits for the watcher to record the exit after the process was killed.
STOP_EXIT_TIMEOUT = 15.0
# After the sandboxer's wait fails (e.g. the task server is briefly unreachable) retry this often.
WATCH_RETRY_DELAY = 0.5
# A Start that failed because a helper process died under it (a task server killed during the pod's
# launch) meets the dead connection again in its removal: UNAVAILABLE. The next try reaches a new one.
DISCARD_ATTEMPTS = 2
# What a sandbox's exit watcher changes in its record, without the sandbox's lock.
LIFECYCLE_FIELDS = ("state", "exit_status", "exited_at_ns")


class SandboxController:
    def __init__(self, sandboxer: Sandboxer, state_dir: Path) -> None:
        self.sandboxer = sandboxer
        self.store = StateStore(state_dir)
        sandboxer.persist = self._persist  # type: ignore[method-assign]
        self.records: dict[str, SandboxRecord] = {}
        # Sandboxes being removed after a failed Start, or whose removal failed: their exit is not saved,
        # so that on disk they stay created, which a restart removes.
        self._discarding: set[str] = set()
        self._locks = KeyedLocks()
        self._exited: dict[str, asyncio.Event] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._orphan_sweep: asyncio.Future[None] | None = None
        self._sweep_again = False

    # -- bookkeeping -------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _holding(self, sandbox_id: str) -> AsyncIterator[SandboxRecord]:
        """The sandbox's record, with its lock held. SandboxGone if there is none, or it is gone by the
        time the lock is ours (a Shutdown that went first), even if one of the same id was made since."""
        record = self.records.get(validate_id(sandbox_id, "sandbox id"))
        if record is None:
            raise SandboxGone(f"sandbox {sandbox_id} not found")
        async with self._locks.hold(sandbox_id):
            if self.records.get(sandbox_id) is not record:
                raise SandboxGone(f"sandbox {sandbox_id} not found")
            yield record

    def _event(self, sandbox_id: str) -> asyncio.Event:
        return self._exited.setdefault(sandbox_id, asyncio.Event())

    def get(self, sandbox_id: str) -> SandboxRecord:
        validate_id(sandbox_id, "sandbox id")
        record = self.records.get(sandbox_id)
        if record is None:
            raise NotFound(f"sandbox {sandbox_id} not found")
        return record

    def save(self, record: SandboxRecord) -> None:
        self.store.save(record.id, record.to_json())

    def _persist(self, record: SandboxRecord) -> None:
        if self.records.get(record.id) is record:  # not one Shutdown removed meanwhile
            self.save(record)

    async def _bounded(self, what: str, coro: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT) as scope:
                return await coro
        except TimeoutError:
            if not scope.expired():  # the sandbox type's own timeout (a socket's, a runtime's)
                raise
            raise KuasarError(f"{what} did not finish within {OPERATION_TIMEOUT:.0f}s") from None

    # -- start-up ----------------------------------------------------------------------------------
    async def recover(self) -> None:
        """Load persisted sandboxes and let the sandbox type re-attach to the running ones."""
        for name in self.store.remove_incomplete():
            log.warning("removed %s: a sandbox's state whose first save was cut short", name)
        recorded = self.store.names()  # also those skipped below: what a bad file names is not removed
        records = []
        for name, data in self.store.load_all().items():
            try:
                record = SandboxRecord.from_json(data)
            except (AttributeError, TypeError) as exc:  # JSON, but not a record: one bad file must not stop us
                log.error("skipping state of sandbox %s: not a sandbox record (%s)", name, exc)
                continue
            if record.id != name:
                log.error("skipping state of sandbox %s: it is the record of %r", name, record.id)
                continue
            records.append(record)
        for record in records:
            self.records[record.id] = record
        await self.sandboxer.recover(records)
        for record in records:
            if record.state == SandboxState.CREATED:
                # Made, and never started while we ran: a Start under way when we stopped has failed
                # for containerd (it follows Create at once), and containerd forgets such a sandbox.
                # What that Start had made yet (a pod process, a VM) would run on for good.
                log.warning("sandbox %s: created but not started before a restart; removing it", record.id)
                await self._discard(record)
                continue
            self.save(record)
            if record.state == SandboxState.READY:
                self._watch(record)
            elif record.state == SandboxState.STOPPED:
                self._event(record.id).set()
        try:
            await self._bounded("removing what has no record", self.sandboxer.remove_unrecorded(recorded))
        except Exception as exc:  # noqa: BLE001 - serving the sandboxes we know matters more
            log.error("removing what sandboxes without a record left: %s", exc)
        await self.remove_shim_orphans()
        log.info("recovered %d sandboxes", len(self.records))

    async def remove_shim_orphans(self) -> None:
        """Shut down the sandboxes the containerd 1.6/1.7 forwarding shim made whose owner containerd has
        deleted (shim_orphans.py)."""
        for sandbox_id in shim_orphans.orphans(list(self.records.values())):
            record = self.records.get(sandbox_id)
            # Checked again right before: an earlier removal may have taken long, and the owner's
            # bundle may be back meanwhile (`ctr run` of the same id rejoins a ready sandbox).
            if record is None or not shim_orphans.orphans([record]):
                continue
            log.warning("sandbox %s: its owner's bundle is gone (the forwarding shim could not remove it); "
                        "removing it", sandbox_id)
            try:
                await self.shutdown(sandbox_id)
            except Exception as exc:  # noqa: BLE001 - the next sweep tries again
                log.error("sandbox %s: removing the orphan: %s", sandbox_id, exc)

    async def close(self) -> None:
        if self._orphan_sweep is not None:
            self._orphan_sweep.cancel()
            await asyncio.gather(self._orphan_sweep, return_exceptions=True)
        for task in self._watchers.values():
            task.cancel()
        await asyncio.gather(*self._watchers.values(), return_exceptions=True)

    # -- API ---------------------------------------------------------------------------------------
    async def create(self, record: SandboxRecord,
                     reply: Callable[[SandboxRecord], Awaitable[bool]] | None = None) -> None:
        """Make a sandbox and save its record; then, with `reply`, answer the caller, and remove the
        sandbox again if that answer does not get out: containerd would forget it (see `start`)."""
        validate_id(record.id, "sandbox id")
        async with self._locks.hold(record.id):
            if record.id in self.records:
                raise AlreadyExists(f"sandbox {record.id} already exists")
            await self._bounded("create", self.sandboxer.create(record))
            try:
                self.save(record)
            except BaseException:
                await self.sandboxer.shutdown(record)  # what create made must not outlive a failed Create
                self.store.remove(record.id)
                raise
            self.records[record.id] = record
            if reply is not None and not await self._replied(record, reply):
                log.warning("sandbox %s: the reply to its Create did not get out (the client is gone); "
                            "removing it", record.id)
                await self._discard_to_the_end(record)
                raise Cancelled(f"sandbox {record.id}: the reply to its Create did not get out")
        log.info("sandbox %s created (netns=%r)", record.id, record.netns_path)
        if shim_orphans.made_by_the_shim(record):
            # Off the Create's path: a sweep shuts sandboxes down, each under its own lock. One that
            # runs already goes round once more, for what was orphaned after it made its list.
            self._sweep_again = True
            if self._orphan_sweep is None:
                self._orphan_sweep = asyncio.ensure_future(self._sweep_shim_orphans())

    async def _sweep_shim_orphans(self) -> None:
        try:
            while self._sweep_again:
                self._sweep_again = False
                await self.remove_shim_orphans()
        finally:
            self._orphan_sweep = None

    async def start(self, sandbox_id: str,
                    reply: Callable[[SandboxRecord], Awaitable[bool]] | None = None) -> SandboxRecord:
        """Start a created sandbox. With `reply`, the caller's answer goes out (`reply` says whether it
        got out) before the READY record is saved: a crash between the two leaves a created record,
        which a restart removes. Saved first, a crash before the reply left a pod that containerd
        forgot (its Start failed) and we kept for good. A reply that does not get out removes the
        sandbox, for the same reason."""
        async with self._holding(sandbox_id) as record:
            if record.state == SandboxState.READY:
                return record
            if record.state != SandboxState.CREATED:
                raise FailedPrecondition(f"sandbox {sandbox_id} is {record.state}, cannot start")
            try:
                result: StartResult = await self._bounded("start", self.sandboxer.start(record))
            except BaseException:
                await self._discard_to_the_end(record)
                raise
            record.pid, record.address, record.version = result.pid, result.address, result.version
            record.labels.update(result.labels)
            record.state = SandboxState.READY
            # Watched before it is saved: if a failed save's removal fails too, the pod's exit is still seen.
            self._watch(record)
            if reply is not None and not await self._replied(record, reply):
                log.warning("sandbox %s: the reply to its Start did not get out (the client is gone); "
                            "removing it", sandbox_id)
                await self._discard_to_the_end(record)
                raise Cancelled(f"sandbox {sandbox_id}: the reply to its Start did not get out")
            try:
                self.save(record)
            except BaseException as exc:
                log.error("sandbox %s: saving its record after its Start: %s; removing it", sandbox_id, exc)
                await self._discard_to_the_end(record)
                raise
        log.info("sandbox %s started pid=%d address=%s", sandbox_id, record.pid, record.address)
        return record

    async def _replied(self, record: SandboxRecord, reply: Callable[[SandboxRecord], Awaitable[bool]]) -> bool:
        """Whether the reply got out. Cancelled while it waits for the client (it reset the call, or went):
        it did not, and the sandbox goes before the cancel is passed on."""
        try:
            return await reply(record)
        except asyncio.CancelledError:
            log.warning("sandbox %s: cancelled while its reply was on its way; removing it", record.id)
            await self._discard_to_the_end(record)
            raise

    async def _discard(self, record: SandboxRecord) -> None:
        """Remove a sandbox whose Start failed or was cut short, with all that its Create and Start made.

        containerd forgets a sandbox whose Start failed: CRI deletes it from its store and never calls
        Stop or Shutdown for it. Anything kept here would stay until the node is wiped. Called with the
        sandbox's lock held (or before the API is served). The record keeps its state until it is
        removed: if the removal fails, a restart finds it still created and tries again."""
        self._discarding.add(record.id)
        for attempt in range(1, DISCARD_ATTEMPTS + 1):
            try:
                # Stop as well: what a Start cut short had made (a process it had launched) may run.
                await self._bounded("stop", self.sandboxer.stop(record, 0.0))
                await self._bounded("shutdown", self.sandboxer.shutdown(record))
                break
            except Unavailable as exc:
                if attempt == DISCARD_ATTEMPTS:
                    log.error("sandbox %s: removing it after its failed start: %s", record.id, exc)
                    return
                log.warning("sandbox %s: removing it after its failed start: %s; trying again", record.id, exc)
            except Exception as exc:  # noqa: BLE001 - Start's own error is the one to report
                # Still in _discarding: its exit is not saved, so on disk it stays created for a restart.
                log.error("sandbox %s: removing it after its failed start: %s", record.id, exc)
                return
        self._forget(record.id)
        log.info("sandbox %s removed: its start failed or was cut short", record.id)

    async def _discard_to_the_end(self, record: SandboxRecord) -> None:
        """`_discard`, holding the caller (and the sandbox's lock with it) until it is done, however often
        the caller is cancelled meanwhile: a Shutdown let in half way would remove the sandbox twice at
        once. A cancel is passed on once the removal is done."""
        removal = asyncio.ensure_future(self._discard(record))
        cancelled = False
        while not removal.done():
            try:
                await asyncio.shield(removal)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    def _forget(self, sandbox_id: str) -> None:
        self.store.remove(sandbox_id)
        self.records.pop(sandbox_id, None)
        self._discarding.discard(sandbox_id)
        watcher = self._watchers.pop(sandbox_id, None)
        if watcher:
            watcher.cancel()
        exited = self._exited.pop(sandbox_id, None)
        if exited is not None:
            exited.set()  # a Wait still waiting learns that the sandbox is gone

    async def wait(self, sandbox_id: str) -> SandboxRecord:
        record = self.get(sandbox_id)
        await self._event(sandbox_id).wait()
        if record.state != SandboxState.STOPPED:  # removed without an exit: its Start failed
            raise NotFound(f"sandbox {sandbox_id} was removed (its start failed)")
        return record

    async def stop(self, sandbox_id: str, timeout_secs: int) -> None:
        try:
            async with self._holding(sandbox_id) as record:
                await self._stop_locked(record, float(timeout_secs))
        except SandboxGone:
            return  # containerd retries Stop on removal; an unknown sandbox is already stopped

    async def _stop_locked(self, record: SandboxRecord, timeout: float) -> None:
        if record.state == SandboxState.STOPPED:
            return
        if record.state == SandboxState.CREATED:
            # A type may have launched the pod at Create (runc, wasm, gVisor: their pod process): it goes
            # now, not at Shutdown, or a stopped sandbox would hold its namespaces and cgroup meanwhile.
            await self._bounded("stop", self.sandboxer.stop(record, timeout))
            self._mark_exited(record, ExitInfo(0))
            return
        await self._bounded("stop", self.sandboxer.stop(record, timeout))
        try:
            async with asyncio.timeout(STOP_EXIT_TIMEOUT + timeout):
                await self._event(record.id).wait()
        except TimeoutError:
            log.error("sandbox %s: exit not observed after stop; reporting it lost", record.id)
            self._mark_exited(record, ExitInfo(LOST_EXIT_STATUS))
        log.info("sandbox %s stopped exit_status=%d", record.id, record.exit_status)

    async def shutdown(self, sandbox_id: str) -> None:
        try:
            async with self._holding(sandbox_id) as record:
                await self._stop_locked(record, 0.0)
                await self._bounded("shutdown", self.sandboxer.shutdown(record))
                self._forget(sandbox_id)
        except SandboxGone:
            return
        log.info("sandbox %s shut down", sandbox_id)

    async def update(self, sandbox_id: str, apply: Callable[[SandboxRecord], None], fields: list[str]) -> None:
        async with self._holding(sandbox_id) as record:
            before = copy.deepcopy(record.to_json())  # `apply` may change the record's dicts in place
            apply(record)
            try:
                await self._bounded("update", self.sandboxer.update(record, fields))
                self.save(record)
            except BaseException:  # a failed Update changes nothing, not even what a later save writes
                # ... but what the exit watcher, which holds no lock, recorded meanwhile stays.
                lifecycle = {name: getattr(record, name) for name in LIFECYCLE_FIELDS}
                vars(record).update(vars(SandboxRecord.from_json(before)))
                vars(record).update(lifecycle)
                if record.state != before["state"]:  # saved then with the update's fields: again without
                    with contextlib.suppress(OSError):
                        self.save(record)
                raise

    # -- exit tracking -----------------------------------------------------------------------------
    def _watch(self, record: SandboxRecord) -> None:
        event = self._event(record.id)
        event.clear()
        self._watchers[record.id] = asyncio.create_task(self._watcher(record), name=f"watch-{record.id}")

    async def _watcher(self, record: SandboxRecord) -> None:
        while True:
            try:
                info = await self.sandboxer.wait(record)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep watching: a transient failure must not lose the exit
                log.warning("sandbox %s: wait failed (%s); retrying", record.id, exc)
                await asyncio.sleep(WATCH_RETRY_DELAY)
        self._mark_exited(record, info)

    def _mark_exited(self, record: SandboxRecord, info: ExitInfo) -> None:
        if record.state == SandboxState.STOPPED:
            return
        record.state = SandboxState.STOPPED
        record.exit_status, record.exited_at_ns = info.exit_status, info.exited_at_ns
        # Not while a failed Start's removal runs: on disk it stays created, for a restart to remove.
        if self.records.get(record.id) is record and record.id not in self._discarding:
            try:
                self.save(record)
            except OSError as exc:  # a full disk must not keep Wait waiting for an exit already seen;
                # a restart still finds the pod gone (recover reports a lost READY one exited)
                log.error("sandbox %s: its exit could not be saved: %s", record.id, exc)
        self._event(record.id).set()
        log.info("sandbox %s exited status=%d", record.id, info.exit_status)


def new_record(sandbox_id: str, sandboxer: str, netns_path: str, pod_config: bytes,
               cri_metadata: dict[str, Any], labels: dict[str, str],
               annotations: dict[str, str]) -> SandboxRecord:
    return SandboxRecord(
        id=sandbox_id, sandboxer=sandboxer, netns_path=netns_path, created_at_ns=time.time_ns(),
        pod_config_b64=base64.b64encode(pod_config).decode(), cri_metadata=cri_metadata,
        labels=dict(labels), annotations=dict(annotations))
