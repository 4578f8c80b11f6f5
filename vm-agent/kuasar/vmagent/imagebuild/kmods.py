"""Kernel module dependencies: write `modules.dep` from the modules' own `.modinfo` (Debian's package
ships none: depmod runs in its postinst), read it back, and order a module set for loading.

The guest loads modules with the raw finit_module(2) syscall, which resolves nothing itself, so
the image carries the closure of the wanted modules in an order where every module comes after
the modules it depends on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath

from . import elf
from .compression import MODULE_SUFFIXES

_KO_RE = re.compile("(" + "|".join(re.escape(s) for s in (".ko", *MODULE_SUFFIXES)) + ")$")


class ModuleError(LookupError):
    pass


def module_name(path: str) -> str:
    """"kernel/net/9p/9pnet_virtio.ko" -> "9pnet_virtio" (dashes and underscores are the same)."""
    return _KO_RE.sub("", PurePosixPath(path).name).replace("-", "_")


def is_module_file(path: str) -> bool:
    """`x.ko`, or `x.ko` compressed the ways kmod knows."""
    return _KO_RE.search(path) is not None


def normalize(name: str) -> str:
    return name.replace("-", "_")


def soft_pre_deps(softdep: Iterable[str]) -> list[str]:
    """The "pre:" modules of modinfo `softdep` values ("pre: crc32c post: foo")."""
    names: list[str] = []
    for value in softdep:
        mode = None
        for word in value.split():
            if word.endswith(":"):
                mode = word[:-1]
            elif mode == "pre":
                names.append(normalize(word))
    return names


def build_modules_dep(modules: Mapping[str, bytes], with_softdeps: bool = True) -> str:
    """modules.dep text for `modules` (path relative to lib/modules/<ver> -> .ko contents)."""
    return build_modules_dep_from_info({p: elf.modinfo(d) for p, d in modules.items()}, with_softdeps)


def build_modules_dep_from_info(infos: Mapping[str, Mapping[str, list[str]]], with_softdeps: bool = True) -> str:
    """modules.dep text from each module's modinfo (path relative to lib/modules/<ver> -> modinfo).

    Like depmod, each line lists the module's full dependency closure, nearest first. Dependencies
    come from the `depends=` entries the kernel build recorded in each module (and, optionally,
    `softdep=pre:` modules that exist in the set).
    """
    by_name = {module_name(p): p for p in infos}
    direct: dict[str, list[str]] = {}
    for path, info in infos.items():
        deps = [normalize(d) for v in info.get("depends", []) for d in v.split(",") if d]
        missing = [d for d in deps if d not in by_name]
        if missing:
            raise ModuleError(f"{path}: depends on modules not in the package: {', '.join(missing)}")
        if with_softdeps:  # optional by nature: only those the package has
            deps += [d for d in soft_pre_deps(info.get("softdep", [])) if d in by_name and d not in deps]
        direct[path] = [by_name[d] for d in deps]
    lines = []
    for path in sorted(infos):
        closure: list[str] = []
        queue = list(direct[path])
        while queue:
            dep = queue.pop(0)
            if dep not in closure and dep != path:
                closure.append(dep)
                queue.extend(direct[dep])
        lines.append(f"{path}:" + "".join(f" {d}" for d in closure))
    return "\n".join(lines) + "\n"


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """module name -> (path, dependency paths) from modules.dep text."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        path, sep, deps = line.partition(":")
        if not sep:
            raise ModuleError(f"bad modules.dep line: {line!r}")
        table[module_name(path.strip())] = (path.strip(), deps.split())
    return table


def load_order(dep_table: Mapping[str, tuple[str, list[str]]], wanted: Iterable[str],
               builtin: Iterable[str] = ()) -> list[str]:
    """Paths of `wanted` modules and everything they need, each after its dependencies.

    Built-in modules (`modules.builtin`) are skipped; a wanted module that is neither in the
    table nor built in is an error, as is a dependency cycle.
    """
    builtin_names = {module_name(b) for b in builtin}
    by_path = {path: name for name, (path, _) in dep_table.items()}
    order: list[str] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ModuleError("module dependency cycle: " + " -> ".join((*chain, name)))
        entry = dep_table.get(name)
        if entry is None:
            if name in builtin_names:
                state[name] = "done"
                return
            raise ModuleError(f"module {name} not found" + (f" (needed by {chain[-1]})" if chain else ""))
        state[name] = "visiting"
        path, deps = entry
        # modules.dep lists the closure nearest-first; visiting in reverse loads the deepest first.
        for dep_path in reversed(deps):
            visit(by_path.get(dep_path, module_name(dep_path)), (*chain, name))
        state[name] = "done"
        order.append(path)

    for name in wanted:
        visit(normalize(name), ())
    return order


def module_table(per_module: Mapping[str, list[str]]) -> str:
    """The image's /etc/vmagent/modules: one line per loadable module, `name path...` with the
    paths in load order (its dependencies first, the module itself last)."""
    lines = ["# module: .ko files to load, in order (relative to /lib/modules/<release>)"]
    lines += [f"{name} {' '.join(paths)}" for name, paths in per_module.items()]
    return "\n".join(lines) + "\n"
