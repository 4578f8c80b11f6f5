"""Start external programs without a shell and without asyncio's child watcher.

asyncio's watcher would race our process-wide `Reaper` for exit statuses, so programs are started with
`start_program` and their exits come from the Reaper. No argument ever goes through a shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import DeadlineExceeded, NotFound
from .reaper import Exit, Reaper

# Python starts with SIGPIPE and SIGXFSZ ignored, and an ignored signal stays ignored across exec: every
# program we start gets them back at their defaults (as subprocess's restore_signals does). Otherwise
# runc would pass them on to the container, where e.g. `yes | head` would never end on SIGPIPE.
RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
# Output kept from a helper program; runc's messages are short, so more means something is wrong.
MAX_CAPTURE = 1 << 20
# One pipe buffer's worth per read.
READ_CHUNK = 65536


@dataclass
class Completed:
    argv: list[str]
    status: int
    stdout: bytes
    stderr: bytes


def resolve(program: str) -> str:
    path = program if "/" in program else shutil.which(program)
    if not path or not os.access(path, os.X_OK):
        raise NotFound(f"program {program!r} not found or not executable")
    return path


def fork() -> int:
    """os.fork with the collector off across it (on again in the parent, off for good in the child).
    CPython's fork handlers run in the child, and a collection there runs the finalizers of what the
    parent left as garbage; some join threads that exist only in the parent (a gRPC channel's, in a
    test process), and the child spins for ever. Our children fork at most once more, then exec or
    sleep: they have no use for the collector."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        pid = os.fork()
    except BaseException:
        if collecting:
            gc.enable()
        raise
    if pid != 0 and collecting:
        gc.enable()
    return pid


def start_program(path: str, argv: list[str], env: Mapping[str, str], stdin: int, stdout: int, stderr: int,
                  new_session: bool = False) -> int:
    """Start `path` with `argv` and the three fds as its stdio; return its pid. The caller's Reaper
    collects its exit: it must watch the pid before its loop runs again.

    subprocess rather than os.posix_spawn: glibc's posix_spawn sets the two signals it keeps for itself
    (32 and 33) to ignored in the child, which stays so across exec and accepts no request otherwise.
    runc takes 33 back but not 32, so every container process would start with signal 32 ignored,
    unlike under containerd's own shim (Go). subprocess's vfork child leaves both alone and resets
    RESTORED_SIGNALS (restore_signals). close_fds must stay on: without it subprocess itself takes the
    posix_spawn path. It costs ~20 µs more per start than os.posix_spawn (measured: 92 against 72 µs).
    """
    process = subprocess.Popen(argv, executable=path, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                               close_fds=True, restore_signals=True, start_new_session=new_session)
    # Marked finished for subprocess's sake: a Popen dropped while its child runs is waited for by the
    # next Popen made, which would take the exit status from our Reaper.
    process.returncode = 0
    return process.pid


async def read_to_eof(fd: int, limit: int = MAX_CAPTURE) -> bytes:
    """What is written to pipe `fd` until its last writer closes it, kept up to `limit` bytes (the rest is
    not read). Takes `fd` over and closes it, also when cancelled (e.g. by a timeout)."""
    # A bare reader callback rather than a pipe transport and StreamReader: this runs for every runc
    # call and pod process start, and their set-up and teardown cost ~0.1 ms more per read.
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    chunks: list[bytes] = []
    size = 0

    def readable() -> None:
        nonlocal size
        try:
            chunk = os.read(fd, min(limit - size, READ_CHUNK))
        except BlockingIOError:
            return
        except OSError as exc:
            if not finished.done():
                finished.set_exception(exc)
            return
        chunks.append(chunk)
        size += len(chunk)
        if (not chunk or size >= limit) and not finished.done():
            finished.set_result(None)

    try:
        os.set_blocking(fd, False)
        if limit > 0:
            loop.add_reader(fd, readable)
            try:
                await finished
            finally:
                loop.remove_reader(fd)
        return b"".join(chunks)
    finally:
        os.close(fd)


async def run(reaper: Reaper, argv: list[str], *, stdin: int | None = None, stdout: int | None = None,
              stderr: int | None = None, env: dict[str, str] | None = None,
              capture: bool = True, timeout: float | None = None) -> Completed:
    """Run `argv` to completion. Explicit stdio fds win over capture; unset ones go to /dev/null.

    With a `timeout`, a program still running then is SIGKILLed (it is our unreaped child, so the pid is
    still its own) and DeadlineExceeded raised once it is reaped: for commands that ask a daemon which
    may never answer (runsc's control commands to a wedged sandbox)."""
    path = resolve(argv[0])
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    out_r = err_r = None
    close_after: list[int] = [devnull]
    if stdout is None and capture:
        out_r, stdout = os.pipe()
        close_after.append(stdout)
    if stderr is None and capture:
        err_r, stderr = os.pipe()
        close_after.append(stderr)
    try:
        pid = start_program(path, argv, os.environ if env is None else env,
                            devnull if stdin is None else stdin, devnull if stdout is None else stdout,
                            devnull if stderr is None else stderr)
        exited = reaper.watch(pid)  # same loop step as the spawn: the reaper cannot miss it
    finally:
        for fd in close_after:
            os.close(fd)
    reads = [read_to_eof(out_r) if out_r is not None else _empty(),
             read_to_eof(err_r) if err_r is not None else _empty()]
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            out, err = await asyncio.gather(*reads)
            result = await asyncio.shield(exited)  # a cancel of ours must not cancel the reaper's record
    except TimeoutError:
        await _killed(pid, exited, deadline)
        raise DeadlineExceeded(f"{os.path.basename(path)} did not finish within {timeout:g}s and was "
                               "killed") from None
    except asyncio.CancelledError:
        # The command goes on without us (runc half way through a create), until its deadline if it has
        # one; what the caller undoes after a cancel must come after it, not race it. A second cancel
        # stops the waiting.
        with contextlib.suppress(asyncio.CancelledError):
            await _killed(pid, exited, deadline)
        raise
    return Completed(argv, result.status, out, err)


async def _killed(pid: int, exited: asyncio.Future[Exit], deadline: float | None) -> None:
    """Wait for the exit of our child `pid`; SIGKILL it at `deadline` (loop time) if there is one.
    asyncio.wait, not asyncio.timeout: Python 3.11's timeout does not fire in a task already cancelled,
    which is where this runs after a cancel."""
    if deadline is not None and not exited.done():
        await asyncio.wait([exited], timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
        if not exited.done():  # not reaped, so the pid is still its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    await asyncio.shield(exited)


async def _empty() -> bytes:
    return b""

