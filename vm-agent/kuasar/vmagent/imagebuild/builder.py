"""Build the guest image: `vmlinux` (PVH-bootable kernel) + `initramfs.cpio` (busybox, runc, Python, the agent).

Inputs, all from the host's Debian packages and this repository:

* kernel: the generic `linux-image-<abi>-amd64` flavour (it has 9p; the cloud flavour does not),
  fetched with `apt-get download`, never installed; `vmlinux` is decompressed from its bzImage and
  the modules the agent loads are resolved from their own `.modinfo` (modules.dep). Debian 12's
  package has xz and plain `lib/modules/*/*.ko`, Debian 13's zstd and `usr/lib/modules/*/*.ko.xz`
  (the image gets them decompressed);
* busybox (static), runc with the shared libraries it links (resolved like ldd, from ELF headers);
* kuasar-pause (static, built by setup): the holder of a pod's shared PID namespace;
* Debian's `python3` (3.11 or later; `/usr/bin/python3.11` first) with only the stdlib modules the
  agent imports, as sourceless `.pyc`, the protobuf runtime (upb) from the venv, and the agent code
  (kuasar.common + kuasar.vmagent).

Everything lands under `build/guest/`: `vmlinux`, `initramfs.cpio` (or `.cpio.lz4`), and
`manifest.json` recording versions, sizes and checksums. The build is cached (a digest of every
input; a rebuild with the same inputs does nothing) and reproducible (fixed mtimes, sorted
entries, hash-based .pyc): the same inputs give the same bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from kuasar.common.pod_holder import PAUSE_PROGRAM, pause_program

from . import bzimage, cpio, elf, kmods
from .compression import CompressionError, ko_path, module_contents

REPO = Path(__file__).resolve().parents[4]
BUILDER_VERSION = "1"
IMAGE_PY_DIR = "usr/lib/vmagent"  # the agent's code and its third-party packages in the image

# Modules the agent loads, in the order given (dependencies are added before each).
DEFAULT_MODULES = (
    "virtio_mmio",                  # the transport on -M microvm
    "virtio_pci",                   # the transport on -M pc / q35
    "vmw_vsock_virtio_transport",   # AF_VSOCK over virtio (vhost-user-vsock)
    "9pnet_virtio", "9p",           # the shared directory (9p)
    "virtiofs",                     # ... or virtio-fs
    "overlay",                      # overlay root file systems for containers
    "virtio_net",                   # pod network interfaces
    "virtio_blk",                   # block-device root file systems
    "virtio_console",               # virtio-serial ports
)

# Packages copied whole (lazy imports inside them would otherwise be missed).
WHOLE_STDLIB_PACKAGES = ("asyncio", "collections", "concurrent", "ctypes", "encodings", "importlib", "json",
                         "logging", "re")
# encodings modules left out (the image speaks UTF-8, ASCII and Latin-1 only).
ENCODINGS_KEEP = {"__init__", "aliases", "ascii", "latin_1", "utf_8", "utf_8_sig", "idna", "raw_unicode_escape",
                  "unicode_escape"}
EXCLUDED_DIRS = {"__pycache__", "test", "tests", "testdata", "idlelib", "tkinter", "turtledemo", "lib2to3",
                 "ensurepip", "pydoc_data", "macholib", "imagebuild"}
# Optional modules whose importers cope with their absence, left out for size and start-up time:
# TLS (asyncio imports ssl only if it can; 5.4 MB of libssl/libcrypto), OpenSSL hashes (hashlib
# falls back to the built-in ones), bz2 and lzma (shutil's optional archive formats).
EXCLUDED_MODULES = {"ssl", "_ssl", "_hashlib", "bz2", "_bz2", "lzma", "_lzma"}
# Host-only modules of kuasar.vmagent (image builder, VM launcher, click CLI).
HOST_ONLY = {"cli.py", "launch.py"}

INIT_SCRIPT = """#!/usr/bin/python{version} -SE{python_flags}
# vm-agent: PID 1 of the guest (see kuasar.vmagent.agent.init_main).
import gc, sys, time
t0 = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
# The imports make some 30,000 objects and next to no garbage (a few hundred cycles, kept for good by
# the freeze): the collections they would set off only cost time (a sixth of the imports natively, and
# everything is ~20x slower under TCG). Frozen after them, those objects are never walked again.
gc.disable()
sys.path[0] = "/{py_dir}"
from kuasar.vmagent.agent import init_main
gc.freeze()
gc.enable()
init_main(t0)
"""

# The import probe runs under the image's interpreter on the host and prints every module the
# agent pulls in (with the files they come from), after exercising the lazy paths it uses.
PROBE = r"""
import sys, json
sys.path[:0] = json.loads(sys.argv[1])
sys.path.extend(json.loads(sys.argv[2]))
import kuasar.vmagent.agent, kuasar.vmagent.sandbox, kuasar.vmagent.tasks  # noqa
import asyncio, traceback, ipaddress
from google.protobuf import any_pb2, timestamp_pb2, empty_pb2
from kuasar.common.api.containerd.types import event_pb2
ts = timestamp_pb2.Timestamp(); ts.FromNanoseconds(1); ts.ToNanoseconds()
env = event_pb2.Envelope(topic="x"); env.event.Pack(empty_pb2.Empty())
event_pb2.Envelope.FromString(env.SerializeToString())
any_pb2.Any(type_url="x").SerializeToString()
async def main():
    await asyncio.sleep(0)
