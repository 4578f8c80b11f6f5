"""The guest's console log (`<vm dir>/console.log`), kept bounded by rotation.

QEMU writes the guest's serial console to that file for the VM's whole life: the guest kernel's
messages and the agent's log, which grows with every request (an exec probe every few seconds is a
few MB a day), and anything a guest process with the console writes, as fast as it likes. A limit on
QEMU's file size (RLIMIT_FSIZE) would also cap its writes to the shared directory on the guest's
behalf, so the task proxy, which lives as long as the VM, rotates the file instead: once it has grown
past the limit, its last `limit` bytes move to `console.log.1` (replacing the one before) and it starts
again empty. QEMU opens it with `append=on`, so its next write lands at the new end rather than at its
old offset (which would leave a hole as large as everything before). As with logrotate's copytruncate,
what QEMU writes between the copy and the truncation (microseconds) is lost; the disk used stays under
two limits plus what the guest writes in one check period.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from kuasar.common.log_rotation import keep_rotating, rotated
from kuasar.common.state import write_atomic

# How often the size is looked at: one stat a second per VM costs nothing; a guest writing flat out
# to its UART under TCG gets well under a megabyte past the limit in that time.
CHECK_PERIOD = 1.0
# What a tail of the log reads at most of each file: the guest decides how long its lines are.
TAIL_BYTES = 16 << 10


def rotate_if_over(path: Path, limit: int) -> bool:
    """Move the last `limit` bytes of `path` to `<path>.1` and empty it, if it is over `limit`."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        if size <= limit:
            return False
        # On to the end, not just `limit` bytes: the guest may have written more since the fstat; but
        # not for ever behind a guest that writes as fast as this reads.
        os.lseek(fd, size - limit, os.SEEK_SET)
        chunks, taken = [], 0
        while taken < 2 * limit and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
            taken += len(chunk)
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    kept = b"".join(chunks)[-limit:]
    write_atomic(rotated(path), kept, mode=0o600, durable=False)
    return True


async def keep_bounded(path: Path, limit: int, period: float = CHECK_PERIOD) -> None:
    """Rotate `path` whenever it is over `limit`, until cancelled."""
    await keep_rotating(lambda: rotate_if_over(path, limit), path, period)


def tail(path: Path, lines: int = 25) -> str:
    """The last `lines` lines of a log, from the last TAIL_BYTES of it and of its rotated predecessor
    (a rotation may just have emptied it)."""
    text = b""
    for part in (rotated(path), path):
        with contextlib.suppress(OSError), open(part, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL_BYTES))
            text += f.read()
    return "\n".join(text.decode(errors="replace").splitlines()[-lines:])
