"""KeyedLocks' shared and exclusive holds: shared ones together, an exclusive one alone, first come
first served, and a waiter cancelled at any point leaves the lock to the others."""

from __future__ import annotations

import asyncio

import pytest

from kuasar.common.keyed_locks import KeyedLocks


class Holders:
    """Holds of one key that stay until released, recording who holds at once."""

    def __init__(self) -> None:
        self.locks = KeyedLocks()
        self.inside: set[str] = set()
        self.order: list[str] = []
        self.overlaps: list[frozenset[str]] = []
        self._release: dict[str, asyncio.Event] = {}

    def hold(self, name: str, shared: bool) -> asyncio.Task[None]:
        self._release[name] = asyncio.Event()

        async def holding() -> None:
            async with self.locks.hold("id", shared):
                self.inside.add(name)
                self.order.append(name)
                if len(self.inside) > 1:
                    self.overlaps.append(frozenset(self.inside))
                await self._release[name].wait()
                self.inside.discard(name)

        return asyncio.ensure_future(holding())

    def release(self, name: str) -> None:
        self._release[name].set()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_shared_holds_overlap_and_an_exclusive_one_waits_for_all_of_them() -> None:
    async def main() -> None:
        h = Holders()
        a, b = h.hold("a", shared=True), h.hold("b", shared=True)
        await settle()
        assert h.inside == {"a", "b"}
        x = h.hold("x", shared=False)
        await settle()
        assert "x" not in h.inside
        h.release("a")
        await settle()
        assert h.inside == {"b"}  # one shared holder left is enough to keep it out
        h.release("b")
        await settle()
        assert h.inside == {"x"}
        h.release("x")
        await asyncio.gather(a, b, x)
        assert h.overlaps == [frozenset({"a", "b"})]
        assert len(h.locks) == 0
    asyncio.run(main())


def test_a_waiting_exclusive_hold_keeps_later_shared_ones_out_until_it_is_done() -> None:
    # Shared holders coming one after another (exec probes) must not keep a Pause or Delete out for ever.
    async def main() -> None:
        h = Holders()
        a = h.hold("a", shared=True)
        await settle()
        x = h.hold("x", shared=False)
        await settle()
        b, c = h.hold("b", shared=True), h.hold("c", shared=True)
        await settle()
        assert h.inside == {"a"}
        h.release("a")
        await settle()
        assert h.inside == {"x"}
        h.release("x")
        await settle()
        assert h.inside == {"b", "c"}  # the shared ones queued behind it go together
        h.release("b")
        h.release("c")
        await asyncio.gather(a, b, c, x)
        assert h.order == ["a", "x", "b", "c"]
        assert len(h.locks) == 0
    asyncio.run(main())


@pytest.mark.parametrize("granted_first", [False, True])
def test_a_cancelled_waiter_passes_the_lock_on(granted_first: bool) -> None:
    # Cancelled while waiting, or just after the lock was handed to it but before it ran: either way
    # the shared holders queued behind it must get the lock, and nothing may stay held.
    async def main() -> None:
        h = Holders()
        first = h.hold("first", shared=False)
        await settle()
        x = h.hold("x", shared=False)
        later = h.hold("later", shared=True)
        await settle()
        if granted_first:
            h.release("first")
            await asyncio.sleep(0)  # `first` gave the lock to x; x has not run yet
            x.cancel()
        else:
            x.cancel()
            await settle()
            h.release("first")
        await settle()
        assert h.inside == {"later"}
        h.release("later")
        await asyncio.gather(first, later)
        with pytest.raises(asyncio.CancelledError):
            await x
        assert "x" not in h.order
        assert len(h.locks) == 0
    asyncio.run(main())
