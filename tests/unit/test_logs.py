"""The daemons' log handler: lines logged in a loop step are written after it, in order, as they read then."""

from __future__ import annotations

import asyncio
import io
import logging
import os
from collections.abc import Iterator

import pytest

from kuasar.common.logs import LOG_FORMAT, AfterStepHandler


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO, AfterStepHandler]]:
    stream = io.StringIO()
    handler = AfterStepHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"test-logs-{os.urandom(4).hex()}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield logger, stream, handler
    logger.removeHandler(handler)


def test_lines_of_a_loop_step_are_written_after_it_in_order(logged) -> None:
    logger, stream, _ = logged

    async def step() -> str:
        logger.info("one %d", 1)
        logger.warning("two")
        seen_in_step = stream.getvalue()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return seen_in_step

    assert asyncio.run(step()) == ""
    assert stream.getvalue() == "INFO one 1\nWARNING two\n"


def test_an_error_is_written_at_once_after_what_is_pending(logged) -> None:
    logger, stream, _ = logged

    async def step() -> str:
        logger.info("before")
        logger.error("broken")
        return stream.getvalue()

    assert asyncio.run(step()) == "INFO before\nERROR broken\n"
    assert stream.getvalue() == "INFO before\nERROR broken\n"  # nothing written twice


def test_outside_a_loop_lines_are_written_at_once(logged) -> None:
    logger, stream, _ = logged
    logger.info("start-up")
    assert stream.getvalue() == "INFO start-up\n"


def test_a_message_reads_as_it_did_when_logged(logged) -> None:
    logger, stream, _ = logged
    items = ["a"]

    async def step() -> None:
        logger.info("items %s", items)
        items.append("b")  # changed later in the same step

    asyncio.run(step())
    assert stream.getvalue() == "INFO items ['a']\n"


def test_flush_writes_what_is_pending(logged) -> None:
    logger, stream, handler = logged

    async def step() -> str:
        logger.info("pending")
        handler.flush()
        return stream.getvalue()

    assert asyncio.run(step()) == "INFO pending\n"


def test_a_record_keeps_the_time_it_was_made(logged) -> None:
    logger, stream, handler = logged
    handler.setFormatter(logging.Formatter("%(created).6f"))
    made: list[float] = []

    async def step() -> None:
        made.append(__import__("time").time())
        logger.info("x")
        await asyncio.sleep(0.05)

    asyncio.run(step())
    assert abs(float(stream.getvalue()) - made[0]) < 0.01


def test_a_forked_child_does_not_write_the_parents_pending_lines(logged, tmp_path) -> None:
    logger, _, _ = logged
    out = tmp_path / "child.log"
    with open(out, "w") as child_stream:
        handler = AfterStepHandler(child_stream)
        logger.addHandler(handler)

        async def step() -> int:
            logger.info("parent's line")
            pid = os.fork()
            if pid == 0:
                handler.flush()  # what a child's exit (logging.shutdown) does
                os._exit(0)
            return pid

        pid = asyncio.run(step())
        assert os.waitpid(pid, 0)[1] == 0
        logger.removeHandler(handler)
    assert out.read_text() == "parent's line\n"


def test_the_daemons_format_is_kept() -> None:
    record = logging.LogRecord("kuasar.x", logging.INFO, __file__, 1, "sandbox %s created", ("abc",), None)
    assert logging.Formatter(LOG_FORMAT).format(record).endswith(" INFO kuasar.x: sandbox abc created")


def test_a_debug_log_leaves_out_hpacks_per_header_lines() -> None:
    from kuasar.common.logs import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("hpack").level
    try:
        setup_logging("debug")
        assert logging.getLogger("kuasar.x").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("hpack.hpack").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("hpack.hpack").isEnabledFor(logging.INFO)
        setup_logging("warning")
        assert not logging.getLogger("hpack.hpack").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("hpack").setLevel(saved[2])
