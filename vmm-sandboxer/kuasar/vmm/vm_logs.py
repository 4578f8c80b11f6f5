"""A VM's log files (`<vm dir>/*.log`), kept bounded by rotation.

They are written for the VM's whole life, each by a process of its own: QEMU's serial console
(`console.log`: the guest kernel's messages and the agent's log, which grows with every request, an
exec probe every few seconds being a few MB a day, and anything a guest process with the console
writes, as fast as it likes), QEMU's and vhost-device-vsock's (or virtiofsd's) output, which the
guest's doings can also fill, and the task proxy's. A limit on QEMU's file size (RLIMIT_FSIZE) would
also cap its writes to the shared directory on the guest's behalf, so the task proxy, which lives as
long as the VM, rotates them instead: once a file has grown past the limit, its last `limit` bytes
move to `<name>.1` (replacing the one before) and it starts again empty. Every writer appends
(QEMU's console with `append=on`, the others opened O_APPEND), so its next write lands at the new end
rather than at its old offset, which would leave a hole as large as everything before. As with
logrotate's copytruncate, what is written between the copy and the truncation (microseconds) is lost;
each log stays under two limits plus what is written to it in one check period.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from kuasar.common.log_rotation import keep_rotating, rotated
from kuasar.common.state import write_atomic

log = logging.getLogger(__name__)

# How often the size is looked at: one stat a second per VM costs nothing; a guest writing flat out
# to its UART under TCG gets well under a megabyte past the limit in that time.
CHECK_PERIOD = 1.0
# What a tail of the log reads at most of each file: the guest decides how long its lines are.
TAIL_BYTES = 16 << 10


def rotate_if_over(path: Path, limit: int) -> bool:
    """Move the last `limit` bytes of `path` to `<path>.1` and empty it, if it is over `limit`. The
    copy is saved before the file is emptied: a copy that fails (a full disk) empties nothing."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        if size <= limit:
            return False
        # On to the end, not just `limit` bytes: the guest may have written more since the fstat; but
        # not for ever behind a guest that writes as fast as this reads, and never more than `limit`
        # held (the proxy lives in the pod's cgroup).
        os.lseek(fd, size - limit, os.SEEK_SET)
        kept, taken = bytearray(), 0
        while taken < 2 * limit and (chunk := os.read(fd, 1 << 16)):
            kept += chunk
            taken += len(chunk)
            del kept[:-limit]
        write_atomic(rotated(path), bytes(kept), mode=0o600, durable=False)
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    return True


def rotate_logs_in(directory: Path, limit: int) -> list[Path]:
    """Rotate each `*.log` in `directory` that is over `limit`; the ones rotated. One that cannot be
    rotated (not a regular file, an error) does not keep the others from it: the first error is raised
    once all were tried."""
    done: list[Path] = []
    errors: list[OSError] = []
    for path in sorted(directory.glob("*.log")):
        try:
            if rotate_if_over(path, limit):
                done.append(path)
        except OSError as err:
            errors.append(err)
    for path in done:
        log.info("%s rotated at %d bytes: its last %d are in %s", path.name, limit, limit, rotated(path).name)
    if errors:
        raise errors[0]
    return done


async def keep_bounded(directory: Path, limit: int, period: float = CHECK_PERIOD) -> None:
    """Rotate the logs in `directory` whenever one is over `limit`, until cancelled."""
    await keep_rotating(lambda: rotate_logs_in(directory, limit), f"the logs in {directory}", period)


def tail(path: Path, lines: int = 25) -> str:
    """The last `lines` lines of a log, from the last TAIL_BYTES of it and of its rotated predecessor
    (a rotation may just have emptied it)."""
    text = b""
    for part in (rotated(path), path):
        with contextlib.suppress(OSError), open(part, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL_BYTES))
            text += f.read()
    return "\n".join(text.decode(errors="replace").splitlines()[-lines:])
