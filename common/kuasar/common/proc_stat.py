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


def exited(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet."""
    fields = stat_fields(pid)
    return not fields or fields[0] in (b"Z", b"X")
