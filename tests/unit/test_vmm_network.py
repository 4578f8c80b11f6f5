"""Reading a CNI pod netns (iproute2 JSON) into what the guest gets, and the tc redirects."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from kuasar.vmm import network
from kuasar.vmm.network import IFF_NOARP, parse_links, parse_routes, tc_commands

LINKS = [
    {"ifindex": 1, "ifname": "lo", "flags": ["LOOPBACK", "UP"], "mtu": 65536, "address": "00:00:00:00:00:00"},
    {"ifindex": 2, "ifname": "eth0", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"], "mtu": 1450,
     "address": "3a:1f:9c:00:11:22", "linkinfo": {"info_kind": "veth"}},
    {"ifindex": 3, "ifname": "tunl0", "flags": ["NOARP"], "mtu": 1480, "address": "0.0.0.0",
     "linkinfo": {"info_kind": "ipip"}},
]
ADDRS = [
    {"ifindex": 2, "ifname": "eth0", "addr_info": [
        {"family": "inet", "local": "10.249.0.7", "prefixlen": 16, "scope": "global"},
        {"family": "inet6", "local": "fd00::7", "prefixlen": 64, "scope": "global"},
        {"family": "inet6", "local": "fe80::381f:9cff:fe00:1122", "prefixlen": 64, "scope": "link"}]},
]
ROUTES4 = [
    {"dst": "default", "gateway": "10.249.0.1", "dev": "eth0", "flags": []},
    {"dst": "10.249.0.0/16", "dev": "eth0", "protocol": "kernel", "scope": "link", "prefsrc": "10.249.0.7"},
    {"dst": "10.1.2.3", "gateway": "10.249.0.1", "dev": "eth0"},
    {"dst": "10.9.0.0/16", "dev": "tunl0"},
    {"type": "blackhole", "dst": "10.8.0.0/16"},
]
ROUTES6 = [{"dst": "fe80::/64", "dev": "eth0", "protocol": "kernel"}, {"dst": "fd00::/64", "dev": "eth0"}]


def test_veth_is_copied_with_its_addresses() -> None:
    [nic] = parse_links(LINKS, ADDRS)
    assert (nic.name, nic.ifindex, nic.mac, nic.mtu, nic.tap) == ("eth0", 2, "3a:1f:9c:00:11:22", 1450, "tap_kua_2")
    assert [(a.cidr, a.family) for a in nic.addresses] == [("10.249.0.7/16", 4), ("fd00::7/64", 6)]
    assert nic.flags & IFF_NOARP == 0


def test_routes_of_copied_devices() -> None:
    routes = parse_routes(ROUTES4, 4, {"eth0"}) + parse_routes(ROUTES6, 6, {"eth0"})
    assert [(r.dest, r.gateway, r.device, r.source, r.scope, r.family) for r in routes] == [
        ("", "10.249.0.1", "eth0", "", 0, 4),
        ("10.249.0.0/16", "", "eth0", "10.249.0.7", 253, 4),
        ("10.1.2.3/32", "10.249.0.1", "eth0", "", 0, 4),
        ("fd00::/64", "", "eth0", "", 0, 6),
    ]


def test_tc_redirects_both_ways() -> None:
    [nic] = parse_links(LINKS, ADDRS)
    assert tc_commands([nic]).splitlines() == [
        "qdisc add dev tap_kua_2 ingress",
        "filter add dev tap_kua_2 parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev eth0",
        "qdisc add dev eth0 ingress",
        "filter add dev eth0 parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev tap_kua_2",
    ]


def test_a_start_cancelled_while_a_tap_is_opened_closes_that_tap(monkeypatch) -> None:
    # The thread that opens a tap runs on after a cancel; its fd (which keeps the tap device in the
    # pod's netns) used to be dropped unclosed.
    release, opened = threading.Event(), []

    def open_tap(netns: str, name: str) -> int:
        release.wait(10)
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        opened.append(fd)
        return fd

    monkeypatch.setattr(network, "_open_tap_in", open_tap)
    pod = network.PodNetwork(netns="", nics=[network.Nic("eth0", 2, "3a:1f:9c:00:11:22", 1450, 0, "tap_kua_2")])

    async def scenario() -> None:
        creating = asyncio.ensure_future(network.create_taps(pod))
        await asyncio.sleep(0.05)
        creating.cancel()
        with pytest.raises(asyncio.CancelledError):
            await creating
        release.set()
        for _ in range(200):
            if opened and not os.path.exists(f"/proc/self/fd/{opened[0]}"):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"tap fds {opened} still open")

    asyncio.run(scenario())
