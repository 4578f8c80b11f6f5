"""What identifies the code this program runs, so that a sandboxer started after an upgrade can tell a
task server an earlier build left running (task servers outlive their sandboxer by design)."""

from __future__ import annotations

import importlib.util
import os
import sys
import zlib
from pathlib import Path

from . import __version__

# The packages of the kuasar namespace, whatever this process has imported of them (a forked task
# server and one started anew must agree).
PACKAGES = ("common", "runc", "wasm", "vmm", "quark", "vmagent", "ctl")


def _code_files() -> list[str]:
    if getattr(sys, "frozen", False):
        return [sys.executable]  # one file holds all the code: an upgrade replaces it
    folders = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(f"kuasar.{name}")
        if spec is not None and spec.submodule_search_locations:
            folders.extend(spec.submodule_search_locations)
    return sorted(str(path) for folder in folders for path in Path(folder).rglob("*.py"))


def build_id() -> str:
    """A digest of the version and of each code file's path, size and modification time. zlib's
    checksums, not hashlib: hashlib maps OpenSSL's libcrypto (~4 MB) into both resident processes, and
    telling two builds apart needs no cryptography."""
    text = bytearray(__version__.encode())
    for name in _code_files():
        try:
            info = os.stat(name)
        except OSError:
            continue
        text += f"\n{name}\0{info.st_size}\0{info.st_mtime_ns}".encode()
    return f"{zlib.crc32(text):08x}{zlib.adler32(text):08x}"
