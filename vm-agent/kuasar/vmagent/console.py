"""Debug console: a root shell on a pty per vsock connection (off unless `task.debug` is set).

From the host: `socat - UNIX-CONNECT:<uds>` then type `CONNECT 1025`, or `vm-agent console <uds>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from functools import partial

from kuasar.common.iopump import Source, write_all
from kuasar.common.reaper import Reaper
from kuasar.common.spawn import start_program

log = logging.getLogger(__name__)


async def _copy(src: int, dst: int) -> None:
    try:  # (ends at EIO too: the shell and all on its pty are gone)
        await Source(src).copy_to(partial(write_all, dst))
    except OSError:
        return


class DebugConsole:
    def __init__(self, reaper: Reaper, shell: str = "/bin/sh") -> None:
        self.reaper = reaper
        self.shell = shell
        self.sessions: set[asyncio.Task[None]] = set()

    async def serve(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = asyncio.create_task(self._session(conn), name="debug console")
            self.sessions.add(task)
            task.add_done_callback(self.sessions.discard)

    async def _session(self, conn: socket.socket) -> None:
        master, slave = os.openpty()
        pid = -1
        try:
            env = dict(os.environ, TERM="vt100", PS1="[vm-agent debug] \\w # ", HOME="/root")
            # busybox `setsid -c` makes the pty the shell's controlling terminal (job control works).
            argv = ["/bin/busybox", "setsid", "-c", self.shell, "-i"]
            pid = start_program(argv[0], argv, env, slave, slave, slave)
            exited = self.reaper.watch(pid)
            os.close(slave)
            slave = -1
            log.info("debug console: shell pid %d", pid)
            conn.setblocking(False)
            os.set_blocking(master, False)
            sock_fd = conn.fileno()
            to_shell = asyncio.create_task(_copy(sock_fd, master))
            from_shell = asyncio.create_task(_copy(master, sock_fd))
            await asyncio.wait([to_shell, from_shell, exited], return_when=asyncio.FIRST_COMPLETED)
            to_shell.cancel()
            from_shell.cancel()
            if not exited.done():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, 9)  # the shell leads its own session: take its children too
        finally:
            if slave >= 0:
                os.close(slave)
            os.close(master)
            conn.close()
