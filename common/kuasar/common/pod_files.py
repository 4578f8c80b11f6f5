"""A pod's /etc/hostname, /etc/hosts and /etc/resolv.conf, as containerd's own pod sandbox provides them.

CRI bind-mounts these files into a container only for pods of its built-in sandboxer (it writes them
while starting the pause container). For our pods the sandboxer writes them when it launches the pod
(at Create), with the content containerd would give them, under `<dir>/pods/<id>/`; the task server
binds them into every container of the pod whose spec does not mount those paths itself. Without them
a container sees its image's files: no cluster DNS, no pod hostname in /etc/hostname. The pod's
/dev/shm is mounted there too, by the task server (see PodService).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from . import cgroups
from .errors import InvalidArgument
from .ids import validate_id
from .rootfs_paths import resolve_in_root
from .state import overwrite

PODS_DIR = "pods"
# file name under the pod's directory -> where containers see it
MOUNTS = {"hostname": "/etc/hostname", "hosts": "/etc/hosts", "resolv.conf": "/etc/resolv.conf"}
# The pod's /dev/shm: a tmpfs the task server mounts under the pod's directory (see PodService).
SHM = "shm"
DEV_SHM = "/dev/shm"
HOST_HOSTS = Path("/etc/hosts")
HOST_RESOLV_CONF = Path("/etc/resolv.conf")
# Linux's HOST_NAME_MAX: sethostname(2) refuses a longer one, which the pod process found out at Start.
HOST_NAME_MAX = 64


def pod_dir(directory: Path, pod_id: str) -> Path:
    return directory / PODS_DIR / validate_id(pod_id, "pod id")


def resolv_conf(servers: list[str], searches: list[str], options: list[str]) -> str:
    """resolv.conf from CRI's DNSConfig, laid out as containerd writes it."""
    lines = []
    if searches:
        lines.append("search " + " ".join(searches))
    lines += [f"nameserver {server}" for server in servers]
    if options:
        lines.append("options " + " ".join(options))
    return "".join(line + "\n" for line in lines)


def check_names(hostname: str, dns: tuple[list[str], list[str], list[str]] | None) -> None:
    """Refuse a hostname or DNS entry that would not stay one line (or one path part) in the files."""
    for item in [entry for entries in dns or () for entry in entries]:
        if "\n" in item or "\0" in item:
            raise InvalidArgument(f"dns_config entry {item!r} has a line break")
    if "\n" in hostname or "\0" in hostname or "/" in hostname or len(hostname.encode()) > HOST_NAME_MAX:
        raise InvalidArgument(f"hostname {hostname!r} is not a host name")


def pod_file_contents(hostname: str, dns: tuple[list[str], list[str], list[str]] | None) -> dict[str, bytes]:
    """The three files by name. `dns` is CRI's (servers, searches, options), or None for the host's
    resolv.conf; an empty hostname means the node's, as for host-network pods."""
    check_names(hostname, dns)
    return {"hostname": ((hostname or socket.gethostname()) + "\n").encode(),
            "hosts": _read_or_empty(HOST_HOSTS),
            "resolv.conf": pod_resolv_conf(dns)}


def pod_resolv_conf(dns: tuple[list[str], list[str], list[str]] | None, host_file: Path = HOST_RESOLV_CONF) -> bytes:
    """A pod's resolv.conf: from CRI's DNSConfig, or the host's when it has none or, as containerd
    decides, one with nothing in it (crictl's `dns_config: {}`)."""
    content = resolv_conf(*dns) if dns is not None else ""
    return content.encode() if content else _read_or_empty(host_file)


