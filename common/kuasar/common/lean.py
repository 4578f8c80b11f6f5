"""Keep the resident daemons small: modules they never use are kept out before anything imports them.

Every module a resident process imports stays in its memory for the process's whole life, and memory
is a headline figure (see benchmarks/). Call `keep_out_unused_modules()` first thing in a daemon's
entry point, before asyncio is imported.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not at run time: this module is imported before asyncio may be, see above
    import asyncio

# The daemons talk over unix sockets and vsock only, never TLS. asyncio imports ssl whenever it can,
# which maps libssl and libcrypto (about 4 MB of one process's PSS); without it asyncio works as
# designed for Pythons built without ssl. A None entry makes `import ssl` raise ImportError.
UNUSED_MODULES = ("ssl",)


def keep_out_unused_modules() -> None:
    for name in UNUSED_MODULES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


class CollectAfterRemovals:
    """Runs a full garbage collection when fewer pods or containers are held than at the last check.

    What a removed pod or container leaves behind (its records, watchers, connection state) partly
    sits in reference cycles, which only Python's cyclic collector frees; in a daemon that makes few
    new objects that can take very long (measured: ~2,000 objects still held after 130 pods were
    removed). The daemons freeze their start-up heap (gc.freeze), so a collection walks only the
    objects made since: well under a millisecond here.
    """

    def __init__(self, held: Callable[[], int]) -> None:
        self.held = held
        self.last = held()

    def check(self) -> None:
        now = self.held()
        if now < self.last:
            gc.collect()
        self.last = now


async def serve_until(stop: asyncio.Event, interval: float, held: Callable[[], int],
                      finished: Callable[[], bool] = lambda: False) -> None:
    """A resident daemon's main wait: freeze the start-up heap, then, until `stop` is set or
    `finished()` says so at a check, look every `interval` seconds whether pods or containers were
    removed (CollectAfterRemovals)."""
    import asyncio

    gc.freeze()  # the start-up heap is never garbage: keep collections from walking (and unsharing) it
    garbage = CollectAfterRemovals(held)
    while not stop.is_set():
        try:
            async with asyncio.timeout(interval):
                await stop.wait()
        except TimeoutError:
            garbage.check()
            if finished():
                return
