"""One asyncio lock per id (a sandbox's, a container's), kept only while someone holds or waits for it.

A plain dict of locks either grows with every id ever seen (each failed Create leaves one) or, if an
entry is dropped when its object is removed, hands a fresh lock to the next caller while an earlier
one still waits on the old: two calls for the same id then run at once. Counting the users of each
lock removes it exactly when nobody can be excluded by it any more.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # id -> (lock, holders and waiters)

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
