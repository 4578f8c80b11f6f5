"""Sandbox lifecycle shared by every sandbox type: ids, locking, state transitions, persistence, Wait.

The gRPC layer (`sandbox_api.py`) only translates messages; this module decides what each call means.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import AlreadyExists, FailedPrecondition, KuasarError, NotFound
from .ids import validate_id
from .sandboxer import LOST_EXIT_STATUS, ExitInfo, Sandboxer, SandboxRecord, SandboxState, StartResult
from .state import StateStore

log = logging.getLogger(__name__)

T = TypeVar("T")

# Bounds every lifecycle step so a stuck runtime cannot wedge a sandbox's lock forever.
OPERATION_TIMEOUT = 120.0
# How long Stop waits for the watcher to record the exit after the process was killed.
STOP_EXIT_TIMEOUT = 15.0
# After the sandboxer's wait fails (e.g. the task server is briefly unreachable) retry this often.
WATCH_RETRY_DELAY = 0.5


class SandboxController:
    def __init__(self, sandboxer: Sandboxer, state_dir: Path) -> None:
        self.sandboxer = sandboxer
        self.store = StateStore(state_dir)
        self.records: dict[str, SandboxRecord] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._exited: dict[str, asyncio.Event] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}

    # -- bookkeeping -------------------------------------------------------------------------------
    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

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

    async def _bounded(self, what: str, coro: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT):
                return await coro
        except TimeoutError:
            raise KuasarError(f"{what} did not finish within {OPERATION_TIMEOUT:.0f}s") from None

    # -- start-up ----------------------------------------------------------------------------------
    async def recover(self) -> None:
        """Load persisted sandboxes and let the sandbox type re-attach to the running ones."""
        records = [SandboxRecord.from_json(data) for data in self.store.load_all().values()]
        for record in records:
            self.records[record.id] = record
        await self.sandboxer.recover(records)
        for record in records:
            self.save(record)
            if record.state == SandboxState.READY:
                self._watch(record)
            elif record.state == SandboxState.STOPPED:
                self._event(record.id).set()
        log.info("recovered %d sandboxes", len(records))

    async def close(self) -> None:
        for task in self._watchers.values():
            task.cancel()
        await asyncio.gather(*self._watchers.values(), return_exceptions=True)

    # -- API ---------------------------------------------------------------------------------------
    async def create(self, record: SandboxRecord) -> None:
        validate_id(record.id, "sandbox id")
        async with self._lock(record.id):
            if record.id in self.records:
                raise AlreadyExists(f"sandbox {record.id} already exists")
            await self._bounded("create", self.sandboxer.create(record))
            try:
                self.save(record)
            except BaseException:
                await self.sandboxer.shutdown(record)  # what create made must not outlive a failed Create
                raise
            self.records[record.id] = record
        log.info("sandbox %s created (netns=%r)", record.id, record.netns_path)

    async def start(self, sandbox_id: str) -> SandboxRecord:
        record = self.get(sandbox_id)
        async with self._lock(sandbox_id):
            if record.state == SandboxState.READY:
                return record
            if record.state != SandboxState.CREATED:
                raise FailedPrecondition(f"sandbox {sandbox_id} is {record.state}, cannot start")
            result: StartResult = await self._bounded("start", self.sandboxer.start(record))
            record.pid, record.address, record.version = result.pid, result.address, result.version
            record.labels.update(result.labels)
            record.state = SandboxState.READY
            self.save(record)
            self._watch(record)
        log.info("sandbox %s started pid=%d address=%s", sandbox_id, record.pid, record.address)
        return record

    async def wait(self, sandbox_id: str) -> SandboxRecord:
        record = self.get(sandbox_id)
        await self._event(sandbox_id).wait()
        return record

    async def stop(self, sandbox_id: str, timeout_secs: int) -> None:
        try:
            record = self.get(sandbox_id)
        except NotFound:
            return  # containerd retries Stop on removal; an unknown sandbox is already stopped
        async with self._lock(sandbox_id):
            await self._stop_locked(record, float(timeout_secs))

    async def _stop_locked(self, record: SandboxRecord, timeout: float) -> None:
        if record.state == SandboxState.STOPPED:
            return
        if record.state == SandboxState.CREATED:
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
            record = self.get(sandbox_id)
        except NotFound:
            return
        async with self._lock(sandbox_id):
            await self._stop_locked(record, 0.0)
            await self._bounded("shutdown", self.sandboxer.shutdown(record))
            self.store.remove(sandbox_id)
            self.records.pop(sandbox_id, None)
            watcher = self._watchers.pop(sandbox_id, None)
            if watcher:
                watcher.cancel()
        self._locks.pop(sandbox_id, None)
        self._exited.pop(sandbox_id, None)
        log.info("sandbox %s shut down", sandbox_id)

    async def update(self, sandbox_id: str, apply: Callable[[SandboxRecord], None], fields: list[str]) -> None:
        record = self.get(sandbox_id)
        async with self._lock(sandbox_id):
            apply(record)
            await self._bounded("update", self.sandboxer.update(record, fields))
            self.save(record)

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
        if record.id in self.records:
            self.save(record)
        self._event(record.id).set()
        log.info("sandbox %s exited status=%d", record.id, info.exit_status)


def new_record(sandbox_id: str, sandboxer: str, netns_path: str, pod_config: bytes,
               cri_metadata: dict[str, Any], labels: dict[str, str],
               annotations: dict[str, str]) -> SandboxRecord:
    return SandboxRecord(
        id=sandbox_id, sandboxer=sandboxer, netns_path=netns_path, created_at_ns=time.time_ns(),
        pod_config_b64=base64.b64encode(pod_config).decode(), cri_metadata=cri_metadata,
        labels=dict(labels), annotations=dict(annotations))
