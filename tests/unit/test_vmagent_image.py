"""The guest image's building blocks on the host: newc cpio writer, kernel module dependency resolution,
ELF reading (shared-library needs, .modinfo), vmlinux extraction from a bzImage, and the kernel
package as Debian 12 and 13 ship it (synthetic .deb files: modules in lib/ or usr/lib/, plain or
compressed; xz or zstd kernels)."""

from __future__ import annotations

import gzip
import importlib.util
import io
import lzma
import os
import shutil
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from kuasar.vmagent.imagebuild import builder, bzimage, compression, cpio, elf, kmods

REPO = Path(__file__).resolve().parents[2]
HAVE_ZSTD = shutil.which("zstd") is not None
needs_zstd = pytest.mark.skipif(not HAVE_ZSTD, reason="no zstd program (make setup installs it)")

# -- cpio -----------------------------------------------------------------------------------------------


def sample_tree(tmp_path: Path) -> cpio.Tree:
    host = tmp_path / "host-file"
    host.write_bytes(b"x" * 1001)
    host.chmod(0o751)
    tree = cpio.Tree()
    tree.file("etc/hostname", b"guest\n")
    tree.copy("usr/bin/tool", host)
    tree.symlink("bin/sh", "/bin/busybox")
    tree.dir("tmp", 0o1777)
    tree.chardev("dev/console", 5, 1)
    tree.file("init", b"#!/bin/sh\n", mode=0o755)
    return tree


def test_cpio_roundtrip_parents_first_and_types(tmp_path: Path) -> None:
    out = io.BytesIO()
    size = cpio.write(sample_tree(tmp_path), out)
    data = out.getvalue()
    assert size == len(data) and len(data) % 512 == 0
    entries = cpio.read(data)
    names = [name for name, _, _ in entries]
    assert names == sorted(names)
    # every parent appears before its children, created implicitly
    for name in names:
        parent = name.rpartition("/")[0]
        assert not parent or names.index(parent) < names.index(name)
    by_name = {name: (mode, body) for name, mode, body in entries}
    assert by_name["etc/hostname"] == (stat.S_IFREG | 0o644, b"guest\n")
    assert by_name["usr/bin/tool"] == (stat.S_IFREG | 0o751, b"x" * 1001)
    assert by_name["bin/sh"] == (stat.S_IFLNK | 0o777, b"/bin/busybox")
    assert by_name["tmp"][0] == stat.S_IFDIR | 0o1777
    assert by_name["usr"][0] == stat.S_IFDIR | 0o755
    assert stat.S_ISCHR(by_name["dev/console"][0])


def test_cpio_is_reproducible_and_newc(tmp_path: Path) -> None:
    first, second = io.BytesIO(), io.BytesIO()
    cpio.write(sample_tree(tmp_path), first)
    cpio.write(sample_tree(tmp_path), second)
    assert first.getvalue() == second.getvalue()
    data = first.getvalue()
    assert data.startswith(b"070701")
    # header fields: ino 1, uid/gid 0, mtime 0; names NUL-terminated and 4-byte aligned
    fields = [int(data[6 + 8 * i: 14 + 8 * i], 16) for i in range(13)]
    assert fields[0] == 1 and fields[2] == 0 and fields[3] == 0 and fields[5] == 0
    assert b"TRAILER!!!\x00" in data


@pytest.mark.skipif(shutil.which("cpio") is None and not os.path.exists("/bin/busybox"),
                    reason="no cpio tool to cross-check with")
