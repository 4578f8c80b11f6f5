"""Thin ctypes wrappers for the Linux calls Python 3.11's `os` lacks (setns, unshare, mount, prctl, and
the new mount API's open_tree / mount_setattr / move_mount for id-mapped mounts)."""

from __future__ import annotations

import ctypes
import os

# The running program's own symbols, libc's among them: no ctypes.util.find_library, which runs
# ldconfig and imports tempfile, shutil and friends into a resident process.
libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MNT_DETACH = 2
# The longest unix socket path, in bytes: sun_path holds 108 with the terminating NUL.
SOCKET_PATH_MAX = 107

# ioctl on a namespace file: a new fd for the user namespace that owns it (<linux/nsfs.h>).
NS_GET_USERNS = 0xB701


# The new mount API, by number: glibc 2.36 has no wrappers for all three. The numbers are the same on
# every architecture (they come after the 2019 unification of syscall tables).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_IDMAP = 0x100000


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


# rt_sigaction by number: glibc's sigaction refuses the signals it reserves (32 and 33), the kernel does not.
_SYS_RT_SIGACTION = {"x86_64": 13, "aarch64": 134}
_SIGSET_BYTES = 8  # the kernel's sigset_t: 64 signals


class _KernelSigaction(ctypes.Structure):
    _fields_ = [("handler", ctypes.c_void_p), ("flags", ctypes.c_ulong), ("restorer", ctypes.c_void_p),
                ("mask", ctypes.c_uint64)]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(fd: int, nstype: int) -> None:
    _check(libc.setns(fd, nstype), "setns")


def unshare(flags: int) -> None:
    _check(libc.unshare(flags), "unshare")


def set_child_subreaper() -> None:
    _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


def set_parent_death_signal(sig: int) -> None:
    _check(libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def set_process_name(name: str) -> None:
    """Set the kernel's comm name (what `ps -o comm` and /proc/<pid>/comm show; 15 bytes kept)."""
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    # Paths as the file system APIs encode them: a name that is not UTF-8 reaches us as surrogates.
    _check(libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode() if fstype else None,
                       ctypes.c_ulong(flags), data.encode() if data else None),
           f"mount {source} on {target} ({fstype})")


def umount(target: str, flags: int = 0) -> None:
    _check(libc.umount2(os.fsencode(target), flags), f"umount {target}")


def idmapped_bind(source: str, target: str, userns_fd: int, attrs: int = 0) -> None:
    """Bind `source` on `target` seen through the id mapping of the user namespace `userns_fd`: files
    owned by host ids the namespace maps appear owned by the ids they map to (`attrs`: more
    MOUNT_ATTR_* bits, e.g. read-only)."""
    syscall = libc.syscall
    tree = syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(source), _OPEN_TREE_CLONE | os.O_CLOEXEC)
    if tree < 0:
        _check(-1, f"open_tree {source}")
    try:
        attr = _MountAttr(attr_set=MOUNT_ATTR_IDMAP | attrs, userns_fd=userns_fd)
        _check(syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH, ctypes.byref(attr),
                       ctypes.c_size_t(ctypes.sizeof(attr))), f"mount_setattr (id map) {source}")
        _check(syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH),
               f"move_mount {source} to {target}")
    finally:
        os.close(tree)


def set_readonly_recursive(target: str) -> None:
    """Make the mount at `target` and every mount below it read-only (mount_setattr, Linux 5.12):
    a bind remount with MS_RDONLY changes the top mount only."""
    attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY)
    _check(libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, os.fsencode(target), _AT_RECURSIVE, ctypes.byref(attr),
                        ctypes.c_size_t(ctypes.sizeof(attr))), f"mount_setattr (read-only, recursive) {target}")


def ignored_signals(status_text: str | None = None) -> set[int]:
    """The signals a process ignores, from the SigIgn line of its /proc/<pid>/status text (this
    process's own when None)."""
    if status_text is None:
        with open("/proc/self/status") as status:
            status_text = status.read()
    line = next(line for line in status_text.splitlines() if line.startswith("SigIgn:"))
    mask = int(line.split()[1], 16)
    return {sig for sig in range(1, 65) if mask & (1 << (sig - 1))}


def reset_to_default(sig: int) -> None:
    """Give `sig` its default action, also a signal glibc reserves (what a process started by exec from
    a process that ignored it would otherwise keep ignoring)."""
    number = _SYS_RT_SIGACTION.get(os.uname().machine)
    if number is None:
        raise OSError(f"rt_sigaction: no system call number for {os.uname().machine}")
    action = _KernelSigaction()  # all zero: SIG_DFL, no flags, nothing blocked
    _check(libc.syscall(number, sig, ctypes.byref(action), None, _SIGSET_BYTES), f"rt_sigaction({sig})")


# The signals glibc keeps for itself. Its posix_spawn sets them to ignored in the child, and a program
# started that way (by GNU make, or Python's subprocess without close_fds) keeps 32 ignored for life.
GLIBC_RESERVED_SIGNALS = frozenset({32, 33})


def forget_inherited_ignores() -> None:
    """Give glibc's reserved signals their default action where this process inherited them ignored: an
    ignored signal stays ignored across exec, through runc into every container process."""
    for sig in GLIBC_RESERVED_SIGNALS & ignored_signals():
        reset_to_default(sig)
