#!/usr/bin/env python3
"""Install / uninstall kuasar-py's frozen binaries, systemd units, configs and containerd fragments.

    python3 packaging/install.py install   [--prefix /usr/local] [--destdir D] [--dist dist] [--shimdir DIR]
    python3 packaging/install.py uninstall [--prefix /usr/local] [--destdir D]

(`make install PREFIX=... DESTDIR=...` / `make uninstall` call this.) Standard library only.

What goes where (paths as seen on the target system; everything is written below DESTDIR):

* `$PREFIX/bin/`: `kuasar` (the multi-call binary) and one hard link to it per program (runc-sandboxer,
  wasm-sandboxer, vmm-sandboxer, quark-sandboxer, vm-agent, kuasar-ctl, containerd-shim-kuasar-*-v1/-v2);
* `--shimdir` (default `$PREFIX/bin`): the containerd-shim-kuasar-* names again, for a prefix that is not
  on containerd's PATH (links to the ones in `$PREFIX/bin`);
* `$SYSCONFDIR/kuasar/` (`/etc` for PREFIX=/usr, else `$PREFIX/etc`): one config per sandboxer, the shims'
  `shim.toml`, and the containerd fragments `containerd-kuasar.toml` (2.x) and `containerd-kuasar-1.6.toml`.
  An existing config that differs from ours is never overwritten: ours goes beside it as `<name>.kuasar-new`
  (a changed one is kept on uninstall too);
* `$PREFIX/lib/systemd/system/` (`/usr/lib/systemd/system` for PREFIX=/usr): `kuasar-<type>.service`, kept
  like a config when an administrator changed it (systemd ignores the `.kuasar-new` beside it);
* `$PREFIX/share/kuasar/install-manifest.json`: every file, link and directory this install created, so
  `uninstall` removes exactly those (configs and units only when unchanged). With a DESTDIR, the shared
  directories (`bin`, `etc`, `lib/systemd/system`, ...) were only missing from the staging tree: they are
  recorded as such and removed by an uninstall with a DESTDIR only, never on the target system.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MULTICALL = "kuasar"
MANIFEST = "share/kuasar/install-manifest.json"
STAMP = ".kuasar-build.json"  # written by build_binaries.py next to the binaries
# Our version of a config or unit an administrator changed is written next to it under this suffix.
NEW_SUFFIX = ".kuasar-new"
# Built by `make setup` (the static program pod processes exec) and `make guest-image` (vmm's guest).
PAUSE = ROOT / ".prefix" / "bin" / "kuasar-pause"
# What `make setup` fetched or built into .prefix/bin that the sandboxers run (vmm-sandboxer and
# vm-agent boot: vhost-device-vsock; quark-sandboxer's gVisor backend: runsc, new enough for its systrap
# platform, which Debian 12's own runsc is not; runc's checkpoints: criu, which Debian 12's does not
# run on 6.x kernels): installed beside the binaries, where an installed sandboxer looks first
# (kuasar.common.tools) and which its unit puts first on PATH (runc finds criu there).
FETCHED_HELPERS = ("vhost-device-vsock", "runsc", "criu")
GUEST_DIR = ROOT / "build" / "guest"
# containerd's own config, where an administrator imports our fragment (containerd-kuasar*.toml).
CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
FRAGMENT_PREFIX = "containerd-kuasar"
# Of a build's sha256 in its file name: enough to tell builds apart.
BUILD_DIGEST_CHARS = 16
GUEST_FILES = ("vmlinux", "initramfs.cpio", "manifest.json")

# kind -> (program, description); gvisor is a second quark-sandboxer with the runsc backend.
SANDBOXERS = {
    "runc": ("runc-sandboxer", "runc containers"),
    "wasm": ("wasm-sandboxer", "WebAssembly"),
    "vmm": ("vmm-sandboxer", "micro-VMs"),
    "quark": ("quark-sandboxer", "Quark app kernel"),
    "gvisor": ("quark-sandboxer", "gVisor runsc app kernel"),
}
CONFIGS = ["runc.toml", "wasm.toml", "vmm.toml", "quark.toml", "gvisor.toml", "shim.toml",
           "containerd-kuasar.toml", "containerd-kuasar-1.6.toml"]


class Layout:
    """Target paths (as the installed system sees them) and where to write them (under DESTDIR)."""

    def __init__(self, prefix: str, destdir: str = "", sysconfdir: str | None = None,
                 unitdir: str | None = None, shimdir: str | None = None) -> None:
        self.prefix = Path(prefix)
        if not self.prefix.is_absolute():
            raise SystemExit(f"install: PREFIX must be absolute, not {prefix!r}")
        # Absolute, so a relative DESTDIR means the same tree wherever a later step runs from.
        self.destdir = Path(destdir).absolute() if destdir else None
        usr = self.prefix == Path("/usr")
        self.bindir = self.prefix / "bin"
        self.sysconfdir = Path(sysconfdir) if sysconfdir else (Path("/etc") if usr else self.prefix / "etc")
        self.confdir = self.sysconfdir / "kuasar"
        self.unitdir = Path(unitdir) if unitdir else (Path("/usr/lib/systemd/system") if usr
                                                      else self.prefix / "lib/systemd/system")
        self.shimdir = Path(shimdir) if shimdir else self.bindir
        for name, path in (("SYSCONFDIR", self.sysconfdir), ("UNITDIR", self.unitdir), ("SHIMDIR", self.shimdir)):
            if not path.is_absolute():  # refused before anything is removed or written
                raise SystemExit(f"install: {name} must be absolute, not {str(path)!r}")
        self.manifest = self.prefix / MANIFEST
        self.guestdir = self.prefix / "share/kuasar/guest"
        # The multi-call binary, one file per build (kuasar-<digest>); the program names link to it.
        self.libdir = self.prefix / "lib/kuasar"

    def real(self, path: Path) -> Path:
        """Where `path` of the target system is written now (DESTDIR + path)."""
        return self.destdir / path.relative_to("/") if self.destdir else path

    def owns(self, directory: Path) -> bool:
        """A directory only kuasar uses (its configs, builds, share dir), as opposed to a shared one like bin."""
        ours = (self.confdir, self.libdir, self.prefix / "share/kuasar")
        return any(directory == d or d in directory.parents for d in ours)


_digests: dict[tuple[int, int, int, int], str] = {}


def sha256(path: Path) -> str:
    """Content hash, computed once per inode (the programs are ~20 hard links to one 40 MB file)."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