def test_cpio_readable_by_an_independent_cpio(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    with open(archive, "wb") as f:
        cpio.write(sample_tree(tmp_path), f)
    tool = ["cpio"] if shutil.which("cpio") else ["/bin/busybox", "cpio"]
    listing = subprocess.run([*tool, "-t"], stdin=open(archive, "rb"), capture_output=True, check=True)
    assert set(listing.stdout.decode().split()) >= {"etc/hostname", "usr/bin/tool", "bin/sh", "dev/console"}
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run([*tool, "-id"], stdin=open(archive, "rb"), cwd=dest, capture_output=True, check=True)
    assert (dest / "usr/bin/tool").read_bytes() == b"x" * 1001
    assert os.readlink(dest / "bin/sh") == "/bin/busybox"


def test_cpio_tree_rejects_bad_paths_and_type_clashes() -> None:
    tree = cpio.Tree()
    tree.file("a/b", b"")
    with pytest.raises(ValueError):
        tree.file("a/b/c", b"")  # a/b is a file, not a directory
    with pytest.raises(ValueError):
        tree.dir("a/b")
    with pytest.raises(ValueError):
        tree.file("../etc/passwd", b"")
    with pytest.raises(ValueError):
        tree.file("/", b"")
    assert "a/b" in tree and "/a" in tree


# -- kernel module dependencies ------------------------------------------------------------------------

INFOS = {
    "kernel/drivers/virtio/virtio_ring.ko": {"depends": [""]},
    "kernel/drivers/virtio/virtio.ko": {"depends": ["virtio_ring"]},
    "kernel/drivers/virtio/virtio_mmio.ko": {"depends": ["virtio,virtio_ring"]},
    "kernel/net/vmw_vsock/vsock.ko": {"depends": [""]},
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko": {"depends": ["vsock,virtio,virtio_ring"]},
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko": {
        "depends": ["vmw_vsock_virtio_transport_common,vsock,virtio,virtio_ring"]},
    "kernel/net/9p/9pnet.ko": {"depends": [""]},
    "kernel/fs/netfs/netfs.ko": {"depends": [""]},
    "kernel/fs/fscache/fscache.ko": {"depends": ["netfs"]},
    "kernel/fs/9p/9p.ko": {"depends": ["9pnet,fscache,netfs"]},
    "kernel/fs/overlayfs/overlay.ko": {"depends": [""], "softdep": ["pre: crc32c"]},
    "kernel/lib/libcrc32c.ko": {"depends": [""]},
    "kernel/fs/ext4/ext4.ko": {"depends": [""], "softdep": ["pre: libcrc32c post: foo"]},
}


def table() -> dict:
    return kmods.parse_modules_dep(kmods.build_modules_dep_from_info(INFOS))


def test_modules_dep_lists_each_closure_like_depmod() -> None:
    text = kmods.build_modules_dep_from_info(INFOS)
    lines = dict(line.split(":", 1) for line in text.splitlines())
    assert set(lines["kernel/fs/9p/9p.ko"].split()) == {
        "kernel/net/9p/9pnet.ko", "kernel/fs/fscache/fscache.ko", "kernel/fs/netfs/netfs.ko"}
    assert lines["kernel/net/vmw_vsock/vsock.ko"] == ""
    # softdep pre: modules the package has become dependencies; missing ones are skipped
    assert lines["kernel/fs/ext4/ext4.ko"].split() == ["kernel/lib/libcrc32c.ko"]
    assert lines["kernel/fs/overlayfs/overlay.ko"] == ""


def test_load_order_puts_dependencies_first_without_duplicates() -> None:
    order = kmods.load_order(table(), ["virtio_mmio", "vmw_vsock_virtio_transport", "9p"])
    names = [kmods.module_name(p) for p in order]
    assert len(names) == len(set(names))
    for module, deps in (("virtio_mmio", ["virtio", "virtio_ring"]),
                         ("vmw_vsock_virtio_transport", ["vmw_vsock_virtio_transport_common", "vsock"]),
                         ("9p", ["9pnet", "fscache", "netfs"]), ("fscache", ["netfs"]), ("virtio", ["virtio_ring"])):
        for dep in deps:
            assert names.index(dep) < names.index(module), (dep, module, names)
    assert names[0] == "virtio_ring"


def test_load_order_reads_real_depmod_output_and_names_with_dashes() -> None:
    text = ("kernel/a/foo-bar.ko: kernel/b/baz.ko kernel/c/qux.ko\n"
            "kernel/b/baz.ko: kernel/c/qux.ko\nkernel/c/qux.ko:\n")
    assert kmods.load_order(kmods.parse_modules_dep(text), ["foo_bar"]) == [
        "kernel/c/qux.ko", "kernel/b/baz.ko", "kernel/a/foo-bar.ko"]
    assert kmods.module_name("kernel/x/nf-nat.ko.xz") == "nf_nat"