asyncio.run(main())
try:
    raise ValueError("x")
except ValueError:
    traceback.format_exc()
json.loads(json.dumps({"a": [1, 2.5, None]}))
ipaddress.ip_interface("10.0.0.1/24"); ipaddress.ip_network("fd00::/64")
"a".encode("idna"); b"\xe9".decode("latin-1")
mods = {}
for name, mod in sorted(sys.modules.items()):
    spec = getattr(mod, "__spec__", None)
    origin = getattr(spec, "origin", None) if spec is not None else None
    mods[name] = origin if origin and origin not in ("built-in", "frozen") and origin.startswith("/") else None
print(json.dumps({"modules": mods, "version": sys.version, "prefix": sys.prefix,
                  "stdlib": __import__("sysconfig").get_paths()["stdlib"],
                  "platstdlib": __import__("sysconfig").get_paths()["platstdlib"],
                  "dynload": __import__("sysconfig").get_config_var("DESTSHARED")}))
"""

COMPILER = r"""
import json, py_compile, sys
for src, dst, dfile in json.load(sys.stdin):
    py_compile.compile(src, cfile=dst, dfile=dfile, doraise=True, optimize=2,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


class BuildError(RuntimeError):
    pass


class KernelUnavailable(BuildError):
    """The kernel package cannot be had here (offline, no package lists): the VM tests skip on
    this one and fail on any other BuildError."""


# scripts/build_guest_image.py's exit status for KernelUnavailable (any other BuildError: 1).
EXIT_KERNEL_UNAVAILABLE = 3

# Errors of the package, kernel and ELF readers: the build reports them as BuildError, naming the input.
_READER_ERRORS = (kmods.ModuleError, bzimage.KernelImageError, elf.ElfError, CompressionError)


@contextmanager
def _reading(what: str) -> Iterator[None]:
    try:
        yield
    except _READER_ERRORS as err:
        raise BuildError(f"{what}: {err}") from err


@dataclass
class Options:
    out_dir: Path = REPO / "build" / "guest"
    cache_dir: Path | None = None
    kernel_package: str | None = None  # e.g. "linux-image-6.1.0-56-amd64"; default: what linux-image-amd64 needs
    python: Path | None = None  # the guest's interpreter; default: default_python()
    busybox: Path = Path("/bin/busybox")
    runc: Path | None = None
    pause: Path | None = None  # kuasar-pause; default: where the pod holder finds it ($KUASAR_PREFIX/bin, PATH)
    site_packages: Path | None = None  # where google/protobuf comes from (default: this interpreter's)
    compression: str = "none"  # "none" or "lz4"
    modules: tuple[str, ...] = DEFAULT_MODULES
    force: bool = False
    python_flags: str = ""  # more single-letter flags for /init's "-SE", e.g. "Ximporttime" to profile
    progress: Callable[[str], None] = field(default=lambda msg: print(f"guest-image: {msg}", file=sys.stderr,
                                                                      flush=True))

    @property
    def cache(self) -> Path:
        return self.cache_dir or self.out_dir / "cache"


def default_python() -> Path | None:
    """The distribution's interpreter for the guest: /usr/bin/python3.11, else /usr/bin/python3 if >= 3.11."""
    for candidate in ("/usr/bin/python3.11", "/usr/bin/python3"):
        if not os.access(candidate, os.X_OK):
            continue
        probe = subprocess.run([candidate, "-S", "-E", "-c", "import sys; print(sys.version_info >= (3, 11))"],
                               capture_output=True, text=True, check=False)
        if probe.stdout.strip() == "True":
            return Path(candidate)
    return None


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, check=True, capture_output=True, **kwargs)
    except FileNotFoundError:
        raise BuildError(f"{argv[0]} not found") from None
    except subprocess.CalledProcessError as err:
        out = (err.stderr or b"").decode(errors="replace").strip() or (err.stdout or b"").decode(errors="replace")
        raise BuildError(f"{' '.join(argv)} failed ({err.returncode}): {out.strip()[-2000:]}") from None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- kernel -----------------------------------------------------------------------------------------