def write_pod_files(path: Path, contents: dict[str, bytes]) -> None:
    """Write the files into `path` (made 0700), 0644 so that containers read them as any user.

    Written in place, not via a rename: nothing reads them before the pod's first container, and a
    container's bind mount holds the file it was given anyway."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, data in contents.items():
        fd = os.open(path / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def add_pod_file_mounts(spec: dict[str, Any], path: Path, rootfs: Path) -> list[str]:
    """Bind the pod's files into `spec` where it mounts nothing at those paths and runc can mount them in
    `rootfs` (the file is there, or can be made: a read-only rootfs without it is left alone); returns
    what was added."""
    taken = {m.get("destination") for m in spec.get("mounts") or [] if isinstance(m, dict)}
    readonly = bool((spec.get("root") or {}).get("readonly"))
    added = []
    for name, destination in MOUNTS.items():
        source = path / name
        if destination in taken or not source.is_file() or not _mountable(rootfs, destination):
            continue
        spec.setdefault("mounts", []).append({
            "destination": destination, "type": "bind", "source": str(source),
            "options": ["rbind", "rprivate", "ro" if readonly else "rw"]})
        added.append(destination)
    if _use_pod_shm(spec, path / SHM):
        added.append(DEV_SHM)
    return added


def rewrite_container_spec(bundle: Path, spec: dict[str, Any], pod_path: Path | None, changed: bool = False) -> None:
    """Change a CRI container's config.json (`spec`, read from `bundle`) for a host runtime (runc, runsc)
    run with its cgroupfs driver: a systemd-form cgroupsPath becomes the path systemd's would be, and the
    pod's files and /dev/shm in `pod_path` (if any) are bound in. Call with the rootfs mounted: what can
    be bound depends on what it holds. Written back only if something changed (`changed`: the caller
    changed `spec` already); containerd wrote the file for this Create and only the runtime, started
    next, reads it."""
    changed = cgroups.use_cgroupfs_path(spec) or changed
    rootfs = bundle / (spec.get("root") or {}).get("path", "rootfs")
    if pod_path is not None and add_pod_file_mounts(spec, pod_path, rootfs):
        changed = True
    if changed:
        overwrite(bundle / "config.json", json.dumps(spec).encode())


def private_dev_shm(spec: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The spec's mounts at /dev/shm if each is the private tmpfs of containerd's default spec ([] when
    it mounts nothing there); None when /dev/shm comes from elsewhere (CRI's host /dev/shm of a
    host-IPC pod, a volume), which is not ours to replace."""
    at_shm = [m for m in spec.get("mounts") or [] if isinstance(m, dict) and m.get("destination") == DEV_SHM]
    return None if any(m.get("type") != "tmpfs" for m in at_shm) else at_shm


def put_dev_shm(spec: dict[str, Any], private: list[dict[str, Any]], mount: dict[str, Any]) -> None:
    """`mount` at /dev/shm in place of the `private` mounts there (see private_dev_shm), or added."""
    mounts = spec.setdefault("mounts", [])
    if private:
        mounts[mounts.index(private[0])] = mount
        for extra in private[1:]:
            mounts.remove(extra)
    else:
        mounts.append(mount)


def _use_pod_shm(spec: dict[str, Any], shm: Path) -> bool:
    """Bind the pod's /dev/shm over the private tmpfs of containerd's default spec (or where the spec
    mounts nothing at /dev/shm); a /dev/shm the spec takes from elsewhere is left alone."""
    private = private_dev_shm(spec)
    if not os.path.ismount(shm) or private is None:
        return False
    put_dev_shm(spec, private, {"destination": DEV_SHM, "type": "bind", "source": str(shm),
                                "options": ["rbind", "rprivate", "rw"]})
    return True


def _mountable(rootfs: Path, destination: str) -> bool:
    """Whether runc can bind a file at `destination`: it follows the image's symlinks inside the rootfs
    (an /etc/resolv.conf linked to systemd-resolved's file, which the image lacks, is common) and makes
    a missing file, but not on a read-only rootfs; a directory there is not ours to cover."""
    try:
        target = resolve_in_root(rootfs, destination)
    except InvalidArgument:  # a symlink loop: runc would fail on it
        return False
    if target.is_file():
        return True
    if target.exists():
        return False
    ancestor = target.parent
    while not ancestor.exists() and ancestor != rootfs:
        ancestor = ancestor.parent
    return os.access(ancestor, os.W_OK)  # False on a read-only mount (EROFS)


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # no such file on this host (or not a readable one): the pod gets an empty one
        return b""