def test_load_order_errors_and_builtins() -> None:
    with pytest.raises(kmods.ModuleError, match="nosuch"):
        kmods.load_order(table(), ["nosuch"])
    # a built-in "module" needs no loading
    assert kmods.load_order(table(), ["virtio_blk"], builtin=["kernel/drivers/block/virtio_blk.ko"]) == []
    cyclic = {"a": ("a.ko", ["b.ko"]), "b": ("b.ko", ["a.ko"])}
    with pytest.raises(kmods.ModuleError, match="cycle"):
        kmods.load_order(cyclic, ["a"])
    with pytest.raises(kmods.ModuleError, match="not in the package"):
        kmods.build_modules_dep_from_info({"x.ko": {"depends": ["missing"]}})


def test_module_table_for_the_guest() -> None:
    per = {"9p": kmods.load_order(table(), ["9p"])}
    text = kmods.module_table(per)
    line = [ln for ln in text.splitlines() if not ln.startswith("#")][0].split()
    assert line[0] == "9p" and line[-1] == "kernel/fs/9p/9p.ko" and len(line) == 5


# -- ELF -----------------------------------------------------------------------------------------------


def make_relocatable(sections: dict[str, bytes]) -> bytes:
    """A minimal ELF64 ET_REL file with the given sections (enough for .modinfo)."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [*sections, ".shstrtab"])
    body = b"".join(sections.values())
    data_off = 64
    shstr_off = data_off + len(body)
    sh_off = (shstr_off + len(names) + 7) // 8 * 8
    shnum = len(sections) + 2
    head = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    head += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, sh_off, 0, 64, 0, 0, 64, shnum, shnum - 1)
    out = bytearray(head + body + names)
    out += bytes(sh_off - len(out))
    out += bytes(64)  # null section
    pos, name_pos = data_off, 1
    for name, content in sections.items():
        out += struct.pack("<IIQQQQIIQQ", name_pos, 1, 0, 0, pos, len(content), 0, 0, 1, 0)
        pos += len(content)
        name_pos += len(name) + 1
    out += struct.pack("<IIQQQQIIQQ", name_pos, 3, 0, 0, shstr_off, len(names), 0, 0, 1, 0)
    return bytes(out)


def test_modinfo_of_a_module() -> None:
    ko = make_relocatable({".text": b"\x90" * 8,
                           ".modinfo": b"license=GPL\0depends=virtio,virtio_ring\0name=virtio_net\0alias=a\0alias=b\0"})
    info = elf.modinfo(ko)
    assert info["depends"] == ["virtio,virtio_ring"]
    assert info["name"] == ["virtio_net"] and info["alias"] == ["a", "b"]
    with pytest.raises(elf.ElfError):
        elf.modinfo(make_relocatable({".text": b""}))
    with pytest.raises(elf.ElfError):
        elf.modinfo(b"not an elf file at all, really")


def test_library_closure_of_host_binaries() -> None:
    python = builder.default_python()  # the guest's interpreter: python3.11 on Debian 12, 3.13 on 13
    if python is None:
        pytest.skip("no /usr/bin/python3 >= 3.11")
    info = elf.dynamic_info(python.read_bytes())
    assert info.interpreter == "/lib64/ld-linux-x86-64.so.2"
    assert "libc.so.6" in info.needed
    libs = elf.library_closure([python])
    assert "/lib64/ld-linux-x86-64.so.2" in libs
    assert any(p.endswith("/libc.so.6") for p in libs)
    assert all(path.exists() for path in libs.values())
    static = Path("/bin/busybox")
    if static.exists():
        assert elf.dynamic_info(static.read_bytes()).needed == []


def test_find_library_follows_runpath_origin(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libx.so.1").write_bytes(b"")
    assert elf.find_library("libx.so.1", ["$ORIGIN/lib"], str(tmp_path), lib_dirs=()) == f"{tmp_path}/lib/libx.so.1"
    assert elf.find_library("libnothere.so", [], str(tmp_path), lib_dirs=(str(tmp_path),)) is None


# -- bzImage -> vmlinux ----------------------------------------------------------------------------------

FAKE_VMLINUX = b"\x7fELF" + bytes(range(256)) * 64


def make_bzimage(payload: bytes, setup_sects: int = 3) -> bytes:
    image = bytearray(512 * ((setup_sects or 4) + 1))  # 0 means 4 in the boot protocol
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    offset = 0x40
    struct.pack_into("<II", image, 0x248, offset, len(payload))
    image += bytes(offset) + payload + b"trailing"
    return bytes(image)


def test_extract_vmlinux_xz_with_appended_size() -> None:
    payload = lzma.compress(FAKE_VMLINUX, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    payload += struct.pack("<I", len(FAKE_VMLINUX))  # what the kernel build appends
    assert bzimage.extract_vmlinux(make_bzimage(payload)) == FAKE_VMLINUX


def test_extract_vmlinux_gzip_and_errors() -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    gz = compressor.compress(FAKE_VMLINUX) + compressor.flush()
    assert bzimage.extract_vmlinux(make_bzimage(gz, setup_sects=0)) == FAKE_VMLINUX
    with pytest.raises(bzimage.KernelImageError, match="LZ4"):
        bzimage.extract_vmlinux(make_bzimage(b"\x02\x21\x4c\x18" + bytes(32)))
    with pytest.raises(bzimage.KernelImageError, match="HdrS"):
        bzimage.payload(bytes(4096))
    not_elf = lzma.compress(b"plain data", format=lzma.FORMAT_XZ)
    with pytest.raises(bzimage.KernelImageError, match="not an ELF"):
        bzimage.extract_vmlinux(make_bzimage(not_elf))


# -- compression: zstd frames, compressed modules --------------------------------------------------------


def zstd_frame(*blocks: tuple[int, bytes], descriptor: int = 0x20, header_extra: bytes = b"\x00",
               checksum: bytes = b"") -> bytes:
    """A hand-made zstd frame: (block type, block body) pairs; descriptor 0x20 is a single segment with
    a 1-byte content size (header_extra), 0x24 adds a content checksum."""
    out = compression.ZSTD_MAGIC + bytes([descriptor]) + header_extra
    for i, (kind, body) in enumerate(blocks):
        size = len(body) if kind != 1 else 200  # an RLE block's size is its regenerated size
        last = 1 if i == len(blocks) - 1 else 0
        out += (last | kind << 1 | size << 3).to_bytes(3, "little") + body
    return out + checksum


def test_zstd_frame_length_walks_blocks_and_ignores_what_follows() -> None:
    raw, rle = (0, b"hello world"), (1, b"x")
    assert compression.zstd_frame_length(zstd_frame(raw) + b"SIZE") == 4 + 2 + 3 + 11
    assert compression.zstd_frame_length(zstd_frame(raw, rle, raw) + b"SIZE") == 4 + 2 + 3 * 3 + 11 + 1 + 11
    # a frame with a checksum, a window descriptor (not single segment) and a 2-byte dictionary id
    framed = zstd_frame(raw, descriptor=0x06, header_extra=b"\x50" + b"\x01\x02", checksum=b"CSUM")
    assert compression.zstd_frame_length(framed + b"SIZE") == len(framed)
    with pytest.raises(compression.CompressionError, match="truncated"):
        compression.zstd_frame_length(zstd_frame(raw)[:-3])
    with pytest.raises(compression.CompressionError, match="reserved"):
        compression.zstd_frame_length(zstd_frame((3, b"")))


@needs_zstd
def test_zstd_frame_length_matches_the_zstd_program() -> None:
    for argv in (["zstd", "-q", "-c", "-1"], ["zstd", "-q", "-c", "--ultra", "-22", "--check"]):
        frame = subprocess.run(argv, input=FAKE_VMLINUX * 8, capture_output=True, check=True).stdout
        assert compression.zstd_frame_length(frame + b"\x01\x02\x03\x04") == len(frame)
    # the hand-made frames are real ones (1-byte content size: 11)
    assert compression.decompress(zstd_frame((0, b"hello world"), header_extra=b"\x0b") + b"SIZE") == b"hello world"


def zstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c", "-19"], input=data, capture_output=True, check=True).stdout


@needs_zstd
def test_extract_vmlinux_zstd_with_appended_size() -> None:
    """Debian 13's kernels are zstd-compressed (CONFIG_KERNEL_ZSTD), with the size appended."""
    payload = zstd(FAKE_VMLINUX) + struct.pack("<I", len(FAKE_VMLINUX))
    assert bzimage.extract_vmlinux(make_bzimage(payload)) == FAKE_VMLINUX


