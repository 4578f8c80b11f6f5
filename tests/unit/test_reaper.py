"""The reaper keeps exits nobody asked for yet, and gives them only to the process they were."""

from __future__ import annotations

import asyncio
import os
import time

from kuasar.common.reaper import Reaper


async def _reaped_unwatched(reaper: Reaper) -> int:
    """A child that exits (status 3) and is reaped while nobody watches it; its pid."""
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    for _ in range(500):
        if pid in reaper._unclaimed:
            return pid
        await asyncio.sleep(0.01)
    raise AssertionError("the child's exit was not kept")


def test_an_exit_kept_before_the_process_was_made_is_not_its_own() -> None:
    # Pids are reused (32768 here). A kept exit went to the next watcher of the same pid: a runc
    # command, or a container whose init got that pid, was reported exited at once with the status
    # of a process that had ended long before.
    async def scenario() -> None:
        reaper = Reaper()
        reaper.install()
        pid = await _reaped_unwatched(reaper)
        same_step = reaper.watch(pid)  # as right after a spawn: the kept exit is an earlier process's
        await asyncio.sleep(0.05)
        assert not same_step.done()
        reaper.forget(pid)

        pid = await _reaped_unwatched(reaper)
        later = reaper.watch(pid, since_ns=time.monotonic_ns())  # made after that exit was reaped
        await asyncio.sleep(0.05)
        assert not later.done()
        reaper.forget(pid)

    asyncio.run(scenario())


def test_an_exit_kept_since_the_process_was_made_is_its_own() -> None:
    # A short process that ends before runc's pid file is read: its exit is kept for its watcher.
    async def scenario() -> None:
        reaper = Reaper()
        reaper.install()
        since = time.monotonic_ns()
        pid = await _reaped_unwatched(reaper)
        exited = reaper.watch(pid, since_ns=since)
        assert exited.done() and exited.result().status == 3
        assert pid not in reaper._unclaimed

    asyncio.run(scenario())