APT_OPTS = ["-o", "APT::Sandbox::User=root", "-q"]
T = TypeVar("T")


def _after_apt_update(what: str, attempt: Callable[[], T], progress: Callable[[str], None] | None = None) -> T:
    """attempt(), and once more after `apt-get update` if it fails: the package lists may be stale or
    missing (a base image whose /var/lib/apt/lists was cleaned)."""
    try:
        return attempt()
    except BuildError:
        if progress:
            progress(f"{what} failed; refreshing the package lists once (apt-get update)")
        _run(["apt-get", *APT_OPTS, "update"])
        return attempt()


def _kernel_package_from_apt_cache() -> str:
    out = _run(["apt-cache", "depends", "linux-image-amd64"]).stdout.decode()
    names = re.findall(r"Depends:\s*(linux-image-[0-9][\w.+-]*-amd64)\b", out)
    if not names:
        raise BuildError("apt-cache knows no linux-image-amd64 dependency")
    return names[0]


def resolve_kernel_package() -> str:
    """The versioned generic flavour the `linux-image-amd64` metapackage points at."""
    try:
        return _after_apt_update("apt-cache depends", _kernel_package_from_apt_cache)
    except BuildError as err:
        raise KernelUnavailable(str(err)) from None


def fetch_kernel_deb(package: str, debs: Path, progress: Callable[[str], None]) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    progress(f"downloading {package} (apt-get download)")
    try:
        _after_apt_update("apt-get download", lambda: _run(["apt-get", *APT_OPTS, "download", package], cwd=debs),
                          progress)
    except BuildError as err:
        raise KernelUnavailable(str(err)) from None
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        raise KernelUnavailable(f"apt-get download {package} produced no .deb")
    return found[-1]


