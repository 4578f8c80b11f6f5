"""The per-stream receive buffer: ordering, end of stream, errors, and the full-buffer rule."""

from __future__ import annotations

import asyncio

import pytest

from kuasar.common.errors import NotFound, ResourceExhausted
from kuasar.common.ttrpc import inbox as inbox_module
from kuasar.common.ttrpc.inbox import Inbox


def test_messages_come_out_in_order_then_none_after_close() -> None:
    async def main() -> None:
        box = Inbox()
        await box.put(b"a")
        await box.put(b"")
        box.close()
        await box.put(b"dropped")  # nothing after the end
        assert [await box.get(), await box.get(), await box.get(), await box.get()] == [b"a", b"", None, None]
    asyncio.run(main())


def test_get_waits_for_a_message() -> None:
    async def main() -> None:
        box = Inbox()
        getter = asyncio.create_task(box.get())
        await asyncio.sleep(0)
        assert not getter.done()
        await box.put(b"x")
        assert await getter == b"x"
    asyncio.run(main())


def test_error_close_delivers_queued_messages_first() -> None:
    async def main() -> None:
        box = Inbox()
        await box.put(b"last words")
        box.close(NotFound("gone"))
        box.close()  # the first close wins
        assert await box.get() == b"last words"
        with pytest.raises(NotFound):
            await box.get()
    asyncio.run(main())


def test_full_buffer_waits_for_the_consumer() -> None:
    async def main() -> None:
        box = Inbox(limit=2)
        await box.put(b"1")
        await box.put(b"2")
        putter = asyncio.create_task(box.put(b"3"))
        await asyncio.sleep(0.01)
        assert not putter.done()
        assert await box.get() == b"1"
        await putter
        assert [await box.get(), await box.get()] == [b"2", b"3"]
    asyncio.run(main())


def test_buffer_left_full_fails_the_stream_with_resource_exhausted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inbox_module, "STREAM_FULL_TIMEOUT", 0.02)

    async def main() -> None:
        box = Inbox(limit=1)
        await box.put(b"1")
        await box.put(b"2")  # nobody reads: gives up after the timeout instead of blocking forever
        assert box.closed
        assert await box.get() == b"1"
        with pytest.raises(ResourceExhausted):
            await box.get()
    asyncio.run(main())
