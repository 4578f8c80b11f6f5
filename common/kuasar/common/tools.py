"""Where a helper program we run is found (QEMU, vhost-device-vsock, virtiofsd, ...)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# The source checkout this module is in, where `make setup` puts the helpers it fetches (.prefix/bin).
# Meaningless in a frozen binary, whose modules are unpacked under $TMPDIR.
CHECKOUT = Path(__file__).resolve().parents[3]


def frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


def install_prefix(executable: str) -> Path | None:
    """The prefix of an installed program, as `make install` lays it out: `<prefix>/bin/<program>`, or
    the build's own file `<prefix>/lib/kuasar/<build>` the program names link to; else None."""
    exe = Path(executable).absolute()
    if exe.parent.name == "bin":
        return exe.parent.parent
    if exe.parent.name == "kuasar" and exe.parent.parent.name == "lib":
        return exe.parent.parent.parent
    return None


def installed_dir() -> Path:
    """The bin/ of a frozen (installed) binary: `make install` puts the helpers there."""
    prefix = install_prefix(sys.executable)
    return prefix / "bin" if prefix is not None else Path(sys.executable).parent


def find_tool(name: str) -> str | None:
    """An absolute program path: as given if it has a slash, else from $KUASAR_PREFIX/bin, then the
    installed binary's directory (frozen) or the checkout's .prefix/bin, then PATH. A frozen binary
    never looks where its own modules are: that is under $TMPDIR (/tmp), which anyone may write to,
    and a program planted there would run as root."""
    if "/" in name:
        return name if os.access(name, os.X_OK) else None
    directories = []
    prefix = os.environ.get("KUASAR_PREFIX")
    if prefix:
        directories.append(Path(prefix) / "bin")
    directories.append(installed_dir() if frozen() else CHECKOUT / ".prefix" / "bin")
    for directory in directories:
        candidate = directory / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)
