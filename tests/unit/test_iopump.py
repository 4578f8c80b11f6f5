"""The pty copy of the task servers (iopump): fair to the rest of the loop, and ending at a process's
exit though others still hold the pty (a background job of `kubectl exec -it`)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from kuasar.common import iopump
from kuasar.common.fifo_stdio import ProcessIO
from kuasar.common.iopump import FINISH_LIMIT, Pump


def test_a_copy_that_never_waits_still_lets_the_loop_run_everything_else() -> None:
    async def main() -> None:
        src, dst = os.open("/dev/zero", os.O_RDONLY), os.open("/dev/null", os.O_WRONLY)
        pump = Pump(src, dst)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.3)
        pump.cancel()
        await asyncio.wait_for(pump.done, 1)  # it stopped, and closed both
        ticking.cancel()
        assert ticks >= 5, f"the loop ran {ticks} ticks of 10 ms in 300 ms beside the copy"

    asyncio.run(main())


def test_a_finished_copy_delivers_what_was_written_then_ends_while_the_pty_is_still_held() -> None:
    async def main() -> None:
        master, slave = pty.openpty()
        read_end, write_end = os.pipe()
        try:
            pump = Pump(master, write_end)
            os.write(slave, b"last words")
            await asyncio.sleep(0.1)
            assert not pump.done.done()  # the slave is held (a background job): no end of file
            os.write(slave, b", and more")
            pump.finish()  # the process exited
            await asyncio.wait_for(pump.done, FINISH_LIMIT + 1)
            assert os.read(read_end, 100).replace(b"\r\n", b"\n") == b"last words, and more"
            assert os.read(read_end, 100) == b""  # its copy of the write end is closed
        finally:
            os.close(slave)
            os.close(read_end)

    asyncio.run(main())


@contextlib.contextmanager
def terminal_io(tmp_path: Path) -> Iterator[tuple[ProcessIO, int, int, int]]:
    """A terminal process's IO to a stdout FIFO containerd reads: (io, master, slave, containerd's reader);
    the master is io's once attached."""
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    master, slave = pty.openpty()
    io = ProcessIO(stdout=str(fifo), terminal=True)
    try:
        yield io, master, slave, reader
    finally:
        io.close()
        os.close(slave)
        os.close(reader)


def test_a_process_that_exits_before_its_console_arrives_still_ends_its_output(tmp_path: Path) -> None:
    async def main() -> None:
        with terminal_io(tmp_path) as (io, master, slave, reader):
            io.process_exited()
            os.write(slave, b"early")
            io.attach_master(master)
            await asyncio.wait([pump.done for pump in io.pumps], timeout=FINISH_LIMIT + 1)
            assert all(pump.done.done() for pump in io.pumps)
            assert os.read(reader, 100) == b"early"

    asyncio.run(main())


def test_a_finishing_copy_to_a_slow_reader_still_delivers_everything(monkeypatch) -> None:
    # Time spent waiting for the reader (containerd behind, a slow `kubectl exec -t` client) counted
    # against the limit: the copy stopped with the process's last output still in the pty.
    monkeypatch.setattr(iopump, "FINISH_LIMIT", 0.2)
    payload = bytes(range(256)) * 64  # 16 KiB

    async def main() -> bytes:
        master, slave = pty.openpty()
        tty.setraw(slave)
        read_end, write_end = os.pipe()
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
        os.set_blocking(slave, False)
        pump = Pump(master, write_end)
        try:
            rest = payload
            while rest:
                try:
                    rest = rest[os.write(slave, rest[:1024]):]
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            pump.finish()  # the process exited; its last output is in the pty and in the pump
            os.set_blocking(read_end, False)
            got = bytearray()
            async with asyncio.timeout(20):
                while True:
                    await asyncio.sleep(0.05)  # 1 KiB per 50 ms: well past the limit
                    try:
                        chunk = os.read(read_end, 1024)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        return bytes(got)
                    got += chunk
        finally:
            os.close(slave)
            os.close(read_end)

    assert asyncio.run(main()) == payload


def test_closing_a_terminals_io_closes_the_master_only_once_its_copy_stopped_watching_it(tmp_path: Path) -> None:
    # Closed at once, the master's fd number could be reused before the cancelled copy's unwinding
    # unregistered it from the loop, taking another fd's watch away.
    async def main() -> None:
        with terminal_io(tmp_path) as (io, master, _, _):
            io.attach_master(master)
            await asyncio.sleep(0.05)  # the copy is waiting on the master
            pump = io.pumps[0]
            io.close()
            os.fstat(master)  # still open
            await asyncio.wait_for(pump.done, 1)
            await asyncio.sleep(0)
            with pytest.raises(OSError):
                os.fstat(master)

    asyncio.run(main())


def test_output_that_comes_while_the_loop_is_busy_at_the_lulls_end_is_still_copied() -> None:
    # Its readiness and the lull's end fell due in the same loop turn: the timeout won, and the process's
    # last line stayed in the pty (a 60 ms stall was enough).
    async def main() -> None:
        master, slave = pty.openpty()
        tty.setraw(slave)
        read_end, write_end = os.pipe()
        try:
            pump = Pump(master, write_end)
            pump.finish()  # the process exited...
            await asyncio.sleep(0)

            def last_words_then_a_busy_loop() -> None:
                os.write(slave, b"last line before exit\n")
                time.sleep(iopump.FINISH_LULL * 2)  # synchronous work of another pod's, say

            asyncio.get_running_loop().call_soon(last_words_then_a_busy_loop)
            await asyncio.wait_for(pump.done, FINISH_LIMIT + 1)
            assert os.read(read_end, 100) == b"last line before exit\n"
        finally:
            os.close(slave)
            os.close(read_end)

    asyncio.run(main())


def test_stdin_written_before_close_io_reaches_a_terminal_process(tmp_path: Path) -> None:
    # CloseIO cancelled the copy into the pty: what containerd had written just before (`echo cmd |
    # kubectl exec -it`) was dropped, all of it when both came in one loop turn.
    async def main() -> None:
        fifo = tmp_path / "stdin"
        os.mkfifo(fifo)
        writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # containerd's end
        master, slave = pty.openpty()
        tty.setraw(slave)
        io = ProcessIO(stdin=str(fifo), terminal=True)
        try:
            io.attach_master(master)
            os.write(writer, b"echo hello\n")
            os.close(writer)  # containerd closes its end, then sends CloseIO
            io.close_stdin()
            await asyncio.wait_for(io.stdin_pump.done, FINISH_LIMIT + 1)  # type: ignore[union-attr]
            os.set_blocking(slave, False)  # (a regression must fail, not hang)
            with contextlib.suppress(BlockingIOError):
                assert os.read(slave, 100) == b"echo hello\n"
                return
            raise AssertionError("nothing reached the terminal")
        finally:
            io.close()
            os.close(slave)

    asyncio.run(main())
