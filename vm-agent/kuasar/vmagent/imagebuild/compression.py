"""Decompress what Debian's kernel packages hold: the bzImage payload (xz in Debian 12, zstd in 13)
and the modules (plain `.ko` in Debian 12, `.ko.xz` in 13; kmod also knows `.ko.zst` and `.ko.gz`).

xz, lzma, gzip and bzip2 come from the standard library. zstd does not (before Python 3.14): it
goes through the `zstd` program (package zstd, installed by `make setup`).
"""

from __future__ import annotations

import bz2
import lzma
import shutil
import subprocess
import zlib

XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b"
BZIP2_MAGIC = b"BZh"
LZMA_MAGIC = b"\x5d\x00\x00"
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Kernel module file name endings, as kmod knows them.
MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz")

# zstd frame layout (RFC 8878, 3.1.1): sizes of the optional header fields by their flags.
_ZSTD_DICT_ID_BYTES = (0, 1, 2, 4)
_ZSTD_CONTENT_SIZE_BYTES = (0, 2, 4, 8)  # flag 0 means 1 byte in a single-segment frame
_ZSTD_BLOCK_RLE, _ZSTD_BLOCK_RESERVED = 1, 3
_ZSTD_CHECKSUM_BYTES = 4
# The kernel's zstd -22 --ultra uses a 128 MB window, the zstd program's default limit: allow more
# so that a kernel built with a larger one still decompresses (the memory is only used if needed).
ZSTD_MEMORY_LIMIT = "--memory=2048MB"


class CompressionError(ValueError):
    pass


def zstd_frame_length(data: bytes) -> int:
    """The length of the zstd frame at the start of `data`, read from its block headers.

    The kernel build appends the uncompressed size after the frame, and the zstd program fails
    on any byte after the last frame: it gets the frame alone.
    """
    try:
        descriptor = data[4]
        single_segment = descriptor >> 5 & 1
        content_size = _ZSTD_CONTENT_SIZE_BYTES[descriptor >> 6] or single_segment
        pos = 5 + (0 if single_segment else 1) + _ZSTD_DICT_ID_BYTES[descriptor & 3] + content_size
        last = 0
        while not last:
            if pos + 3 > len(data):
                raise IndexError
            header = int.from_bytes(data[pos:pos + 3], "little")
            last, kind, size = header & 1, header >> 1 & 3, header >> 3
            if kind == _ZSTD_BLOCK_RESERVED:
                raise CompressionError(f"zstd block of the reserved type at byte {pos}")
            pos += 3 + (1 if kind == _ZSTD_BLOCK_RLE else size)
        if descriptor >> 2 & 1:
            pos += _ZSTD_CHECKSUM_BYTES
    except IndexError:
        raise CompressionError("truncated zstd frame") from None
    if pos > len(data):
        raise CompressionError("truncated zstd frame")
    return pos


def _zstd(data: bytes) -> bytes:
    program = shutil.which("zstd")
    if program is None:
        raise CompressionError("zstd-compressed data needs the zstd program (package zstd; `make setup` installs it)")
    frame = data[:zstd_frame_length(data)]
    result = subprocess.run([program, "-d", "-c", "-q", ZSTD_MEMORY_LIMIT], input=frame, capture_output=True,
                            check=False)
    if result.returncode != 0:
        raise CompressionError(f"zstd -d failed ({result.returncode}): "
                               f"{result.stderr.decode(errors='replace').strip()}")
    return result.stdout


# Standard-library decompressors by the magic bytes their streams start with.
_STDLIB_DECOMPRESSORS = (
    (XZ_MAGIC, lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ)),
    (GZIP_MAGIC, lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
    (BZIP2_MAGIC, bz2.BZ2Decompressor),
    (LZMA_MAGIC, lambda: lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)),
)


def decompress(data: bytes) -> bytes:
    """Decompress the stream at the start of `data` by its magic; bytes after it are ignored."""
    for magic, factory in _STDLIB_DECOMPRESSORS:
        if data.startswith(magic):
            decompressor = factory()
            try:
                out = decompressor.decompress(data)
            except (lzma.LZMAError, zlib.error, OSError, EOFError) as err:
                raise CompressionError(f"corrupt stream: {err}") from None
            if not decompressor.eof:
                raise CompressionError("truncated stream")
            return out
    if data.startswith(ZSTD_MAGIC):
        return _zstd(data)
    if data.startswith(LZ4_LEGACY_MAGIC):
        raise CompressionError("LZ4 compression is not supported: use a flavour compressed with xz, gzip or zstd")
    raise CompressionError(f"unknown compression (magic {data[:6].hex()})")


def ko_path(path: str) -> str:
    """The plain `.ko` path of a module file: "kernel/fs/9p/9p.ko.xz" -> "kernel/fs/9p/9p.ko"."""
    for suffix in MODULE_SUFFIXES:
        if path.endswith(suffix):
            return path.removesuffix(suffix) + ".ko"
    return path


def module_contents(path: str, data: bytes) -> bytes:
    """The ELF contents of a module file, decompressing `x.ko.xz` and the like.

    The guest loads modules with plain finit_module(2), which takes compressed ones only from a
    kernel built with module decompression: the image carries them decompressed.
    """
    return data if ko_path(path) == path else decompress(data)


__all__ = ["CompressionError", "decompress", "ko_path", "module_contents", "zstd_frame_length"]
