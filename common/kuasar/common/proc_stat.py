"""A process's identity and state from /proc/<pid>/stat, without psutil (which the resident task server
does not import).

A pid alone names whatever process holds it now; with its start time (field 22, clock ticks after
boot) it names the one process we started, however often the pid has been reused since.
"""

from __future__ import annotations

# /proc/<pid>/stat is one line of ~50 fields, well under this.
STAT_MAX = 4096


def stat_fields(pid: int) -> list[bytes]:
    """/proc/<pid>/stat from its third field (the state) on; empty if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            line = stat.read(STAT_MAX)
    except OSError:
        return []
    # The command name, in parentheses, may itself hold spaces and parentheses: count from the last ")".
    return line[line.rfind(b")") + 2:].split()


def start_time(pid: int) -> int:
    """The start time of `pid` (0 if there is no such process)."""
    fields = stat_fields(pid)
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


# Where a field is in stat_fields, which start at the state (field 3): the parent's pid (field 4) and
# num_threads (field 20).
PPID = 1
NUM_THREADS = 17


def exited(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet, once all its threads are gone too.

    The first thread shows Z as soon as it exits, while the process's other threads may still run (or be
    ending: a SIGKILLed QEMU's vCPU and I/O threads). Until they are gone the process still holds what it
    held: removing its cgroup then failed with EBUSY."""
    fields = stat_fields(pid)
    if not fields or fields[0] == b"X":
        return True
    if fields[0] != b"Z":
        return False
    try:
        return int(fields[NUM_THREADS]) <= 1
    except (IndexError, ValueError):
        return True
