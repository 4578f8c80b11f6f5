"""The pty copy of the task servers (iopump): fair to the rest of the loop, and ending at a process's
exit though others still hold the pty (a background job of `kubectl exec -it`)."""

from __future__ import annotations

import asyncio
import os
import pty
from pathlib import Path

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


def test_a_process_that_exits_before_its_console_arrives_still_ends_its_output(tmp_path: Path) -> None:
    async def main() -> None:
        fifo = tmp_path / "stdout"
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        master, slave = pty.openpty()
        io = ProcessIO(stdout=str(fifo), terminal=True)
        try:
            io.process_exited()
            os.write(slave, b"early")
            io.attach_master(master)
            await io.wait_output(FINISH_LIMIT + 1)
            assert all(pump.done.done() for pump in io.pumps)
            assert os.read(reader, 100) == b"early"
        finally:
            io.close()
            os.close(slave)
            os.close(reader)

    asyncio.run(main())