class Installer:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.entries: list[dict[str, str]] = []  # in creation order
        self.kept: list[str] = []

    def _mkdirs(self, directory: Path) -> None:
        """Create `directory` and its missing parents, recording each one the target system lacked."""
        destdir = self.layout.destdir
        if destdir is not None:
            destdir.mkdir(mode=0o755, parents=True, exist_ok=True)  # the staging root is not part of the install
        missing = []
        d = directory
        while d != d.parent and not self.layout.real(d).exists():  # Path("/").parent is "/" itself
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            self.layout.real(d).mkdir(mode=0o755)
            self.entries.append({"type": self._dir_type(d), "path": str(d)})

    def _dir_type(self, directory: Path) -> str:
        """A DESTDIR starts empty, so /usr, /usr/local/bin, ... are "created" there, yet on the target they
        belong to the system: an uninstall there must not remove them even when they happen to be empty."""
        if self.layout.destdir is None or self.layout.owns(directory):
            return "dir"
        return "stagedir"

    def _replace(self, path: Path) -> None:
        real = self.layout.real(path)
        if real.is_symlink() or real.exists():
            real.unlink()

    def binary(self, src: Path, dest: Path, mode: int = 0o755) -> None:
        self._mkdirs(dest.parent)
        real = self.layout.real(dest)
        tmp = real.with_name(f".{real.name}.new")
        tmp.unlink(missing_ok=True)
        shutil.copy2(src, tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, real)
        self.entries.append({"type": "file", "path": str(dest), "sha256": sha256(real)})

    def symlink(self, target: Path, dest: Path) -> None:
        """`dest` -> `target` (a path on the target system), replacing what `dest` was. Relative, so that
        it holds in a DESTDIR's staging tree as on the target."""
        self._mkdirs(dest.parent)
        real = self.layout.real(dest)
        tmp = real.with_name(f".{real.name}.new")
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(target, dest.parent), tmp)
        os.replace(tmp, real)  # never a moment without the name
        self.entries.append({"type": "symlink", "path": str(dest), "target": str(target)})

    def keep_file(self, path: Path) -> None:
        """List a file an earlier install left (still in use) in this install's manifest, for the next
        uninstall to remove once nothing runs it."""
        self.entries.append({"type": "file", "path": str(path), "sha256": sha256(self.layout.real(path))})

    def text(self, content: str, dest: Path, mode: int = 0o644, keep_existing: bool = False) -> None:
        """Write `dest`; with keep_existing, a file already there stays: an administrator's config or
        unit (or an identical one from an earlier install). When it differs, ours goes beside it."""
        self._mkdirs(dest.parent)
        real = self.layout.real(dest)
        if keep_existing and (real.exists() or real.is_symlink()):
            if not real.is_file() or real.read_bytes() != content.encode():
                self.kept.append(str(dest))
                self.text(content, dest.with_name(dest.name + NEW_SUFFIX), mode)
            return
        tmp = real.with_name(f".{real.name}.new")
        tmp.write_text(content)
        os.chmod(tmp, mode)
        os.replace(tmp, real)
        self.entries.append({"type": "file", "path": str(dest), "sha256": sha256(real)})

    def write_manifest(self, programs: list[str]) -> None:
        manifest = self.layout.manifest
        self._mkdirs(manifest.parent)
        data = {"prefix": str(self.layout.prefix), "programs": programs, "entries": self.entries}
        self.layout.real(manifest).write_text(json.dumps(data, indent=2) + "\n")


