"""vm-agent's container stdio (kuasar.vmagent.stdio): what CloseIO does to stdin, and the pipes a
process's IO opens being closed again when opening them fails partway."""

from __future__ import annotations

import asyncio
import os
import socket
import tty
from pathlib import Path

import pytest

from kuasar.common.errors import InvalidArgument, RuntimeFailure
from kuasar.common.streaming_io import StreamHub
from kuasar.vmagent import stdio
from kuasar.vmagent.stdio import ProcessIO
from tests.support.aio import run_bounded as run

STDIN = "ttrpc+hvsock:///x.sock:1024?streaming_id=e1-stdin"
STDOUT = "ttrpc+hvsock:///x.sock:1024?streaming_id=e1-stdout"
# More than a pipe holds (64 KiB): the pump is still writing when CloseIO comes.
LARGE_INPUT = 200_000




def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def read_to_end(fd: int) -> bytes:
    """What the process reads from its stdin, up to end of input (blocking: run it in a thread)."""
    os.set_blocking(fd, True)
    data = b""
    try:
        while chunk := os.read(fd, 1 << 16):
            data += chunk
    finally:
        os.close(fd)
    return data


async def piped_stdin(hub: StreamHub) -> tuple[ProcessIO, int]:
    """A process's IO without a terminal, and the stdin read end the process holds."""
    io = ProcessIO(hub, stdin=STDIN)
    stdio = io.runc_stdio()
    assert stdio.stdin is not None
    process_stdin = os.dup(stdio.stdin)  # runc hands it to the process
    io.release_child_fds()
    await asyncio.sleep(0)  # the pump runs and waits for input
    return io, process_stdin


# -- CloseIO --------------------------------------------------------------------------------------------


def test_closeio_without_a_terminal_keeps_the_stdin_not_yet_written() -> None:
    # containerd sends CloseIO right after its stdin copy ended; CloseIO used to cancel the pump, and
    # what it had not written into the pipe yet (here most of it) never reached the process.
    async def scenario() -> None:
        hub = StreamHub()
        io, process_stdin = await piped_stdin(hub)
        channel = hub.input("e1-stdin")
        channel._push(b"x" * LARGE_INPUT)
        channel._push(None)  # containerd's half-close
        await asyncio.sleep(0.05)  # the pipe is full; the pump waits for the process
        io.close_stdin()
        assert len(await asyncio.to_thread(read_to_end, process_stdin)) == LARGE_INPUT
        io.close()

    run(scenario())


def test_closeio_without_a_terminal_lets_stdin_still_arriving_through() -> None:
    # The stream's data and half-close come on their own connection and may follow CloseIO; it used to
    # end the process's input at once, with none of them.
    async def scenario() -> None:
        hub = StreamHub()
        io, process_stdin = await piped_stdin(hub)
        io.close_stdin()
        await asyncio.sleep(0.01)
        channel = hub.input("e1-stdin")
        channel._push(b"late input\n")
        channel._push(None)  # the half-close is what ends the process's input
        assert await asyncio.to_thread(read_to_end, process_stdin) == b"late input\n"
        io.close()

    run(scenario())


def test_closeio_without_a_terminal_and_without_a_half_close_ends_the_input_after_a_grace(monkeypatch) -> None:
    # A client that never half-closes its stream still gets CloseIO's end of input, with what it sent.
    monkeypatch.setattr(stdio, "STDIN_CLOSE_GRACE", 0.05)

    async def scenario() -> None:
        hub = StreamHub()
        io, process_stdin = await piped_stdin(hub)
        hub.input("e1-stdin")._push(b"all there is\n")
        io.close_stdin()
        assert await asyncio.to_thread(read_to_end, process_stdin) == b"all there is\n"
        io.close()

    run(scenario())


