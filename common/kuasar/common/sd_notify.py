"""systemd's readiness protocol (`sd_notify(3)`) without libsystemd: one datagram on $NOTIFY_SOCKET.

A sandboxer started by a `Type=notify` unit sends `READY=1` once its Sandbox API socket accepts
connections, `STOPPING=1` when it shuts down, and `WATCHDOG=1` every half `WatchdogSec` while its event
loop runs. Outside systemd (no $NOTIFY_SOCKET) every call is a cheap no-op.

$NOTIFY_SOCKET is a filesystem path (`/run/systemd/notify`) or an abstract socket (`@name`, the leading
`@` standing for the NUL byte). Frozen binaries (PyInstaller --onefile) run as a child of their
bootloader, so the unit needs `NotifyAccess=all`; the watchdog accepts $WATCHDOG_PID naming that parent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
# What systemd hands to the service and no child of ours must inherit: runc, for one, proxies
# $NOTIFY_SOCKET into the container and makes `runc start` wait for the container's READY=1.
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def take_environment() -> dict[str, str]:
    """Remove systemd's notification variables from os.environ (so children never see them) and return
    them, for `notify(..., env=...)` later (sd_notify's `unset_environment`)."""
    return {name: os.environ.pop(name) for name in SYSTEMD_VARIABLES if name in os.environ}


def socket_address(value: str) -> str | None:
    """The AF_UNIX address for a $NOTIFY_SOCKET value, or None if it is not a unix socket we can use."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # empty, relative, or vsock:... (VM guests): not for us


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `state` ("READY=1", "STATUS=...", several joined by newlines); True if it was sent."""
    env = os.environ if env is None else env
    value = env.get(NOTIFY_SOCKET, "")
    address = socket_address(value)
    if address is None:
        if value:
            log.debug("NOTIFY_SOCKET=%r is not a unix socket; not notifying", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", value, exc)
        return False
    return True


def ready(status: str = "", env: Mapping[str, str] | None = None) -> bool:
    lines = ["READY=1"] + ([f"STATUS={status}"] if status else [])
    return notify("\n".join(lines), env)


def stopping(env: Mapping[str, str] | None = None) -> bool:
    return notify("STOPPING=1", env)


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when no watchdog is wanted.

    $WATCHDOG_PID, when set, must be this process or its parent (the PyInstaller bootloader systemd
    started); otherwise the watchdog is meant for another process.
    """
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid not in (str(os.getpid()), str(os.getppid())):
        return None
    return usec / 2 / 1e6


async def watchdog_loop(interval: float, env: Mapping[str, str] | None = None) -> None:
    """Ping systemd's watchdog until cancelled; a blocked event loop stops the pings (that is the point)."""
    while True:
        notify("WATCHDOG=1", env)
        await asyncio.sleep(interval)


def start_watchdog(env: Mapping[str, str] | None = None) -> asyncio.Task[None] | None:
    interval = watchdog_interval(env)
    if interval is None:
        return None
    return asyncio.get_running_loop().create_task(watchdog_loop(interval, env), name="sd-watchdog")