def programs_in(dist: Path) -> list[str]:
    try:
        stamp = json.loads((dist / STAMP).read_text())
    except (OSError, ValueError):
        raise SystemExit(f"install: no binaries in {dist} (run `make binaries` first)") from None
    programs = list(stamp.get("programs", []))
    missing = [p for p in [MULTICALL, *programs] if not (dist / p).is_file()]
    if missing:
        raise SystemExit(f"install: missing in {dist}: {', '.join(missing)} (run `make binaries`)")
    return programs


def render_unit(kind: str, layout: Layout) -> str:
    program, description = SANDBOXERS[kind]
    text = (HERE / "systemd" / "kuasar-sandboxer.service.in").read_text()
    for key, value in {"KIND": kind, "PROGRAM": program, "DESCRIPTION": description,
                       "BINDIR": str(layout.bindir), "CONFDIR": str(layout.confdir)}.items():
        text = text.replace(f"@{key}@", value)
    return text


def render_config(name: str, layout: Layout) -> str:
    text = (HERE / "config" / name).read_text()
    # The fragments' comments name the path they are imported from.
    text = text.replace("/etc/kuasar/", f"{layout.confdir}/")
    return text.replace("@GUESTDIR@", str(layout.guestdir))


def install(layout: Layout, dist: Path) -> Installer:
    # Everything that can fail before a file is touched fails here: a re-install that stops half-way
    # must not have removed the working install first.
    programs = programs_in(dist)
    configs = {name: render_config(name, layout) for name in CONFIGS}
    units = {kind: render_unit(kind, layout) for kind in SANDBOXERS}
    running: list[str] = []
    if layout.real(layout.manifest).exists():
        # a re-install replaces the previous one exactly (an imported fragment is written again at once)
        running = uninstall(layout, quiet=True, keep_imported=False, running=True)
    installer = Installer(layout)
    # A frozen (PyInstaller one-file) program reads its modules from its own file, by path, for as long
    # as it runs: a task server started by an earlier install, still holding pods, would read this
    # build's file. So each build is a file of its own, the program names are symlinks switched to it,
    # and an earlier build's file stays while anything runs it (this install's manifest lists it).
    binary = layout.libdir / f"{MULTICALL}-{sha256(dist / MULTICALL)[:BUILD_DIGEST_CHARS]}"
    if running:  # the directory the last install made stays ours, however long its builds run
        installer.entries.append({"type": "dir", "path": str(layout.libdir)})
    installer.binary(dist / MULTICALL, binary)
    for path in running:
        if Path(path) != binary:
            installer.keep_file(Path(path))
    installer.symlink(binary, layout.bindir / MULTICALL)
    for program in programs:
        installer.symlink(binary, layout.bindir / program)
    if layout.shimdir != layout.bindir:
        for program in programs:
            if program.startswith("containerd-shim-"):
                installer.symlink(binary, layout.shimdir / program)
    if PAUSE.is_file():
        installer.binary(PAUSE, layout.bindir / PAUSE.name)
    else:
        print(f"install: {PAUSE} missing (run `make setup`): pod processes will sleep in Python")
    for helper in FETCHED_HELPERS:
        fetched = PAUSE.parent / helper
        if fetched.is_file():
            installer.binary(fetched, layout.bindir / helper)
        else:
            print(f"install: {fetched} missing (run `make setup`): install {helper} on the PATH yourself")
    if all((GUEST_DIR / name).is_file() for name in GUEST_FILES):
        for name in GUEST_FILES:
            installer.binary(GUEST_DIR / name, layout.guestdir / name, mode=0o644)  # read by QEMU, not run
    else:
        print(f"install: no guest image in {GUEST_DIR} (run `make guest-image`): vmm pods cannot boot")
    for name, content in configs.items():
        installer.text(content, layout.confdir / name, keep_existing=True)
    for kind, content in units.items():
        # An edited unit survives uninstall (changed since install): re-installing must not overwrite it.
        installer.text(content, layout.unitdir / f"kuasar-{kind}.service", keep_existing=True)
    installer.write_manifest(programs)
    return installer