async def terminal_io(tmp_path: Path, hub: StreamHub) -> tuple[ProcessIO, int]:
    """A terminal process's IO whose console runc has sent, and the pty's slave (the process's side)."""
    io = ProcessIO(hub, stdin=STDIN, terminal=True)
    io.listen_console(tmp_path / "console.sock")
    receiving = asyncio.create_task(io.receive_console())
    master, slave = os.openpty()
    tty.setraw(slave)
    with socket.socket(socket.AF_UNIX) as runc:  # what runc does with --console-socket
        await asyncio.to_thread(runc.connect, str(tmp_path / "console.sock"))
        socket.send_fds(runc, [b"pty"], [master])
    os.close(master)
    await receiving
    return io, slave


def test_closeio_with_a_terminal_ends_the_copy_into_the_pty_after_a_grace(tmp_path: Path, monkeypatch) -> None:
    # With a pty there is no pipe to end: without a half-close, CloseIO stops the copy into the master
    # (and closes its fd) once the grace for input still on its way is over.
    monkeypatch.setattr(stdio, "STDIN_CLOSE_GRACE", 0.05)

    async def scenario() -> None:
        io, slave = await terminal_io(tmp_path, StreamHub())
        await asyncio.sleep(0)  # the copy into the pty runs
        before = open_fds()
        io.close_stdin()
        await asyncio.sleep(0.2)
        assert io._stdin_task is not None and io._stdin_task.done()
        assert len(before - open_fds()) == 1  # its copy of the master
        io.close()
        os.close(slave)

    run(scenario())


@pytest.mark.parametrize("before_the_console", [False, True])
def test_closeio_with_a_terminal_keeps_the_stdin_sent_before_it(tmp_path: Path, before_the_console: bool) -> None:
    # CloseIO cancelled the copy into the pty, dropping what it had not written yet; one that came while
    # Start waited for runc's console (CRI's attach) released the channel with all it held, and the copy
    # made later waited on an empty one for ever.
    async def scenario() -> None:
        hub = StreamHub()
        channel = hub.input("e1-stdin")
        channel._push(b"echo hello\n")
        channel._push(None)  # containerd's half-close, then its CloseIO
        if before_the_console:
            io = ProcessIO(hub, stdin=STDIN, terminal=True)
            io.close_stdin()
            io.listen_console(tmp_path / "console.sock")
            receiving = asyncio.create_task(io.receive_console())
            master, slave = os.openpty()
            tty.setraw(slave)
            with socket.socket(socket.AF_UNIX) as runc:
                await asyncio.to_thread(runc.connect, str(tmp_path / "console.sock"))
                socket.send_fds(runc, [b"pty"], [master])
            os.close(master)
            await receiving
        else:
            io, slave = await terminal_io(tmp_path, hub)
            io.close_stdin()
        assert io._stdin_task is not None
        await asyncio.wait_for(io._stdin_task, 5)
        os.set_blocking(slave, False)
        assert os.read(slave, 100) == b"echo hello\n"
        io.close()
        os.close(slave)

    run(scenario())


# -- pipes closed when opening stdio fails ----------------------------------------------------------------


def test_failed_runc_stdio_closes_the_pipes_it_had_opened() -> None:
    # stderr cannot be opened after stdin's and stdout's pipes were made: their pumps, cancelled before
    # they ever ran, never ran their `finally`, and both pipes' pump ends stayed open in PID 1.
    async def scenario() -> None:
        hub = StreamHub()
        before = open_fds()
        io = ProcessIO(hub, stdin=STDIN, stdout=STDOUT, stderr="/nonexistent/dir/stderr.log")
        with pytest.raises(RuntimeFailure):
            io.runc_stdio()
        assert open_fds() == before

    run(scenario())


def test_refused_stream_id_closes_the_pipes_opened_before_it() -> None:
    # An output stream named like an input one is refused (InvalidArgument) by the hub: the pipe made
    # for it beforehand, and stdin's, were left open (only OSError was cleaned up).
    async def scenario() -> None:
        hub = StreamHub()
        before = open_fds()
        io = ProcessIO(hub, stdin=STDIN, stdout="ttrpc+hvsock:///x.sock:1024?streaming_id=e1-out-stdin")
        with pytest.raises(InvalidArgument):
            io.runc_stdio()
        assert open_fds() == before

    run(scenario())
