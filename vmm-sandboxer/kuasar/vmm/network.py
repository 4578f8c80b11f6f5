"""The pod network, copied into the VM (Kuasar's way): CNI gave the pod netns a veth with an address
and routes; for each such veth we make a tap in the same netns, redirect all traffic between the two
with tc (ingress + mirred), hand the tap to QEMU, and have the agent give the guest NIC the veth's
MAC, addresses and routes. The veth keeps its configuration, so CNI DEL later finds it intact.

Reading the netns uses `nsenter --net=<netns> ip -j ...` (iproute2's JSON output); taps are created
with TUNSETIFF from a short-lived thread that `setns`es into the pod netns, so the file descriptor
belongs to that netns and QEMU gets it ready-made (`-netdev tap,fd=N`). The taps are not persistent:
they disappear with the last descriptor, i.e. with QEMU.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import json
import logging
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from kuasar.common import linux
from kuasar.common.errors import InvalidArgument, RuntimeFailure

T = TypeVar("T")
log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_NOARP = 0x80
SCOPES = {"global": 0, "universe": 0, "site": 200, "link": 253, "host": 254, "nowhere": 255}
# Link kinds that are copied into the guest (CNI's usual pod interface).
COPIED_KINDS = ("veth",)
COMMAND_TIMEOUT = 20.0


@dataclass
class Address:
    cidr: str  # "10.88.0.5/16"
    family: int  # 4 or 6


@dataclass
class Route:
    dest: str  # "" = default
    gateway: str
    device: str
    source: str
    scope: int
    family: int


@dataclass
class Nic:
    """One pod interface copied into the guest."""

    name: str  # the veth's name, which the guest NIC gets too (eth0)
    ifindex: int
    mac: str
    mtu: int
    flags: int
    tap: str
    addresses: list[Address] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Nic:
        data = dict(data)
        data["addresses"] = [Address(**a) for a in data.get("addresses", [])]
        return cls(**data)


@dataclass
class PodNetwork:
    netns: str
    nics: list[Nic] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"netns": self.netns, "nics": [n.to_json() for n in self.nics],
                "routes": [asdict(r) for r in self.routes]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PodNetwork:
        return cls(data.get("netns", ""), [Nic.from_json(n) for n in data.get("nics", [])],
                   [Route(**r) for r in data.get("routes", [])])


async def run(argv: list[str], stdin: bytes | None = None) -> tuple[int, str, str]:
    """Run a helper (no shell) and return (status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            out, err = await proc.communicate(stdin)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeFailure(f"{argv[0]} {' '.join(argv[1:4])}... did not finish in {COMMAND_TIMEOUT:g}s") from None
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


def in_netns(netns: str, argv: list[str]) -> list[str]:
    return ["nsenter", f"--net={netns}", "--", *argv]


async def _ip_json(netns: str, args: list[str]) -> list[dict[str, Any]]:
    status, out, err = await run(in_netns(netns, ["ip", "-j", *args]))
    if status != 0:
        raise RuntimeFailure(f"ip {' '.join(args)} in {netns}: {err.strip() or status}")
    try:
        data = json.loads(out or "[]")
    except ValueError:
        raise RuntimeFailure(f"ip {' '.join(args)}: unparsable output {out[:200]!r}") from None
    return [d for d in data if isinstance(d, dict)]


def tap_name(ifindex: int) -> str:
    return f"tap_kua_{ifindex}"[:15]


def parse_links(links: list[dict[str, Any]], addrs: list[dict[str, Any]]) -> list[Nic]:
    """The interfaces to copy: veths that are up or have addresses (pure; for unit tests)."""
    by_index = {a.get("ifindex"): a for a in addrs}
    nics = []
    for link in links:
        kind = (link.get("linkinfo") or {}).get("info_kind", "")
        name = link.get("ifname", "")
        if kind not in COPIED_KINDS or not name:
            continue
        index = int(link["ifindex"])
        addresses = []
        for info in by_index.get(index, {}).get("addr_info", []):
            family = {"inet": 4, "inet6": 6}.get(info.get("family", ""))
            local = info.get("local", "")
            if family is None or not local:
                continue
            if family == 6 and ipaddress.ip_address(local).is_link_local:
                continue  # the guest makes its own link-local address
            addresses.append(Address(f"{local}/{info.get('prefixlen', 128 if family == 6 else 32)}", family))
        flags = IFF_NOARP if "NOARP" in link.get("flags", []) else 0
        nics.append(Nic(name=name, ifindex=index, mac=link.get("address", ""), mtu=int(link.get("mtu", 1500)),
                        flags=flags, tap=tap_name(index), addresses=addresses))
    return nics


def parse_routes(routes: list[dict[str, Any]], family: int, devices: set[str]) -> list[Route]:
    out = []
    for route in routes:
        dev = route.get("dev", "")
        if dev not in devices or route.get("type", "unicast") != "unicast":
            continue
        dst = route.get("dst", "")
        if dst == "default":
            dst = ""
        elif dst and "/" not in dst:
            dst = f"{dst}/{32 if family == 4 else 128}"
        if family == 6 and dst and ipaddress.ip_network(dst, strict=False).is_link_local:
            continue
        scope = route.get("scope", "global")
        out.append(Route(dest=dst, gateway=route.get("gateway", ""), device=dev, source=route.get("prefsrc", ""),
                         scope=SCOPES.get(scope, 0) if isinstance(scope, str) else int(scope), family=family))
    return out


async def discover(netns: str) -> PodNetwork:
    links = await _ip_json(netns, ["-d", "link", "show"])
    addrs = await _ip_json(netns, ["addr", "show"])
    nics = parse_links(links, addrs)
    devices = {n.name for n in nics}
    routes = parse_routes(await _ip_json(netns, ["-4", "route", "show", "table", "main"]), 4, devices)
    routes += parse_routes(await _ip_json(netns, ["-6", "route", "show", "table", "main"]), 6, devices)
    return PodNetwork(netns, nics, routes)


def call_in_netns(netns: str, what: str, fn: Callable[[], T]) -> T:
    """`fn()` in a short-lived thread that sits in `netns`: what it creates (a tap, a socket) belongs
    to that namespace, while the rest of the process stays where it is."""
    result: dict[str, Any] = {}

    def worker() -> None:
        fds: list[int] = []
        try:
            # Opened in here too: a netns that is gone is the caller's error, not a dead thread's.
            fds.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
            fds.append(os.open(netns, os.O_RDONLY | os.O_CLOEXEC))
            linux.setns(fds[1], linux.CLONE_NEWNET)
            try:
                result["value"] = fn()
            finally:
                linux.setns(fds[0], linux.CLONE_NEWNET)
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            result["error"] = err
        finally:
            for fd in fds:
                os.close(fd)

    thread = threading.Thread(target=worker, name=what[:15])
    thread.start()
    thread.join()
    if "error" in result:
        raise RuntimeFailure(f"{what} in {netns}: {result['error']}")
    return result["value"]


def _open_tap_in(netns: str, name: str) -> int:
    """TUNSETIFF in `netns`, so the tap is created there."""

    def open_tap() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except BaseException:
            os.close(fd)
            raise
        return fd

    return call_in_netns(netns, f"creating tap {name}", open_tap)


async def create_taps(network: PodNetwork) -> dict[str, int]:
    """A tap per NIC in the pod netns, wired to its veth with tc mirred; returns {tap: fd}.

    The fds must go to QEMU and then be closed here; on error everything made is undone.
    """
    fds: dict[str, int] = {}
    try:
        for nic in network.nics:
            opening = asyncio.ensure_future(asyncio.to_thread(_open_tap_in, network.netns, nic.tap))
            try:
                fds[nic.tap] = await asyncio.shield(opening)
            except asyncio.CancelledError:
                # A cancel does not stop the thread: the tap it opens (which lives as long as its fd)
                # is closed when it is done.
                opening.add_done_callback(_close_opened)
                raise
        ip_batch = "".join(f"link set dev {n.tap} mtu {n.mtu} up\n" for n in network.nics)
        if ip_batch:
            await _batch(network.netns, "ip", ip_batch)
            await _batch(network.netns, "tc", tc_commands(network.nics))
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        await remove_redirects(network)
        raise
    return fds


def _close_opened(opening: asyncio.Future[int]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        os.close(opening.result())


def tc_commands(nics: list[Nic]) -> str:
    lines = []
    for nic in nics:
        for src, dst in ((nic.tap, nic.name), (nic.name, nic.tap)):
            lines.append(f"qdisc add dev {src} ingress")
            lines.append(f"filter add dev {src} parent ffff: protocol all u32 match u8 0 0 "
                         f"action mirred egress redirect dev {dst}")
    return "".join(line + "\n" for line in lines)


async def _batch(netns: str, tool: str, commands: str) -> None:
    status, _, err = await run(in_netns(netns, [tool, "-batch", "-"]), stdin=commands.encode())
    if status != 0:
        raise RuntimeFailure(f"{tool} -batch in {netns}: {err.strip() or status}")


async def remove_redirects(network: PodNetwork) -> None:
    """Undo the veth side (the tap and its qdisc go with QEMU's fd); best effort, netns may be gone."""
    if not network.netns or not os.path.exists(network.netns):
        return
    for nic in network.nics:
        status, _, err = await run(in_netns(network.netns, ["tc", "qdisc", "del", "dev", nic.name, "ingress"]))
        if status != 0 and "No such file" not in err and "Cannot find" not in err and "Invalid handle" not in err:
            log.debug("tc qdisc del dev %s ingress: %s", nic.name, err.strip())


async def tap_exists(netns: str, tap: str) -> bool:
    if not netns or not os.path.exists(netns):
        return False
    status, _, _ = await run(in_netns(netns, ["ip", "link", "show", "dev", tap]))
    return status == 0


def validate_netns(path: str) -> str:
    if path and (not os.path.isabs(path) or not os.path.exists(path)):
        raise InvalidArgument(f"netns {path!r} does not exist")
    return path
