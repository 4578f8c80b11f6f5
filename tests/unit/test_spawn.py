"""Running helper programs (spawn.run), reading a pipe to its end (spawn.read_to_eof), and forking
(spawn.fork)."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time

import psutil
import pytest

from kuasar.common import linux, spawn
from kuasar.common.errors import DeadlineExceeded, NotFound
from kuasar.common.reaper import Reaper
from kuasar.common.spawn import read_to_eof, run


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_run_captures_output_and_exit_status() -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.install()
        done = await run(reaper, ["sh", "-c", "echo out; printf 'err' >&2; exit 3"])
        assert (done.status, done.stdout, done.stderr) == (3, b"out\n", b"err")
        quiet = await run(reaper, ["sh", "-c", "echo hidden"], capture=False)
        assert (quiet.status, quiet.stdout) == (0, b"")

    asyncio.run(main())


def test_a_started_program_ignores_no_signal_and_its_exit_reaches_the_reaper() -> None:
    """Python ignores SIGPIPE and SIGXFSZ, and glibc's posix_spawn would leave 32 and 33 ignored: none of
    that may reach a program (runc passes it on to every container process)."""
    linux.forget_inherited_ignores()  # what a task server does first (this test may run under GNU make)

    async def main() -> None:
        reaper = Reaper()
        reaper.install()
        done = await run(reaper, ["grep", "SigIgn", "/proc/self/status"])
        assert done.status == 0 and linux.ignored_signals(done.stdout.decode()) == set(), done.stdout
        for _ in range(3):  # each run's Popen must leave the exit to the Reaper, also for the next one
            assert (await run(reaper, ["sh", "-c", "exit 4"])).status == 4

    asyncio.run(main())


def test_run_kills_a_program_that_outlives_its_timeout_and_says_so() -> None:
    """runsc's control commands hang for ever on a wedged sandbox: a run with a timeout must end them."""
    async def main() -> None:
        reaper = Reaper()
        reaper.install()
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"sleep did not finish within 0.3s and was killed"):
            await run(reaper, ["sleep", "30"], timeout=0.3)
        assert time.monotonic() - started < 5
        assert not [p for p in psutil.Process().children() if p.name() == "sleep"]  # killed and reaped
        done = await run(reaper, ["sh", "-c", "echo quick"], timeout=5)
        assert (done.status, done.stdout) == (0, b"quick\n")

    asyncio.run(main())


def test_a_cancelled_run_waits_for_its_program_until_the_timeout_only() -> None:
    """A cancel leaves the program running (runc half way through a create) and waits for it; with a
    timeout (a runsc control command cancelled by its caller's deadline), only until then."""
    async def main() -> None:
        reaper = Reaper()
        reaper.install()
        running = asyncio.create_task(run(reaper, ["sleep", "30"], timeout=0.5))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert 0.2 < time.monotonic() - started < 5  # waited, but not for the 30 s
        assert not [p for p in psutil.Process().children() if p.name() == "sleep"]

    asyncio.run(main())


def test_run_refuses_a_missing_program() -> None:
    async def main() -> None:
        with pytest.raises(NotFound):
            await run(Reaper(), ["/nonexistent/program"])

    asyncio.run(main())


def test_read_to_eof_collects_writes_that_come_in_pieces_and_closes_the_fd() -> None:
    read_fd, write_fd = os.pipe()

    def writer() -> None:
        for piece in (b"one ", b"two ", b"three"):
            os.write(write_fd, piece)
            time.sleep(0.02)
        os.close(write_fd)

    async def main() -> bytes:
        thread = threading.Thread(target=writer)
        thread.start()
        try:
            return await read_to_eof(read_fd)
        finally:
            thread.join()

    assert asyncio.run(main()) == b"one two three"
    assert not is_open(read_fd)


def test_read_to_eof_keeps_at_most_the_limit() -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"x" * 1000)

    async def main() -> bytes:
        return await read_to_eof(read_fd, 10)  # the writer is still open: the limit alone ends the read

    try:
        assert asyncio.run(main()) == b"x" * 10
        assert not is_open(read_fd)
    finally:
        os.close(write_fd)


def test_read_to_eof_closes_the_fd_when_cancelled() -> None:
    read_fd, write_fd = os.pipe()

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(read_to_eof(read_fd), 0.05)

    try:
        asyncio.run(main())
        assert not is_open(read_fd)
    finally:
        os.close(write_fd)


def test_a_process_started_by_posix_spawn_gets_glibcs_signal_32_back() -> None:
    """posix_spawn (as GNU make uses it) hands signal 32 on ignored in glibc before 2.41; a process that
    inherited it ignored (set here by the raw system call, as glibc refuses it) gets it back by
    forget_inherited_ignores."""
    script = ("from kuasar.common import linux; before = linux.ignored_signals(); linux.forget_inherited_ignores();"
              " print(sorted(before & {32, 33}), sorted(linux.ignored_signals() & {32, 33}))")
    ignore_32_then_exec = (
        "import ctypes, os, sys; from kuasar.common import linux;"
        " action = linux._KernelSigaction(handler=1);"  # SIG_IGN
        " assert linux.libc.syscall(linux._SYS_RT_SIGACTION[os.uname().machine], 32, ctypes.byref(action), None,"
        " linux._SIGSET_BYTES) == 0;"
        f" os.execv(sys.executable, [sys.executable, '-c', {script!r}])")
    read_fd, write_fd = os.pipe()
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", ignore_32_then_exec], dict(os.environ),
                         file_actions=[(os.POSIX_SPAWN_DUP2, write_fd, 1)])
    os.close(write_fd)
    with os.fdopen(read_fd) as out:
        printed = out.read()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    before, after = printed.split("] [")
    assert "32" in before and after == "]\n", printed


def test_a_fork_collects_nothing_in_the_child_and_leaves_the_parent_collecting() -> None:
    # CPython's fork handlers run in the child and allocate; a collection there ran finalizers of the
    # parent's garbage, one of which (a gRPC channel's, in the test process) joined a thread that exists
    # only in the parent: the pod holder's forked child spun for ever. Threshold 1 makes every handler's
    # allocation a collection, as an unlucky moment would.
    parent = os.getpid()
    in_child: list[int] = []

    def seen(phase: str, info: dict) -> None:
        if phase == "start" and os.getpid() != parent:
            in_child.append(1)

    threshold = gc.get_threshold()
    gc.callbacks.append(seen)
    gc.set_threshold(1)
    try:
        pid = spawn.fork()
        if pid == 0:
            os._exit(min(len(in_child), 50) + (100 if gc.isenabled() else 0))
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(seen)
    assert gc.isenabled()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0  # no collection, collector off
