"""Finding a container's WebAssembly module inside its rootfs, the way a chrooted process would.

containerd turns the image's Entrypoint + Cmd into `process.args`; `args[0]` names the module (as
Kuasar does: the image config is never read). An absolute name is looked up from the rootfs root, a
relative one from `process.cwd` and then from the root. Symlinks and `..` are resolved *inside* the
rootfs, so an image cannot point the sandboxer at a host file. Only a 4-byte header is read here:
the task server never compiles (see launch.py).
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from kuasar.common.errors import InvalidArgument
from kuasar.common.rootfs_paths import resolve_in_root

WASM_MAGIC = b"\0asm"
MODULE_VERSION = b"\x01\x00\x00\x00"
# The component model's binary: version 0x0d, layer 1 (a core module is layer 0).
COMPONENT_VERSION = b"\x0d\x00\x01\x00"


class NotAModule(InvalidArgument):
    """args[0] names no WebAssembly file in the rootfs: a program runc would look up in $PATH, or a file
    that is not WebAssembly (an ELF binary, a script). A wasm pod may run such a container with runc."""


def _refusal(name: str) -> type[InvalidArgument]:
    """The error for a name that is no module: a `*.wasm` name is a wasm image gone wrong, never a
    program for runc; any other may be a Linux container's."""
    return InvalidArgument if name.endswith(".wasm") else NotAModule


def _candidates(name: str, cwd: str) -> list[str]:
    return list(dict.fromkeys([name] if name.startswith("/") else [posixpath.join(cwd or "/", name), "/" + name]))


def module_file(rootfs: Path, name: str, cwd: str = "/") -> Path | None:
    """The host path of the file `name` names in the rootfs, if there is one (not checked to be a module)."""
    for candidate in _candidates(name, cwd):
        path = resolve_in_root(rootfs, candidate)
        if path.is_file():
            return path
    return None


def locate_module(rootfs: Path, args: list[str], cwd: str = "/") -> Path:
    """The host path of the module `args[0]` names, checked to be a core WebAssembly module."""
    if not args or not args[0]:
        raise InvalidArgument("process.args is empty: args[0] must name the .wasm module in the image")
    name = args[0]
    path = module_file(rootfs, name, cwd)
    if path is not None:
        check_module_header(path, name)
        return path
    # Not NOT_FOUND: containerd passes the code on to CRI, where it reads as an unknown container.
    raise _refusal(name)(f"wasm module {name!r} not found in the container's rootfs (looked for "
                         f"{', '.join(_candidates(name, cwd))}); args[0] must name a .wasm file in the image")


def check_module_header(path: Path, name: str) -> None:
    try:
        with open(path, "rb") as f:
            header = f.read(8)
    except OSError as exc:
        raise InvalidArgument(f"wasm module {name!r}: {exc.strerror}") from None
    if header[:4] != WASM_MAGIC:
        raise _refusal(name)(f"{name!r} is not a WebAssembly module (no \\0asm header)")
    if header[4:8] not in (MODULE_VERSION, COMPONENT_VERSION):
        raise InvalidArgument(f"{name!r} is a WebAssembly binary of an unknown version ({header[4:8].hex()}); "
                              "core modules (WASI preview 1) and components (WASI preview 2) are supported")


def is_component(path: Path) -> bool:
    """Whether the (checked) WebAssembly file at `path` is a component rather than a core module."""
    with open(path, "rb") as f:
        return f.read(8)[4:8] == COMPONENT_VERSION
