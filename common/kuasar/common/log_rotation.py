"""Logs that live as long as a process does, kept bounded by rotation to `<name>.1`.

A task server's stdout and stderr (fds 1 and 2) are `<dir>/task-server.log` for its whole life, and a
task server lives as long as any of its pods: a few lines for every container and every exec (an exec
probe every 10 s in 30 pods is some 100 MB a day) would grow it without end. Once the file behind fd 2
is over its limit, it is renamed to `task-server.log.1` (replacing the one before) and fds 1 and 2 are
pointed at a new, empty file: no line is lost or split, since every write goes to one file or the other.
The programs a task server starts get their own stdio (pod processes and runtime commands /dev/null or
pipes, containers their FIFOs), so none keeps writing to a renamed file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# A task server's log: days of lines on a busy node, and with the one before it at most 32 MiB.
TASK_SERVER_LOG_LIMIT = 16 << 20
# One fstat per period: a log this size takes hours to fill, never seconds.
CHECK_PERIOD = 2.0


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def rotate_stdio_log(path: Path, limit: int) -> bool:
    """If fd 2 is `path` (the same file, not just the name) and is over `limit`: rename it to
    `<path>.1` and point fds 1 and 2 at a new `path`. A file that is not ours any more (moved away by an
    administrator's logrotate) is left to whoever moved it; one that we renamed but could not replace
    (no disk space or fds left for the new file) is replaced now."""
    current = os.fstat(2)
    if not os.path.lexists(path) and _is(current, rotated(path)):
        _point_stdio_at(path)
        return True
    if not _is(current, path) or current.st_size <= limit:
        return False
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    os.replace(path, rotated(path))
    _point_stdio_at(path)
    log.info("log rotated: what came before is in %s", rotated(path).name)
    return True


def _is(fd_stat: os.stat_result, path: Path) -> bool:
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (fd_stat.st_dev, fd_stat.st_ino) == (named.st_dev, named.st_ino)


def _point_stdio_at(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)


async def keep_rotating(rotate: Callable[[], object], what: str, period: float = CHECK_PERIOD) -> None:
    """Call `rotate` every `period` seconds until cancelled. A failure (a full disk) is tried again
    next time rather than ending the bound, and logged when it is new: a failure that lasts, logged at
    every try, would grow the very log that can no longer be rotated."""
    last_error = ""
    while True:
        try:
            rotate()
            last_error = ""
        except OSError as err:
            if str(err) != last_error:
                log.warning("rotating %s: %s (logged again only when it changes)", what, err)
            last_error = str(err)
        await asyncio.sleep(period)