def test_zstd_without_the_program_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(bzimage.KernelImageError, match="needs the zstd program"):
        bzimage.extract_vmlinux(make_bzimage(zstd_frame((0, FAKE_VMLINUX[:100])) + b"SIZE"))


def test_truncated_or_corrupt_streams_are_errors() -> None:
    xz = lzma.compress(FAKE_VMLINUX, format=lzma.FORMAT_XZ)
    with pytest.raises(compression.CompressionError, match="truncated"):
        compression.decompress(xz[:len(xz) // 2])
    with pytest.raises(compression.CompressionError, match="corrupt"):
        compression.decompress(xz[:20] + bytes(200))


def test_compressed_module_paths_and_contents() -> None:
    ko = make_relocatable({".modinfo": b"name=9p\0depends=9pnet\0"})
    assert compression.ko_path("kernel/fs/9p/9p.ko.xz") == "kernel/fs/9p/9p.ko"
    assert compression.ko_path("kernel/fs/9p/9p.ko") == "kernel/fs/9p/9p.ko"
    assert compression.module_contents("9p.ko.xz", lzma.compress(ko)) == ko
    assert compression.module_contents("9p.ko.gz", gzip.compress(ko)) == ko
    assert compression.module_contents("9p.ko", ko) == ko
    assert kmods.is_module_file("a/b.ko.zst") and kmods.is_module_file("b.ko")
    assert not kmods.is_module_file("modules.order") and not kmods.is_module_file("b.ko.bak")


# -- the kernel package (synthetic .deb files shaped like Debian 12's and 13's) -----------------------------

RELEASE = "6.99.0-1-amd64"
PACKAGE = f"linux-image-{RELEASE}"
# module path -> its dependencies (what the kernel build records in .modinfo)
PACKAGE_MODULES = {
    "kernel/drivers/virtio/virtio_mmio.ko": "",
    "kernel/net/9p/9pnet.ko": "",
    "kernel/fs/netfs/netfs.ko": "",
    "kernel/fs/9p/9p.ko": "9pnet,netfs",
    "kernel/fs/ext4/ext4.ko": "",
}
BUILTIN = "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_pci.ko\n"
WANTED = ("virtio_mmio", "9p", "virtio_pci")
EXPECTED_ORDER = ["kernel/drivers/virtio/virtio_mmio.ko", "kernel/fs/netfs/netfs.ko", "kernel/net/9p/9pnet.ko",
                  "kernel/fs/9p/9p.ko"]


def make_pvh_vmlinux() -> bytes:
    """An ELF64 file whose one PT_NOTE holds the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)."""
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x1000000)
    phoff, note_off = 64, 64 + 56
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, phoff, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    return header + phdr + note + bytes(range(256)) * 16


def module_ko(path: str, depends: str) -> bytes:
    name = kmods.module_name(path)
    return make_relocatable({".text": b"\x90" * 16, ".modinfo": f"name={name}\0depends={depends}\0".encode()})


MODULE_COMPRESSORS = {".ko": lambda data: data, ".ko.xz": lzma.compress, ".ko.gz": gzip.compress,
                      ".ko.zst": lambda data: zstd(data)}
KERNEL_COMPRESSORS = {"xz": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
                      "zstd": lambda data: zstd(data)}


def make_kernel_deb(debs: Path, modules_dir: str, suffix: str, kernel_compression: str,
                    modules: dict[str, str] = PACKAGE_MODULES, vmlinux: bytes | None = None) -> Path:
    """debs/<package>_<version>_amd64.deb with boot/vmlinuz-*, boot/config-* and <modules_dir>/<release>/."""
    root = debs.parent / f"root-{modules_dir.replace('/', '-')}{suffix}"
    mod_root = root / modules_dir / RELEASE
    for path, depends in modules.items():
        target = mod_root / (compression.ko_path(path).removesuffix(".ko") + suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(MODULE_COMPRESSORS[suffix](module_ko(path, depends)))
    (mod_root / "modules.builtin").write_text(BUILTIN)
    (mod_root / "modules.order").write_text("\n".join(modules) + "\n")
    (root / "boot").mkdir(parents=True)
    vmlinux = make_pvh_vmlinux() if vmlinux is None else vmlinux
    payload = KERNEL_COMPRESSORS[kernel_compression](vmlinux) + struct.pack("<I", len(vmlinux))
    (root / "boot" / f"vmlinuz-{RELEASE}").write_bytes(make_bzimage(payload))
    (root / "boot" / f"config-{RELEASE}").write_text("CONFIG_PVH=y\n")
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN" / "control").write_text(f"Package: {PACKAGE}\nVersion: 6.99.0-1\nArchitecture: amd64\n"
                                             "Maintainer: test <test@example.invalid>\nDescription: test kernel\n")
    debs.mkdir(parents=True, exist_ok=True)
    deb = debs / f"{PACKAGE}_6.99.0-1_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


def kernel_options(tmp_path: Path, modules: tuple[str, ...] = WANTED) -> builder.Options:
    return builder.Options(out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", kernel_package=PACKAGE,
                           modules=modules, progress=lambda message: None)


@pytest.mark.parametrize("modules_dir, suffix, kernel_compression", [
    pytest.param("lib/modules", ".ko", "xz", id="debian12"),
    pytest.param("usr/lib/modules", ".ko.xz", "zstd", id="debian13", marks=needs_zstd),
    pytest.param("usr/lib/modules", ".ko.xz", "xz", id="merged-usr-ko.xz"),
    pytest.param("usr/lib/modules", ".ko.gz", "xz", id="ko.gz"),
    pytest.param("lib/modules", ".ko.zst", "xz", id="ko.zst", marks=needs_zstd),
])
def test_prepare_kernel_from_debian_12_and_13_packages(tmp_path: Path, modules_dir: str, suffix: str,
                                                       kernel_compression: str) -> None:
    make_kernel_deb(tmp_path / "cache" / "debs", modules_dir, suffix, kernel_compression)
    kernel = builder.prepare_kernel(kernel_options(tmp_path))
    assert kernel.release == RELEASE
    assert kernel.vmlinux.read_bytes() == make_pvh_vmlinux()
    # virtio_pci is built in; the image gets plain .ko files (finit_module without decompression)
    assert kernel.load_order == EXPECTED_ORDER
    assert kernel.per_module["virtio_pci"] == [] and kernel.per_module["9p"] == EXPECTED_ORDER[1:]
    for rel in kernel.load_order:
        assert elf.modinfo((kernel.modules_dir / rel).read_bytes())["name"] == [kmods.module_name(rel)]
    assert sorted(p.relative_to(kernel.modules_dir).as_posix() for p in kernel.modules_dir.rglob("*.ko")) == \
        sorted(EXPECTED_ORDER)


def test_kernel_package_problems_are_build_errors(tmp_path: Path) -> None:
    """What the script reports as one line (a BuildError) instead of a traceback."""
    debs = tmp_path / "cache" / "debs"
    make_kernel_deb(debs, "usr/lib/modules", ".ko.xz", "xz")
    with pytest.raises(builder.BuildError, match="module nosuch not found"):
        builder.prepare_kernel(kernel_options(tmp_path, ("nosuch",)))

    shutil.rmtree(tmp_path / "cache")
    make_kernel_deb(debs, "usr/lib/modules", ".ko.xz", "xz", modules={"kernel/fs/9p/9p.ko": "9pnet"})
    with pytest.raises(builder.BuildError, match="depends on modules not in the package: 9pnet"):
        builder.prepare_kernel(kernel_options(tmp_path))

    shutil.rmtree(tmp_path / "cache")
    make_kernel_deb(debs, "usr/lib/modules", ".ko.xz", "xz", vmlinux=b"not an ELF file")
    with pytest.raises(builder.BuildError, match="not an ELF"):
        builder.prepare_kernel(kernel_options(tmp_path))


def test_corrupt_compressed_module_is_a_build_error_naming_it(tmp_path: Path) -> None:
    deb = make_kernel_deb(tmp_path / "cache" / "debs", "usr/lib/modules", ".ko.xz", "xz")
    root = tmp_path / "cache" / "root-usr-lib-modules.ko.xz"
    (root / "usr/lib/modules" / RELEASE / "kernel/fs/9p/9p.ko.xz").write_bytes(b"\xfd7zXZ\x00" + bytes(64))
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)], check=True,
                   capture_output=True)
    with pytest.raises(builder.BuildError, match=r"kernel/fs/9p/9p\.ko\.xz: corrupt"):
        builder.prepare_kernel(kernel_options(tmp_path))


