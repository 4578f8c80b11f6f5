"""A process in a user namespace of its own (and, optionally, a network namespace owned by it), with
ids mapped as containerd maps a `hostUsers: false` pod's: `0 <host_id> <length>` for uids and gids.

util-linux's `unshare --map-users` needs newuidmap (not installed here); as root we write the maps
ourselves, the way containerd does for the pod's netns.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

from kuasar.common import linux

_HOLDER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(int(sys.argv[1])) != 0:
    print("!" + os.strerror(ctypes.get_errno()), flush=True)
    sys.exit(1)
print("ready", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def namespace_holder(host_id: int = 0, length: int = 65536, user: bool = True, net: bool = True) -> Iterator[int]:
    """The pid of a process that sits in new namespaces (user and/or net) until the block ends; with
    `user`, uids and gids 0..length-1 inside are host_id.. outside."""
    flags = (linux.CLONE_NEWUSER if user else 0) | (linux.CLONE_NEWNET if net else 0)
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(flags)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip() if proc.stdout else ""
        if line != "ready":
            raise RuntimeError(f"namespace holder failed: {line or 'no report'}")
        if user:
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{proc.pid}/{name}", "w") as ids:
                    ids.write(f"0 {host_id} {length}\n")
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
