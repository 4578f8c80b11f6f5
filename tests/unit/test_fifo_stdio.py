"""Opening containerd's stdout/stderr FIFOs for a container: with or without a reader there yet.

containerd's fifo package opens its read end in a goroutine, so under load the sandboxer can get to the
FIFO first; a plain O_WRONLY|O_NONBLOCK open then fails with ENXIO (found by tests/integration/test_churn.py).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from kuasar.common.fifo_stdio import ProcessIO, open_fifo_for_writing


def test_fifo_with_a_reader_is_opened_write_only(tmp_path: Path) -> None:
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fd = open_fifo_for_writing(str(fifo))
        assert os.get_blocking(fd)
        os.write(fd, b"out")
        os.close(fd)
        assert os.read(reader, 16) == b"out"
    finally:
        os.close(reader)


def test_fifo_whose_reader_comes_late_is_opened_and_keeps_early_output(tmp_path: Path) -> None:
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    fd = open_fifo_for_writing(str(fifo))  # no reader yet: no ENXIO
    os.write(fd, b"early")  # no EPIPE either: it waits in the pipe
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert os.read(reader, 16) == b"early"
        os.close(fd)
        assert os.read(reader, 16) == b""  # and the reader still sees EOF once the writer is gone
    finally:
        os.close(reader)


def test_output_survives_containerd_closing_its_read_end_until_the_process_is_deleted(tmp_path: Path) -> None:
    # containerd's reads stop while it restarts. The container held the only write end and nothing
    # held a read end, so its next write killed it with SIGPIPE (EPIPE here, Python ignores SIGPIPE).
    paths = {name: tmp_path / name for name in ("stdout", "stderr")}
    containerd = {}
    for name, path in paths.items():
        os.mkfifo(path)
        containerd[name] = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    io = ProcessIO(stdout=str(paths["stdout"]), stderr=str(paths["stderr"]))
    stdio = io.runc_stdio()
    container = [os.dup(stdio.stdout), os.dup(stdio.stderr)]  # what runc hands on to the container
    io.release_fds()
    try:
        for fd in containerd.values():
            os.close(fd)  # containerd goes away
        for fd in container:
            assert os.write(fd, b"while containerd restarts\n") == 26
        again = os.open(paths["stdout"], os.O_RDONLY | os.O_NONBLOCK)  # containerd is back
        assert os.read(again, 64) == b"while containerd restarts\n"
        os.close(again)
        io.close()  # the process is deleted: our read ends go
        with pytest.raises(BrokenPipeError):
            os.write(container[0], b"x")
    finally:
        for fd in container:
            os.close(fd)


def _fds_on(path: Path) -> list[int]:
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                found.append(int(name))
        except OSError:
            pass
    return found


def test_a_terminal_whose_stdin_cannot_be_opened_leaves_no_fd_on_its_stdout(tmp_path: Path) -> None:
    # The stdout copy was made, then opening stdin failed and the IO was closed in the same loop step:
    # the copy's task was cancelled before it first ran, so the code that closed its FIFO never ran.
    stdout = tmp_path / "stdout"
    os.mkfifo(stdout)
    containerd = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)

    async def scenario() -> None:
        master, replica = os.openpty()
        io = ProcessIO(stdin=str(tmp_path / "no-such-stdin"), stdout=str(stdout), terminal=True)
        with pytest.raises(FileNotFoundError):
            io.attach_master(master)
        io.close()
        await asyncio.sleep(0.05)
        os.close(replica)  # the master went with the IO

    try:
        asyncio.run(scenario())
        assert _fds_on(stdout) == [containerd]
    finally:
        os.close(containerd)


def test_stdin_ends_only_at_close_io_not_when_containerd_goes(tmp_path: Path) -> None:
    # containerd's write end goes with containerd (a restart, a crash): when it was the only one, the
    # process read end of input there, and a shell reading it exited. As under containerd's shim,
    # CloseIO (or the process's deletion) is what ends it.
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    containerd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # CRI opens its end before Create
    io = ProcessIO(stdin=str(fifo))
    stdio = io.runc_stdio()
    process_end = os.dup(stdio.stdin)
    io.release_fds()  # runc has it now
    os.set_blocking(process_end, False)
    try:
        os.write(containerd, b"typed")
        os.close(containerd)  # containerd is gone
        assert os.read(process_end, 16) == b"typed"
        with pytest.raises(BlockingIOError):  # no end of input: a write end is still held
            os.read(process_end, 16)
        again = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # a containerd back up finds a reader
        os.write(again, b"more")
        os.close(again)
        assert os.read(process_end, 16) == b"more"
        io.close_stdin()
        assert os.read(process_end, 16) == b""
        io.close()  # and nothing twice
    finally:
        os.close(process_end)


def test_a_deleted_process_leaves_no_write_end_of_its_stdin(tmp_path: Path) -> None:
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    io = ProcessIO(stdin=str(fifo))
    before = set(os.listdir("/proc/self/fd"))
    stdio = io.runc_stdio()
    assert io.stdin_writer >= 0 and stdio.stdin in io.fds
    io.close()
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_close_io_before_start_leaves_no_write_end_to_hold(tmp_path: Path) -> None:
    # CRI's attach sends CloseIO as soon as its input is done, which can be before Start opens the FIFOs:
    # the write end Start then took was held until Delete, and the process never read end of input.
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    containerd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    io = ProcessIO(stdin=str(fifo))
    io.close_stdin()
    stdio = io.runc_stdio()
    process_end = os.dup(stdio.stdin)
    io.release_fds()
    os.set_blocking(process_end, False)
    try:
        assert io.stdin_writer < 0
        os.close(containerd)
        assert os.read(process_end, 16) == b""
    finally:
        os.close(process_end)
        io.close()
