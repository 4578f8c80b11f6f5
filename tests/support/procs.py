"""Process look-ups shared by the tests and the benchmarks."""

from __future__ import annotations

import psutil


def live_children(pid: int, name_prefix: str) -> list[psutil.Process]:
    """`pid`'s children (not zombies) whose name starts with `name_prefix`; [] once `pid` is gone."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    found = []
    for proc in children:
        try:
            if proc.name().startswith(name_prefix) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.NoSuchProcess:  # gone between the listing and the look (kuasar-pause's first process)
            pass
    return found


def thread_names(pid: int, but_main: bool = False) -> list[str]:
    """The comm names of `pid`'s threads (leaving out its main thread with `but_main`)."""
    names = []
    for thread in psutil.Process(pid).threads():
        if but_main and thread.id == pid:
            continue
        try:
            with open(f"/proc/{pid}/task/{thread.id}/comm") as comm:
                names.append(comm.read().strip())
        except FileNotFoundError:  # ended between the listing and the look
            pass
    return names
