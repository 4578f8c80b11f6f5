"""One asyncio lock per id (a sandbox's, a container's), kept only while someone holds or waits for it.

A plain dict of locks either grows with every id ever seen (each failed Create leaves one) or, if an
entry is dropped when its object is removed, hands a fresh lock to the next caller while an earlier
one still waits on the old: two calls for the same id then run at once. Counting the users of each
lock removes it exactly when nobody can be excluded by it any more.

A lock may be held shared, by any number at once, or exclusively, by one alone (a container's execs
start side by side; what changes the whole container waits until none is starting).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class SharedLock:
    """Held shared by many or exclusively by one, granted first come, first served: an exclusive
    caller waits for the shared holders before it, and shared callers after it wait for it, so a steady
    stream of shared holders (exec probes) cannot keep it out for ever."""

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiters: deque[tuple[asyncio.Future[None], bool]] = deque()

    def _free_for(self, shared: bool) -> bool:
        return not self._exclusive and (shared or self._shared == 0)

    def _take(self, shared: bool) -> None:
        if shared:
            self._shared += 1
        else:
            self._exclusive = True

    async def acquire(self, shared: bool = False) -> None:
        if not self._waiters and self._free_for(shared):
            self._take(shared)
            return
        waiter = (asyncio.get_running_loop().create_future(), shared)
        self._waiters.append(waiter)
        try:
            await waiter[0]
        except BaseException:
            if waiter[0].done() and not waiter[0].cancelled():
                self.release(shared)  # granted just as it was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):  # (_grant drops a cancelled one it meets first)
                    self._waiters.remove(waiter)
                self._grant()  # those queued behind it may go now
            raise

    def release(self, shared: bool = False) -> None:
        if shared:
            self._shared -= 1
        else:
            self._exclusive = False
        self._grant()

    def _grant(self) -> None:
        """Hand the lock to the waiters at the head of the queue that it is free for, in order."""
        while self._waiters:
            future, shared = self._waiters[0]
            if future.done():  # cancelled, its caller not yet back to take itself off the queue
                self._waiters.popleft()
                continue
            if not self._free_for(shared):
                return
            self._waiters.popleft()
            self._take(shared)
            future.set_result(None)


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[str, tuple[SharedLock, int]] = {}  # id -> (lock, holders and waiters)

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: str, shared: bool = False) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (SharedLock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            await lock.acquire(shared)
            try:
                yield
            finally:
                lock.release(shared)
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
