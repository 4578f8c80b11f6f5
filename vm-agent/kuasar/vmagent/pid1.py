"""What PID 1 does before serving: leave the initramfs root, mount the pseudo file systems and
cgroup2, load kernel modules, bring `lo` up, mount the host's shared directory, power off.

Everything here is synchronous and runs before the event loop starts (or, for poweroff, last).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import socket
import struct
import time

from kuasar.common import linux

log = logging.getLogger(__name__)

_libc = ctypes.CDLL("libc.so.6", use_errno=True)

SYS_FINIT_MODULE = 313  # x86-64
RB_POWER_OFF = 0x4321FEDC
RB_AUTOBOOT = 0x01234567
MS_MOVE = 0x2000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
ROOT_MOUNTPOINT = "/.root"

# (source, target, fstype, flags, data); "busy" (already mounted) is fine.
PSEUDO_MOUNTS = [
    ("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", linux.MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", linux.MS_NOSUID | linux.MS_NOEXEC, "mode=0620,ptmxmode=0666,gid=5"),
    ("shm", "/dev/shm", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777"),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, "nsdelegate"),
]


def boottime_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def leave_initramfs_root() -> bool:
    """Make `/` a bind mount of the initramfs so runc's pivot_root works; False if that failed.

    pivot_root(2) refuses to move the initial rootfs (EINVAL). A bind mount of it, moved onto `/`
    and chrooted into, is an ordinary mount with a parent: containers then get pivot_root
    isolation, without copying the image into a second tmpfs (`switch_root`'s way).
    """
    if not os.path.isdir(ROOT_MOUNTPOINT):
        return False
    try:
        linux.mount("/", ROOT_MOUNTPOINT, "", linux.MS_BIND)
        os.chdir(ROOT_MOUNTPOINT)
        linux.mount(".", "/", "", MS_MOVE)
        os.chroot(".")
        os.chdir("/")
    except OSError as err:
        log.warning("cannot move off the initramfs root (%s); containers will use --no-pivot", err)
        return False
    return True


def mount_pseudo_filesystems() -> None:
    for source, target, fstype, flags, data in PSEUDO_MOUNTS:
        os.makedirs(target, exist_ok=True)
        try:
            linux.mount(source, target, fstype, flags, data)
        except OSError as err:
            if err.errno != errno.EBUSY:
                raise
    if not os.path.exists("/dev/ptmx"):
        os.symlink("pts/ptmx", "/dev/ptmx")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        if not os.path.lexists(f"/dev/{name}"):
            os.symlink(target, f"/dev/{name}")


# virtio device id (/sys/bus/virtio/devices/*/device) -> the driver module to load for it.
VIRTIO_DRIVERS = {
    0x13: "vmw_vsock_virtio_transport",  # vsock: first, the host waits for it
    0x09: "9pnet_virtio",
    0x1A: "virtiofs",
    0x01: "virtio_net",
    0x02: "virtio_blk",
    0x03: "virtio_console",
}


def finit_module(path: str) -> None:
    """Load one .ko with finit_module(2); already loaded is fine."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.syscall(SYS_FINIT_MODULE, fd, b"", 0) != 0:
            err = ctypes.get_errno()
            if err != errno.EEXIST:
                raise OSError(err, f"finit_module {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


class ModuleSet:
    """The image's modules (/etc/vmagent/modules: `name path...`, dependencies first) and which are in."""

    def __init__(self, table: dict[str, list[str]], base: str) -> None:
        self.table = table
        self.base = base
        self.loaded: set[str] = set()
        self.failed: list[tuple[str, str]] = []

    @classmethod
    def from_file(cls, path: str, release: str | None = None) -> ModuleSet:
        table: dict[str, list[str]] = {}
        try:
            with open(path) as f:
                for line in f:
                    words = line.split()
                    if words and not words[0].startswith("#"):
                        table[words[0]] = words[1:]
        except FileNotFoundError:
            pass
        return cls(table, f"/lib/modules/{release or os.uname().release}")

    def load(self, names: list[str]) -> int:
        """Load `names` with their dependencies (unknown names are skipped); returns how many .ko loaded."""
        count = 0
        for name in names:
            for rel in self.table.get(name, []):
                if rel in self.loaded:
                    continue
                try:
                    finit_module(rel if rel.startswith("/") else f"{self.base}/{rel}")
                    count += 1
                except OSError as err:
                    self.failed.append((rel, str(err)))
                self.loaded.add(rel)
        return count


def virtio_device_ids(bus: str = "/sys/bus/virtio/devices") -> list[int]:
    ids = []
    try:
        entries = sorted(os.listdir(bus))
    except FileNotFoundError:
        return ids
    for entry in entries:
        try:
            with open(f"{bus}/{entry}/device") as f:
                ids.append(int(f.read().strip(), 16))
        except (OSError, ValueError):
            continue
    return ids


def has_pci_devices() -> bool:
    try:
        return bool(os.listdir("/sys/bus/pci/devices"))
    except FileNotFoundError:
        return False


def boot_modules(modules: ModuleSet, sharefs_type: str) -> list[str]:
    """Load the transports, then drivers for the virtio devices present (vsock first). Returns them."""
    names = ["virtio_mmio"] + (["virtio_pci"] if has_pci_devices() else [])
    modules.load(names)
    present = set(virtio_device_ids())
    drivers = [driver for dev_id, driver in VIRTIO_DRIVERS.items() if dev_id in present]
    if "9pnet_virtio" in drivers and sharefs_type == "9p":
        drivers.insert(drivers.index("9pnet_virtio") + 1, "9p")
    modules.load(drivers)
    return names + drivers


def link_up(name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sH", name.encode(), 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, SIOCGIFFLAGS, ifreq)[:18])[1]
        if not flags & IFF_UP:
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH", name.encode(), flags | IFF_UP))


def mount_share(sharefs_type: str, tag: str, target: str, cache: str = "loose") -> None:
    os.makedirs(target, exist_ok=True)
    if sharefs_type == "9p":
        options = f"trans=virtio,version=9p2000.L,msize=524288,cache={cache}"
        linux.mount(tag, target, "9p", linux.MS_NODEV, options)
    elif sharefs_type == "virtiofs":
        linux.mount(tag, target, "virtiofs", linux.MS_NODEV, "")
    else:
        raise ValueError(f"unknown shared file system type {sharefs_type!r}")


def power_off(reboot: bool = False) -> None:
    """Flush and power the VM off (ACPI S5: QEMU exits). Never returns when it works."""
    os.sync()
    _check(_libc.reboot(RB_AUTOBOOT if reboot else RB_POWER_OFF), "reboot")