# -- the kernel download and what the image script reports ----------------------------------------------


def fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """apt-get and apt-cache that fail as they do offline."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("apt-get", "apt-cache"):
        (bin_dir / tool).write_text("#!/bin/sh\necho 'E: Failed to fetch' >&2\nexit 100\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")


def test_a_kernel_that_cannot_be_downloaded_is_kernel_unavailable(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fake_apt(tmp_path, monkeypatch)
    with pytest.raises(builder.KernelUnavailable, match="Failed to fetch"):
        builder.fetch_kernel_deb(PACKAGE, tmp_path / "debs", lambda message: None)
    with pytest.raises(builder.KernelUnavailable):
        builder.resolve_kernel_package()


def load_image_script():
    spec = importlib.util.spec_from_file_location("build_guest_image", REPO / "scripts" / "build_guest_image.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("unavailable", [True, False], ids=["kernel-unavailable", "build-failed"])
def test_image_script_exit_status_tells_an_unavailable_kernel_from_a_failed_build(
        unavailable: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The VM tests skip on the first (offline) and fail on the second, whatever progress lines came before."""
    script = load_image_script()
    if unavailable:
        error, status = builder.KernelUnavailable("apt-get download failed"), builder.EXIT_KERNEL_UNAVAILABLE
    else:
        error, status = builder.BuildError("zstd-compressed data needs the zstd program"), 1

    def fail(options: builder.Options) -> dict:
        options.progress(f"downloading {PACKAGE} (apt-get download)")
        raise error

    monkeypatch.setattr(script, "build", fail)
    monkeypatch.setattr(sys, "argv", ["build_guest_image.py"])
    assert script.main() == status
    assert f"guest-image: ERROR: {error}" in capsys.readouterr().err


def test_the_init_script_imports_the_agent_without_collections_and_freezes_what_they_made(tmp_path: Path) -> None:
    """/init as the image has it, run by this interpreter against a stand-in agent module: the imports
    run with the collector off (under TCG its passes cost a sixth of them for no garbage), the agent
    itself with it on again and the imported objects frozen out of its walks."""
    agent = tmp_path / builder.IMAGE_PY_DIR / "kuasar" / "vmagent"
    agent.mkdir(parents=True)
    (agent / "agent.py").write_text(
        "import gc\n"
        "during_import = gc.isenabled()\n"
        "def init_main(t0):\n"
        "    print(during_import, gc.isenabled(), gc.get_freeze_count() > 0, t0 > 0)\n")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    script = builder.INIT_SCRIPT.format(version=version, py_dir=f"{tmp_path}/{builder.IMAGE_PY_DIR}".lstrip("/"),
                                        python_flags="")
    assert script.startswith(f"#!/usr/bin/python{version} -SE\n")
    (tmp_path / "init").write_text(script)
    result = subprocess.run([sys.executable, "-S", "-E", str(tmp_path / "init")], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["False", "True", "True", "True"], result.stderr
