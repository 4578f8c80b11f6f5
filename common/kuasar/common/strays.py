"""Processes a sandbox left behind without a record of their pids (its sandboxer died while starting it):
found by a directory of that sandbox's own in their command line, which nothing else names."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

# A SIGKILLed process is gone in milliseconds; one in uninterruptible sleep (a stuck mount) may take longer,
# and waiting past this only delays the removal of everything else.
KILL_WAIT = 5.0
POLL_INTERVAL = 0.02


async def kill_strays(directory: Path) -> list[int]:
    """SIGKILL every process (but this one) whose command line holds `directory`/; return their pids
    once they are gone, or KILL_WAIT has passed."""
    import psutil  # only here: the daemons that never need it keep it out of memory

    needle = str(directory) + "/"
    strays = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != os.getpid() and any(needle in arg for arg in proc.info["cmdline"] or []):
            strays.append(proc)
    for proc in strays:
        log.warning("killing stray process %d of %s", proc.pid, directory)
        try:
            proc.kill()  # psutil checks the pid still names the process it found (no reused pid)
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + KILL_WAIT
    while any(_running(proc) for proc in strays) and time.monotonic() < deadline:  # noqa: ASYNC110 - not our children: no exit to await
        await asyncio.sleep(POLL_INTERVAL)
    return [proc.pid for proc in strays]


def _running(proc: object) -> bool:
    import psutil

    assert isinstance(proc, psutil.Process)
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
