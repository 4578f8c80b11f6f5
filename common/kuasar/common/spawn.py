"""Start external programs without a shell and without asyncio's child watcher.

asyncio's watcher would race our process-wide `Reaper` for exit statuses, so programs are started with
posix_spawn and their exits come from the Reaper. No argument ever goes through a shell.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from dataclasses import dataclass

from .errors import NotFound
from .reaper import Reaper

# Python starts with SIGPIPE and SIGXFSZ ignored, and an ignored signal stays ignored across exec: every
# program we start gets them back at their defaults (as subprocess's restore_signals does). Otherwise
# runc would pass them on to the container, where e.g. `yes | head` would never end on SIGPIPE. (glibc's
# posix_spawn leaves its own internal signals 32 and 33 ignored in the child, and refuses a request to
# reset them; runc resets 33, and glibc programs install a handler for 32 when they need it.)
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
              capture: bool = True) -> Completed:
    """Run `argv` to completion. Explicit stdio fds win over capture; unset ones go to /dev/null."""
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
    actions = [
        (os.POSIX_SPAWN_DUP2, devnull if stdin is None else stdin, 0),
        (os.POSIX_SPAWN_DUP2, devnull if stdout is None else stdout, 1),
        (os.POSIX_SPAWN_DUP2, devnull if stderr is None else stderr, 2),
    ]
    spawn_env = dict(os.environ if env is None else env)
    try:
        pid = os.posix_spawn(path, argv, spawn_env, file_actions=actions, setsigdef=RESTORED_SIGNALS)
        exited = reaper.watch(pid)  # same loop step as the spawn: the reaper cannot miss it
    finally:
        for fd in close_after:
            os.close(fd)
    reads = [read_to_eof(out_r) if out_r is not None else _empty(),
             read_to_eof(err_r) if err_r is not None else _empty()]
    out, err = await asyncio.gather(*reads)
    result = await exited
    return Completed(argv, result.status, out, err)


async def _empty() -> bytes:
    return b""