def imported_by_containerd(layout: Layout) -> str:
    """The text of containerd's config (on the target), where a fragment it imports is named."""
    try:
        return layout.real(CONTAINERD_CONFIG).read_text(errors="replace")
    except OSError:
        return ""


def running_from(path: Path) -> bool:
    """Whether a process runs the program file at `path` (its /proc/<pid>/exe)."""
    target = str(path)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry.name}/exe") == target:
                    return True
    return False


def uninstall(layout: Layout, quiet: bool = False, keep_imported: bool = True, running: bool = False) -> list[str]:
    """Remove what the manifest lists (newest first); returns what was kept (changed configs, busy dirs,
    with `keep_imported` a containerd fragment containerd's config imports, a build a process still
    runs). With `running`, only the builds kept because they run."""
    manifest = layout.real(layout.manifest)
    try:
        data = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise SystemExit(f"uninstall: no install manifest at {manifest}") from None
    kept: list[str] = []
    in_use: list[str] = []
    containerd_config = imported_by_containerd(layout) if keep_imported else ""
    for entry in reversed(data["entries"]):
        path = Path(entry["path"])
        real = layout.real(path)
        if entry["type"] in ("dir", "stagedir"):
            continue
        if path.name.startswith(FRAGMENT_PREFIX) and str(path) in containerd_config:
            # containerd refuses to start with an import that is missing: every workload of the node
            print(f"uninstall: kept {path}: {CONTAINERD_CONFIG} imports it (remove the import, then the file)")
            kept.append(str(path))
            continue
        if entry["type"] == "symlink":
            if real.is_symlink():
                real.unlink()
            continue
        if not real.exists():
            continue
        if real.is_symlink() or sha256(real) != entry["sha256"]:
            kept.append(str(path))  # changed since install (an edited config): not ours to delete
            continue
        if path.parent == layout.libdir and running_from(real):
            in_use.append(str(path))  # its program reads its modules from it for as long as it runs
            continue
        real.unlink()
    manifest.unlink()
    # "stagedir"s were only missing from a DESTDIR: on the target system they are not ours to remove.
    dir_types = ("dir", "stagedir") if layout.destdir else ("dir",)
    created = {Path(e["path"]) for e in data["entries"] if e["type"] in dir_types}
    for path in sorted(created, key=lambda p: -len(p.parts)):  # deepest first
        try:
            layout.real(path).rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            kept.append(f"{path}/")  # something else lives there now
    if not quiet:
        for path in kept:
            print(f"uninstall: kept {path} (changed since install, or not empty)")
        for path in in_use:
            print(f"uninstall: kept {path}: kuasar processes still run it (stop them, then remove it)")
    return in_use if running else kept + in_use


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["install", "uninstall"])
    parser.add_argument("--prefix", default=os.environ.get("PREFIX") or "/usr/local")
    parser.add_argument("--destdir", default=os.environ.get("DESTDIR", ""))
    parser.add_argument("--sysconfdir", default=None, help="default: /etc for PREFIX=/usr, else PREFIX/etc")
    parser.add_argument("--unitdir", default=None, help="default: PREFIX/lib/systemd/system")
    parser.add_argument("--shimdir", default=os.environ.get("SHIMDIR") or None,
                        help="also link the containerd shims here (a directory on containerd's PATH)")
    parser.add_argument("--dist", type=Path, default=ROOT / "dist")
    opts = parser.parse_args(argv)
    layout = Layout(opts.prefix, opts.destdir, opts.sysconfdir, opts.unitdir, opts.shimdir)
    if opts.action == "uninstall":
        uninstall(layout)
        print(f"uninstalled kuasar-py from {layout.prefix}")
        return 0
    installer = install(layout, opts.dist)
    for path in installer.kept:
        print(f"install: kept the existing {path} (the shipped version differs: it is in {path}{NEW_SUFFIX})")
    files = sum(1 for e in installer.entries if e["type"] not in ("dir", "stagedir"))
    print(f"installed {files} files under {layout.prefix} (manifest {layout.manifest})")
    print(f"  containerd >= 2.1: add  imports = [\"{layout.confdir}/containerd-kuasar.toml\"]  to its config.toml")
    print(f"  containerd 1.6/1.7: add imports = [\"{layout.confdir}/containerd-kuasar-1.6.toml\"] "
          f"and keep {layout.shimdir} on containerd's PATH")
    print(f"  then: systemctl daemon-reload && systemctl enable --now kuasar-runc (units in {layout.unitdir})")
    for warning in containerd_config_warnings(layout):
        print(f"install: WARNING: {warning}")
    return 0


def containerd_config_warnings(layout: Layout) -> list[str]:
    """What about containerd's own config would defeat the fragments: imports are merged into it, and
    containerd 2.x migrates only a main config below version 3 that nothing raised to 3."""
    text = imported_by_containerd(layout)
    if not text:
        return []
    try:
        version = tomllib.loads(text).get("version", 1)
    except tomllib.TOMLDecodeError as exc:
        return [f"{CONTAINERD_CONFIG} is not TOML ({exc})"]
    if isinstance(version, int) and version < 3:
        return [f"{CONTAINERD_CONFIG} is config version {version}: containerd >= 2.1 with "
                f"containerd-kuasar.toml (version 3) imported does not migrate it, and its CRI settings are "
                f"ignored; run `containerd config migrate` and use its output first. (containerd 1.6/1.7 "
                f"replace a plugin table an import names as a whole: merge containerd-kuasar-1.6.toml's "
                f"runtimes into the main file rather than importing it, or the main file's CRI settings go.)"]
    return []


if __name__ == "__main__":
    sys.exit(main())
