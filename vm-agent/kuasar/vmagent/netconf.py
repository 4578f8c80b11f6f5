"""Interfaces, addresses and routes in the guest, through busybox `ip` (netlink underneath).

Why `ip` and not pyroute2: busybox is in the image anyway (0 bytes extra, each `ip` run costs
about 10 ms under TCG and happens only at pod setup), while pyroute2 is a large pure-Python package
whose import alone would add a noticeable share of the agent's start-up time and megabytes to the
initramfs. Everything goes through argv lists, never a shell.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from kuasar.common.errors import InvalidArgument, NotFound, RuntimeFailure

log = logging.getLogger(__name__)

IFF_NOARP = 0x80
SYS_NET = Path("/sys/class/net")

# (argv) -> (exit status, stderr); the agent runs it with kuasar.common.spawn.
Runner = Callable[[list[str]], Awaitable[tuple[int, str]]]


def _valid_name(name: str) -> str:
    if not name or len(name) > 15 or "/" in name or name in (".", "..") or any(c.isspace() for c in name):
        raise InvalidArgument(f"bad interface name {name!r}")
    return name


def find_link(hw_addr: str, device: str, sys_net: Path = SYS_NET) -> str:
    """The current name of the link with MAC `hw_addr` (case-insensitive), else `device` if it exists."""
    if hw_addr:
        wanted = hw_addr.lower()
        for entry in sorted(os.listdir(sys_net)):
            try:
                if (sys_net / entry / "address").read_text().strip().lower() == wanted:
                    return entry
            except OSError:
                continue
    if device and (sys_net / device).exists():
        return device
    raise NotFound(f"no interface with MAC {hw_addr!r} or name {device!r}")


def interface_commands(current: str, name: str, cidrs: Sequence[str], mtu: int, raw_flags: int,
                       taken: bool) -> list[list[str]]:
    """`ip` argv lists that reconfigure link `current` (pure: for tests and the agent alike)."""
    target = _valid_name(name or current)
    for cidr in cidrs:
        try:
            ipaddress.ip_interface(cidr)
        except ValueError:
            raise InvalidArgument(f"bad interface address {cidr!r} (want CIDR, e.g. 10.0.0.2/24)") from None
    cmds = [["ip", "link", "set", "dev", current, "down"], ["ip", "addr", "flush", "dev", current]]
    if taken and target != current:  # another link already has the name: move it out of the way
        cmds.append(["ip", "link", "set", "dev", target, "name", f"{target[:11]}-tmp"])
    if target != current:
        cmds.append(["ip", "link", "set", "dev", current, "name", target])
    if mtu:
        cmds.append(["ip", "link", "set", "dev", target, "mtu", str(mtu)])
    cmds.append(["ip", "link", "set", "dev", target, "arp", "off" if raw_flags & IFF_NOARP else "on"])
    for cidr in cidrs:
        cmds.append(["ip", "addr", "add", cidr, "dev", target])
    cmds.append(["ip", "link", "set", "dev", target, "up"])
    return cmds


def route_command(dest: str, gateway: str, device: str, source: str, scope: int, family: int) -> list[str]:
    if family not in (0, 4, 6):
        raise InvalidArgument(f"bad route family {family}")
    for value in (gateway, source):
        if value:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise InvalidArgument(f"bad route address {value!r}") from None
    if dest:
        try:
            net = ipaddress.ip_network(dest, strict=False)
        except ValueError:
            raise InvalidArgument(f"bad route destination {dest!r}") from None
        family = family or net.version
    elif gateway:
        family = family or ipaddress.ip_address(gateway).version
    cmd = ["ip"] + (["-6"] if family == 6 else []) + ["route", "replace", dest or "default"]
    if gateway:
        cmd += ["via", gateway]
    if device:
        cmd += ["dev", _valid_name(device)]
    if source:
        cmd += ["src", source]
    if scope:
        cmd += ["scope", str(scope)]
    cmd += ["proto", "boot"]
    return cmd


def delete_command(replace_argv: list[str]) -> list[str]:
    """The `ip route del` for an `ip route replace` argv (same selectors, without `proto`)."""
    argv = list(replace_argv)
    i = argv.index("replace")
    argv[i] = "del"
    if "proto" in argv:
        j = argv.index("proto")
        del argv[j:j + 2]
    return argv


def ordered_routes(routes: Sequence) -> list:
    """Routes without a gateway first (the link routes a gateway route needs), then the rest."""
    return [r for r in routes if not r.gateway] + [r for r in routes if r.gateway]


class NetConfig:
    def __init__(self, run: Runner, sys_net: Path = SYS_NET) -> None:
        self.run = run
        self.sys_net = sys_net
        self.routes: list[list[str]] = []  # the `ip route replace` argv lists in force

    async def _ip(self, argv: list[str], tolerate: bool = False) -> None:
        status, err = await self.run(argv)
        if status != 0 and not tolerate:
            raise RuntimeFailure(f"{' '.join(argv)}: {err.strip() or f'exit status {status}'}")

    async def update_interfaces(self, interfaces: Sequence) -> None:
        for iface in interfaces:
            current = find_link(iface.hw_addr, iface.device, self.sys_net)
            target = iface.name or current
            taken = target != current and (self.sys_net / target).exists()
            cidrs = [a.cidr for a in iface.addresses]
            for argv in interface_commands(current, iface.name, cidrs, iface.mtu, iface.raw_flags, taken):
                await self._ip(argv)
            log.info("interface %s -> %s configured: %s", current, target, ", ".join(cidrs) or "no addresses")

    async def update_routes(self, routes: Sequence) -> None:
        """The pod's routes replace the ones given before. The kernel's own link routes for the
        addresses stay (busybox `ip route flush` ignores `proto` selectors, so the agent deletes
        exactly what it added instead of flushing)."""
        commands = [route_command(r.dest, r.gateway, r.device, r.source, r.scope, r.family)
                    for r in ordered_routes(routes)]
        for old in reversed(self.routes):
            if old not in commands:
                await self._ip(delete_command(old), tolerate=True)
        self.routes = []
        for argv in commands:
            await self._ip(argv)
            self.routes.append(argv)