@contextmanager
def _data_tar(deb: Path) -> Iterator[tarfile.TarFile]:
    """Stream the package's data.tar through `dpkg-deb --fsys-tarfile` (any compression). dpkg-deb is
    waited for, and killed first if the reading stops half way (a module that cannot be read)."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            yield tar
    except BaseException:
        proc.kill()
        proc.stdout.close()
        proc.wait()
        raise
    # What tar leaves unread after its end (padding) fits in the pipe: dpkg-deb ends by itself.
    returncode = proc.wait()
    proc.stdout.close()
    if returncode != 0:
        raise BuildError(f"dpkg-deb --fsys-tarfile {deb} failed")


# Debian 12 ships the modules in lib/modules/<release>/, Debian 13 (merged /usr) in usr/lib/modules/.
_MODULES_DIR = re.compile(r"(?:usr/)?lib/modules/([^/]+)/(.*)$")


def _scan_package(deb: Path) -> tuple[dict[str, bytes], dict[str, dict[str, list[str]]], str]:
    """Pass 1: boot files and modules.builtin (kept) and every module's modinfo (parsed), keyed by
    its path as a plain .ko (the image carries compressed modules decompressed)."""
    keep: dict[str, bytes] = {}
    infos: dict[str, dict[str, list[str]]] = {}
    release = ""
    with _data_tar(deb) as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if not member.isfile():
                continue
            match = _MODULES_DIR.match(name)
            if name.startswith("boot/vmlinuz-") or name.startswith("boot/config-"):
                keep[name] = tar.extractfile(member).read()
                release = name.split("-", 1)[1]
            elif match and match.group(2) in ("modules.builtin", "modules.order"):
                keep[match.group(2)] = tar.extractfile(member).read()
            elif match and kmods.is_module_file(name):
                with _reading(f"{deb.name}: {name}"):
                    infos[ko_path(match.group(2))] = elf.modinfo(module_contents(name, tar.extractfile(member).read()))
    if not release or f"boot/vmlinuz-{release}" not in keep:
        raise BuildError(f"{deb.name} holds no boot/vmlinuz-*")
    return keep, infos, release


def _extract_modules(deb: Path, release: str, wanted: set[str], dest: Path) -> None:
    """Pass 2: just the wanted modules, as plain .ko files (`wanted`: their .ko paths)."""
    with _data_tar(deb) as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            match = _MODULES_DIR.match(name)
            if member.isfile() and match and match.group(1) == release and ko_path(match.group(2)) in wanted:
                target = dest / ko_path(match.group(2))
                target.parent.mkdir(parents=True, exist_ok=True)
                with _reading(f"{deb.name}: {name}"):
                    target.write_bytes(module_contents(name, tar.extractfile(member).read()))
    missing = [w for w in wanted if not (dest / w).is_file()]
    if missing:
        raise BuildError(f"modules missing from {deb.name}: {', '.join(sorted(missing))}")


@dataclass
class Kernel:
    package: str
    version: str
    release: str
    deb_sha256: str
    vmlinux: Path
    modules_dir: Path  # holds the wanted .ko files at their lib/modules/<release>/ paths
    load_order: list[str]  # paths relative to modules_dir
    per_module: dict[str, list[str]]  # wanted module -> its own load order (dependencies first)


def prepare_kernel(opts: Options) -> Kernel:
    package = opts.kernel_package or resolve_kernel_package()
    deb = fetch_kernel_deb(package, opts.cache / "debs", opts.progress)
    version = deb.name.split("_")[1]
    sha = _sha256_file(deb)
    kdir = opts.cache / f"kernel-{package}-{sha[:16]}"
    meta_path = kdir / "kernel.json"
    wanted_key = list(opts.modules)
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("modules_wanted") == wanted_key and "per_module" in meta and (kdir / "vmlinux").exists():
            return Kernel(package, version, meta["release"], sha, kdir / "vmlinux", kdir / "modules",
                          meta["load_order"], meta["per_module"])
    t0 = time.monotonic()
    opts.progress(f"unpacking {deb.name}: kernel and module metadata")
    shutil.rmtree(kdir, ignore_errors=True)
    kdir.mkdir(parents=True)
    keep, infos, release = _scan_package(deb)
    with _reading(deb.name):
        dep_text = kmods.build_modules_dep_from_info(infos)
        (kdir / "modules.dep").write_text(dep_text)
        table = kmods.parse_modules_dep(dep_text)
        builtin = keep.get("modules.builtin", b"").decode().split()
        order = kmods.load_order(table, opts.modules, builtin)
        per_module = {kmods.normalize(m): kmods.load_order(table, [m], builtin) for m in opts.modules}
        opts.progress(f"extracting vmlinux from vmlinuz-{release} ({len(order)} modules to load)")
        vmlinux = bzimage.extract_vmlinux(keep[f"boot/vmlinuz-{release}"])
        pvh = bzimage.has_pvh_note(vmlinux)
    if not pvh:
        raise BuildError(f"vmlinux of {package} has no PVH entry note: QEMU cannot boot it directly")
    (kdir / "vmlinux").write_bytes(vmlinux)
    (kdir / f"config-{release}").write_bytes(keep[f"boot/config-{release}"])
    _extract_modules(deb, release, set(order), kdir / "modules")
    meta_path.write_text(json.dumps({"package": package, "version": version, "release": release,
                                     "modules_wanted": wanted_key, "load_order": order,
                                     "per_module": per_module}, indent=1))
    opts.progress(f"kernel {release} ready in {time.monotonic() - t0:.1f} s")
    return Kernel(package, version, release, sha, kdir / "vmlinux", kdir / "modules", order, per_module)


# -- Python ---------------------------------------------------------------------------------------
@dataclass
class PythonParts:
    version: str
    stdlib: Path
    dynload: Path
    modules: dict[str, str | None]  # name -> file it came from (None: built in)


def probe_python(python: Path, site_packages: Path) -> PythonParts:
    agent_paths = [str(REPO / "vm-agent"), str(REPO / "common")]
    out = _run([str(python), "-S", "-E", "-c", PROBE, json.dumps(agent_paths), json.dumps([str(site_packages)])],
               env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}).stdout
    data = json.loads(out)
    return PythonParts(data["version"].split()[0], Path(data["stdlib"]), Path(data["dynload"]), data["modules"])


def _image_py_files(parts: PythonParts, site_packages: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(sources to compile: image path of the .pyc -> .py, binaries: image path -> file)."""
    sources: dict[str, Path] = {}
    binaries: dict[str, Path] = {}
    stdlib_img = f"usr/lib/python{parts.version.rsplit('.', 1)[0]}"
    roots = [(parts.stdlib, stdlib_img), (REPO / "vm-agent", IMAGE_PY_DIR), (REPO / "common", IMAGE_PY_DIR),
             (site_packages, IMAGE_PY_DIR)]

    def place(path: Path) -> None:
        for root, img in roots:
            try:
                rel = path.relative_to(root)
            except ValueError:
                continue
            if path.suffix == ".py":
                sources[f"{img}/{rel.with_suffix('.pyc')}"] = path
            else:
                binaries[f"{img}/{rel}"] = path
            return
        if path.parent == parts.dynload:
            binaries[f"{stdlib_img}/lib-dynload/{path.name}"] = path
            return
        raise BuildError(f"module file {path} is outside the stdlib, the repository and site-packages")

    def add_package(directory: Path, keep: Callable[[Path], bool] = lambda p: True) -> None:
        for path in sorted(directory.rglob("*.py")):
            if EXCLUDED_DIRS.isdisjoint(path.relative_to(directory).parts) and keep(path):
                place(path)

    for name, origin in parts.modules.items():
        if origin is None or name in EXCLUDED_MODULES:
            continue
        path = Path(origin)
        if name.startswith("kuasar.vmagent.") and (path.name in HOST_ONLY or "imagebuild" in path.parts):
            continue
        place(path)
    for package in WHOLE_STDLIB_PACKAGES:
        keep = (lambda p: p.stem in ENCODINGS_KEEP) if package == "encodings" else (lambda p: True)
        add_package(parts.stdlib / package, keep)
    add_package(site_packages / "google" / "protobuf")
    add_package(REPO / "vm-agent" / "kuasar" / "vmagent",
                lambda p: p.name not in HOST_ONLY and "imagebuild" not in p.parts)
    # The interpreter finds its prefix by this landmark.
    place(parts.stdlib / "os.py")
    return sources, binaries


