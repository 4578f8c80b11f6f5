"""The compiled-module cache: keys, atomic stores, least-recently-used pruning."""

from __future__ import annotations

import os
from pathlib import Path

from kuasar.wasm.cache import ModuleCache, engine_fingerprint, module_digest, wasmtime_version


def test_key_depends_on_module_wasmtime_version_and_settings() -> None:
    fingerprint = engine_fingerprint({})
    assert wasmtime_version() == "50.0.1" and "wasmtime 50.0.1" in fingerprint
    assert engine_fingerprint({"consume_fuel": True}) != fingerprint
    assert engine_fingerprint({"a": 1, "b": 2}) == engine_fingerprint({"b": 2, "a": 1})
    one, two = module_digest(b"\0asm\x01\0\0\0"), module_digest(b"\0asm\x01\0\0\0\0")
    assert ModuleCache.key(one, fingerprint) == ModuleCache.key(one, fingerprint)
    assert len({ModuleCache.key(one, fingerprint), ModuleCache.key(two, fingerprint),
                ModuleCache.key(one, engine_fingerprint({"consume_fuel": True}))}) == 3


def test_store_is_atomic_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path / "cache")
    path = cache.path(module_digest(b"x"), engine_fingerprint({}))
    cache.store(path, b"artifact-1")
    inode = path.stat().st_ino
    cache.store(path, b"artifact-2")  # replaced by rename: a reader of the old file keeps its inode
    assert path.read_bytes() == b"artifact-2" and path.stat().st_ino != inode
    assert [p.name for p in cache.directory.iterdir()] == [path.name]


def test_prune_drops_least_recently_used_first(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path, max_bytes=250)
    paths = []
    for i in range(4):
        path = tmp_path / f"{i:064x}.cwasm"
        path.write_bytes(b"x" * 100)
        os.utime(path, (1000 + i, 1000 + i))
        paths.append(path)
    cache.touch(paths[0])  # used just now: survives
    stale = tmp_path / ".abc.cwasm.1.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (1, 1))
    assert cache.prune() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([paths[0].name, paths[3].name])
    assert ModuleCache(tmp_path / "missing").prune() == 0
