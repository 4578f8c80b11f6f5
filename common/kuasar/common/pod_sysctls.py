"""The sysctls a pod's namespaces get, as containerd's own sandbox gives them to its pause container.

CRI sends the pod's (PodSandboxConfig.linux.sysctls, kubelet's `securityContext.sysctls`); containerd
2.x adds two to every pod with a network namespace of its own, by its CRI defaults
`enable_unprivileged_ports` and `enable_unprivileged_icmp` (both on): binding ports below 1024 and
ICMP echo sockets need no privilege there. Its containers' specs carry none of them: the pod's
namespaces are set once, by the pod's process. Only sysctls those namespaces scope can be set, as runc
checks for a container.
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import InvalidArgument

# containerd's CRI defaults for a pod with its own network namespace (not given to one that sets them).
UNPRIVILEGED_PORTS = ("net.ipv4.ip_unprivileged_port_start", "0")
# Not in a user-namespaced pod: the group range must be mapped in its namespace (containerd skips it too).
UNPRIVILEGED_ICMP = ("net.ipv4.ping_group_range", "0 2147483647")
# What an IPC namespace scopes (besides fs.mqueue.*), as runc lists them.
IPC_SYSCTLS = frozenset({"kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
                         "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced"})
# A sysctl's value is one write to /proc/sys; the kernel takes at most a page.
MAX_VALUE_BYTES = 4096
# Far above real names (the longest under /proc/sys/net are ~60 bytes); kuasar-pause's path buffer.
MAX_NAME_BYTES = 256
# Far above what a pod sets (kubelet's safe sysctls are a dozen); kuasar-pause takes this many.
MAX_SYSCTLS = 128


def sysctl_parts(key: str) -> list[str]:
    """A sysctl's name -> its path's parts under /proc/sys, read as sysctl.d(5) does: in the dotted form
    a slash stands for a literal dot (kubelet's `net.ipv4.conf.eth0/100.rp_filter` is VLAN interface
    eth0.100's), and a name whose first separator is a slash is a path whose dots are literal
    (`net/ipv4/conf/eth0.100/rp_filter`). A name that could leave /proc/sys, or that kuasar-pause's
    PATH=VALUE could not carry, is refused."""
    first = next((c for c in key if c in "./"), ".")
    parts = key.split("/") if first == "/" else [p.replace("/", ".") for p in key.split(".")]
    if (not key or len(key.encode()) > MAX_NAME_BYTES or "=" in key
            or any(p in ("", ".", "..") or not p.isprintable() or p != p.strip() for p in parts)):
        raise InvalidArgument(f"bad sysctl name {key!r}")
    return parts


def sysctl_path(key: str) -> str:
    """A sysctl's path relative to /proc/sys: `net.ipv4.conf.eth0/100.rp_filter` ->
    `net/ipv4/conf/eth0.100/rp_filter`."""
    return "/".join(sysctl_parts(key))


def _scope(key: str) -> str:
    if key.startswith("net."):
        return "network"
    if key in IPC_SYSCTLS or key.startswith("fs.mqueue."):
        return "IPC"
    if key == "kernel.domainname":
        return "UTS"
    return ""


def with_containerd_defaults(requested: Mapping[str, str], own_net: bool, userns: bool = False) -> dict[str, str]:
    """`requested` plus what containerd's own sandbox adds for a pod with its own network namespace."""
    sysctls = dict(requested)
    if own_net:
        sysctls.setdefault(*UNPRIVILEGED_PORTS)
        if not userns:
            sysctls.setdefault(*UNPRIVILEGED_ICMP)
    return sysctls


def pod_sysctls(requested: Mapping[str, str], own_net: bool, own_ipc: bool, own_uts: bool,
                userns: bool = False) -> dict[str, str]:
    """The sysctls to set in the pod's namespaces: `requested` plus containerd's defaults, each one
    checked to be scoped by a namespace the pod has of its own (else INVALID_ARGUMENT)."""
    sysctls = with_containerd_defaults(requested, own_net, userns)
    check_sysctls(sysctls)
    own = {"network": own_net, "IPC": own_ipc, "UTS": own_uts}
    for key in sysctls:
        scope = _scope(".".join(sysctl_parts(key)))
        if not scope:
            raise InvalidArgument(f"sysctl {key} is not scoped by a pod's namespaces (only net.*, IPC "
                                  "and kernel.domainname sysctls are)")
        if not own[scope]:
            raise InvalidArgument(f"sysctl {key} needs the pod's own {scope} namespace; it shares the host's")
    return sysctls


def check_sysctls(sysctls: Mapping[str, str]) -> None:
    """Refuse too many sysctls, a name that could leave /proc/sys, or a value that is not one line."""
    if len(sysctls) > MAX_SYSCTLS:
        raise InvalidArgument(f"{len(sysctls)} sysctls; at most {MAX_SYSCTLS} are taken")
    for key, value in sysctls.items():
        sysctl_parts(key)
        if "\n" in value or "\0" in value or len(value.encode()) > MAX_VALUE_BYTES:
            raise InvalidArgument(f"sysctl {key}: bad value {value[:64]!r}")