def compile_pycs(python: Path, sources: dict[str, Path], staging: Path) -> dict[str, Path]:
    jobs, out = [], {}
    for img_path, src in sorted(sources.items()):
        dst = staging / img_path
        dst.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(src), str(dst), "/" + img_path.removesuffix(".pyc") + ".py"))
        out[img_path] = dst
    _run([str(python), "-S", "-E", "-c", COMPILER], input=json.dumps(jobs).encode(),
         env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    return out


# -- image --------------------------------------------------------------------------------------------
def _which(name: str, fallback: tuple[str, ...] = ()) -> Path:
    found = shutil.which(name) or next((p for p in fallback if os.access(p, os.X_OK)), None)
    if not found:
        raise BuildError(f"{name} not found (run `make setup`)")
    return Path(found)


def _version_line(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, check=False).stdout.decode(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return "unknown"


def input_digest(opts: Options, kernel: Kernel, files: list[Path], extra: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"builder": BUILDER_VERSION, "kernel": kernel.deb_sha256, "order": kernel.load_order,
                         "compression": opts.compression,
                         "python_flags": opts.python_flags, **extra}, sort_keys=True).encode())
    for path in sorted(set(files)):
        h.update(str(path).encode())
        h.update(_sha256_file(path).encode())
    return h.hexdigest()


