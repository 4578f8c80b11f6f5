"""Running a test's coroutine so that a hang is a failure, not a stuck CI job."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

TEST_TIMEOUT = 20.0


def run_bounded(coro: Awaitable[T], timeout: float = TEST_TIMEOUT) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())
