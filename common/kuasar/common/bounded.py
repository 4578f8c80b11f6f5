"""Run one coroutine per item, at most `limit` at a time, and wait for all of them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

# How many leftover containers a task server just started deletes at once. A runtime's forced delete
# of a running container mostly waits (runc polls ~100 ms for the killed init), so one at a time made a
# task server that died with a few hundred containers take longer to sweep than its successor then had
# to start (a fixed 20 s; now task_server.START_CAP, but containerd waits on a slow start all the
# same). The runtimes' processes mostly sleep, so this many cost little.
SWEEP_CONCURRENCY = 16


async def each_bounded(items: Iterable[T], action: Callable[[T], Awaitable[None]], limit: int) -> None:
    """`action(item)` for every item, `limit` at a time; an exception of one cancels the rest."""
    slots = asyncio.Semaphore(limit)

    async def one(item: T) -> None:
        async with slots:
            await action(item)

    async with asyncio.TaskGroup() as group:
        for item in items:
            group.create_task(one(item))
