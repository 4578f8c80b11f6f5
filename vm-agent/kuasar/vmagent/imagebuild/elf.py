"""Just enough ELF64 reading for the image build: shared-library needs (ldd without running the
loader), and a kernel module's `.modinfo` section (what depmod reads dependencies from)."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_RPATH, DT_RUNPATH = 0, 1, 5, 15, 29

# Where Debian's loader looks when no ld.so.cache exists (multiarch directories first).
DEFAULT_LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
                    "/lib", "/usr/lib")


class ElfError(ValueError):
    pass


@dataclass
class DynamicInfo:
    interpreter: str | None = None
    needed: list[str] = field(default_factory=list)
    runpath: list[str] = field(default_factory=list)


def _header(data: bytes) -> tuple:
    if data[:4] != ELF_MAGIC:
        raise ElfError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ElfError("only little-endian ELF64 is supported")
    # e_type e_machine e_version e_entry e_phoff e_shoff e_flags e_ehsize e_phentsize e_phnum
    # e_shentsize e_shnum e_shstrndx
    return struct.unpack_from("<HHIQQQIHHHHHH", data, 16)


def _cstr(data: bytes, offset: int) -> str:
    end = data.index(b"\0", offset)
    return data[offset:end].decode()


def dynamic_info(data: bytes) -> DynamicInfo:
    """PT_INTERP and the DT_NEEDED / DT_RUNPATH entries of an executable or shared object."""
    _, _, _, _, phoff, _, _, _, phentsize, phnum, _, _, _ = _header(data)
    info = DynamicInfo()
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == PT_INTERP:
            info.interpreter = data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
        elif p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return info  # static

    def file_offset(vaddr: int) -> int:
        for start, offset, size in loads:
            if start <= vaddr < start + size:
                return offset + vaddr - start
        raise ElfError(f"address {vaddr:#x} is in no PT_LOAD segment")

    entries = []
    offset, size = dynamic
    for pos in range(offset, offset + size, 16):
        tag, value = struct.unpack_from("<qQ", data, pos)
        if tag == DT_NULL:
            break
        entries.append((tag, value))
    strtab = next((v for t, v in entries if t == DT_STRTAB), None)
    if strtab is None:
        raise ElfError("dynamic section without DT_STRTAB")
    base = file_offset(strtab)
    for tag, value in entries:
        if tag == DT_NEEDED:
            info.needed.append(_cstr(data, base + value))
        elif tag in (DT_RUNPATH, DT_RPATH):
            info.runpath.extend(p for p in _cstr(data, base + value).split(":") if p)
    return info


def section(data: bytes, name: str) -> bytes | None:
    """The contents of section `name` (e.g. ".modinfo"), or None."""
    _, _, _, _, _, shoff, _, _, _, _, shentsize, shnum, shstrndx = _header(data)
    if shoff == 0 or shstrndx >= shnum:
        return None

    def sh(i: int) -> tuple:
        # sh_name sh_type sh_flags sh_addr sh_offset sh_size sh_link sh_info sh_addralign sh_entsize
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)

    names_offset = sh(shstrndx)[4]
    for i in range(shnum):
        header = sh(i)
        if _cstr(data, names_offset + header[0]) == name:
            return data[header[4]:header[4] + header[5]]
    return None


def modinfo(data: bytes) -> dict[str, list[str]]:
    """A kernel module's `key=value` pairs (`name`, `depends`, `softdep`, `alias`, ...)."""
    raw = section(data, ".modinfo")
    if raw is None:
        raise ElfError("no .modinfo section: not a kernel module")
    info: dict[str, list[str]] = {}
    for item in raw.split(b"\0"):
        if b"=" in item:
            key, _, value = item.decode(errors="replace").partition("=")
            info.setdefault(key, []).append(value)
    return info


def find_library(name: str, runpath: list[str], origin: str, lib_dirs: tuple[str, ...] = DEFAULT_LIB_DIRS,
                 root: str = "/") -> str | None:
    """The path the loader would pick for DT_NEEDED `name` (its RUNPATH first, then the defaults)."""
    if "/" in name:
        return name if os.path.exists(os.path.join(root, name.lstrip("/"))) else None
    for directory in [p.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for p in runpath] + list(lib_dirs):
        candidate = os.path.join(directory, name)
        if os.path.exists(os.path.join(root, candidate.lstrip("/"))):
            return candidate
    return None


def library_closure(binaries: list[Path], lib_dirs: tuple[str, ...] = DEFAULT_LIB_DIRS) -> dict[str, Path]:
    """Every shared object (and the loader) the binaries need, transitively, like `ldd`.

    Maps the path the loader will open (e.g. "/lib/x86_64-linux-gnu/libc.so.6") to the host file
    holding it. Raises ElfError naming what is missing.
    """
    found: dict[str, Path] = {}
    todo = [Path(b) for b in binaries]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        real = path.resolve()
        if real in seen:
            continue
        seen.add(real)
        info = dynamic_info(real.read_bytes())
        if info.interpreter and info.interpreter not in found:
            found[info.interpreter] = Path(info.interpreter).resolve()
        for name in info.needed:
            lib = find_library(name, info.runpath, str(path.parent), lib_dirs)
            if lib is None:
                raise ElfError(f"{path}: needed library {name} not found in {', '.join(lib_dirs)}")
            if lib not in found:
                found[lib] = Path(lib).resolve()
                todo.append(Path(lib))
    return found