def build(opts: Options) -> dict:
    """Build (or reuse) the image; returns the manifest. Concurrent builds of one output directory
    (parallel test runs) take turns on a lock file."""
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    with open(opts.out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(opts)


def _pause_program() -> Path:
    """setup's kuasar-pause in this checkout's prefix, else wherever the pod holder would find it."""
    in_checkout = REPO / ".prefix" / "bin" / PAUSE_PROGRAM
    if os.access(in_checkout, os.X_OK):
        return in_checkout
    found = pause_program()
    return Path(found) if found else in_checkout


def _build_locked(opts: Options) -> dict:
    t_start = time.monotonic()
    runc = opts.runc or _which("runc", ("/usr/sbin/runc", "/usr/bin/runc"))
    site_packages = opts.site_packages or _protobuf_site_packages()
    python = opts.python or default_python()
    if python is None:
        raise BuildError("no Python >= 3.11 in /usr/bin for the guest (python3.11 or python3)")
    pause = opts.pause or _pause_program()
    for path in (python, opts.busybox, runc, pause):
        if not os.access(path, os.X_OK):
            raise BuildError(f"{path} missing (run `make setup`)")
    kernel = prepare_kernel(opts)
    opts.progress("finding the Python modules the agent imports")
    parts = probe_python(python, site_packages)
    short_version = parts.version.rsplit(".", 1)[0]
    sources, py_binaries = _image_py_files(parts, site_packages)
    binaries = {f"usr/bin/python{short_version}": python.resolve(), "bin/busybox": opts.busybox.resolve(),
                "usr/bin/runc": runc.resolve(), f"usr/bin/{PAUSE_PROGRAM}": pause.resolve(), **py_binaries}
    builder_files = sorted(Path(__file__).parent.glob("*.py"))
    digest = input_digest(opts, kernel, [*sources.values(), *binaries.values(), *builder_files],
                          {"python": parts.version})
    suffix = ".cpio.lz4" if opts.compression == "lz4" else ".cpio"
    initrd = opts.out_dir / f"initramfs{suffix}"
    manifest_path = opts.out_dir / "manifest.json"
    if not opts.force and manifest_path.exists() and initrd.exists() and (opts.out_dir / "vmlinux").exists():
        old = json.loads(manifest_path.read_text())
        if old.get("input_digest") == digest:
            opts.progress(f"up to date ({initrd.name}, {old['initramfs']['bytes'] / 1e6:.1f} MB; "
                          f"kernel {old['kernel']['release']})")
            return old

    with tempfile.TemporaryDirectory(prefix="guest-image-", dir=opts.out_dir) as tmp:
        staging = Path(tmp)
        opts.progress(f"compiling {len(sources)} Python modules to .pyc (python {parts.version})")
        pycs = compile_pycs(python, sources, staging / "py")
        opts.progress("resolving shared libraries (ELF DT_NEEDED)")
        so_files = [p for img, p in binaries.items() if img.endswith(".so")]
        with _reading("shared libraries"):
            libs = elf.library_closure([python, runc, *so_files])
        tree = _base_tree(opts.busybox)
        for img_path, src in binaries.items():
            tree.copy(img_path, src)
        for img_path, pyc in pycs.items():
            tree.copy(img_path, pyc, mode=0o644)
        first: dict[Path, str] = {}
        for loader_path, src in sorted(libs.items()):
            if src in first:  # the same file under two names (the loader): one copy, one link
                tree.symlink(loader_path.lstrip("/"), "/" + first[src])
            else:
                first[src] = loader_path.lstrip("/")
                tree.copy(loader_path.lstrip("/"), src)
        tree.file("init", INIT_SCRIPT.format(version=short_version, py_dir=IMAGE_PY_DIR,
                                             python_flags=opts.python_flags).encode(),
                  mode=0o755)
        mod_root = f"lib/modules/{kernel.release}"
        for rel in kernel.load_order:
            tree.copy(f"{mod_root}/{rel}", kernel.modules_dir / rel, mode=0o644)
        tree.file("etc/vmagent/modules", kmods.module_table(kernel.per_module).encode())
        versions = {
            "python": parts.version,
            "runc": _version_line([str(runc), "--version"]),
            "busybox": _version_line([str(opts.busybox)]),
            "protobuf": _protobuf_version(site_packages),
        }
        tree.file("etc/vmagent/image.json", json.dumps({"kernel": kernel.release, **versions}, indent=1,
                                                       sort_keys=True).encode())
        opts.progress(f"writing {initrd.name}: {len(tree.entries)} entries, {tree.data_size() / 1e6:.1f} MB of data")
        raw = staging / "initramfs.cpio"
        with open(raw, "wb") as f:
            raw_size = cpio.write(tree, f, mtime=0)
        if opts.compression == "lz4":
            _run(["lz4", "-l", "-9", "-f", "-q", str(raw), str(staging / "out")])
        else:
            os.replace(raw, staging / "out")
        os.replace(staging / "out", initrd)
        shutil.copyfile(kernel.vmlinux, opts.out_dir / ".vmlinux.tmp")
        os.replace(opts.out_dir / ".vmlinux.tmp", opts.out_dir / "vmlinux")
    for stale in opts.out_dir.glob("initramfs.cpio*"):
        if stale != initrd:
            stale.unlink()
    manifest = {
        "input_digest": digest,
        "kernel": {"package": kernel.package, "version": kernel.version, "release": kernel.release,
                   "deb_sha256": kernel.deb_sha256, "vmlinux": "vmlinux",
                   "vmlinux_bytes": (opts.out_dir / "vmlinux").stat().st_size,
                   "vmlinux_sha256": _sha256_file(opts.out_dir / "vmlinux"), "modules": kernel.load_order},
        "initramfs": {"file": initrd.name, "compression": opts.compression, "bytes": initrd.stat().st_size,
                      "uncompressed_bytes": raw_size, "sha256": _sha256_file(initrd), "entries": len(tree.entries),
                      "python_modules": len(pycs)},
        "components": versions,
        "agent_entry": "/init -> kuasar.vmagent.agent.init_main",
    }
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    opts.progress(f"done in {time.monotonic() - t_start:.1f} s: {initrd} ({initrd.stat().st_size / 1e6:.1f} MB), "
                  f"vmlinux ({manifest['kernel']['vmlinux_bytes'] / 1e6:.1f} MB, {kernel.package} {kernel.version})")
    return manifest


def _protobuf_site_packages() -> Path:
    """The directory holding the protobuf runtime this interpreter uses (the project's venv)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("google.protobuf")
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("the protobuf runtime is not importable: run the build with the project's venv "
                         "(`make guest-image`)")
    return Path(next(iter(spec.submodule_search_locations))).parent.parent


def _protobuf_version(site_packages: Path) -> str:
    for dist in sorted(site_packages.glob("protobuf-*.dist-info")):
        return dist.name.removeprefix("protobuf-").removesuffix(".dist-info")
    return "unknown"


def _base_tree(busybox: Path) -> cpio.Tree:
    tree = cpio.Tree()
    for d, mode in (("bin", 0o755), ("sbin", 0o755), ("usr/bin", 0o755), ("usr/sbin", 0o755), ("etc", 0o755),
                    ("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run", 0o755), ("tmp", 0o1777),
                    ("root", 0o700), ("var", 0o755), ("mnt", 0o755), (".root", 0o755), ("lib64", 0o755)):
        tree.dir(d, mode)
    tree.symlink("var/run", "../run")
    tree.chardev("dev/console", 5, 1, 0o600)
    tree.chardev("dev/null", 1, 3, 0o666)
    tree.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    tree.file("etc/group", b"root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    tree.file("etc/hosts", b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    tree.file("etc/hostname", b"localhost\n")
    tree.file("etc/resolv.conf", b"")
    applets = _run([str(busybox), "--list-full"]).stdout.decode().split()
    for applet in applets:
        if applet.strip("/") not in ("bin/busybox",):
            tree.symlink(applet, "/bin/busybox")
    return tree
