"""state.overwrite: a file rewritten in place, for files only we read right after."""

from __future__ import annotations

from pathlib import Path

import pytest

from kuasar.common.state import overwrite


def test_overwrite_replaces_longer_and_shorter_content_in_place(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b'{"old": "content"}')
    inode = path.stat().st_ino
    overwrite(path, b'{"new": "and longer content"}')
    assert path.read_bytes() == b'{"new": "and longer content"}'
    overwrite(path, b"{}")
    assert path.read_bytes() == b"{}" and path.stat().st_ino == inode
    with pytest.raises(FileNotFoundError):
        overwrite(tmp_path / "missing.json", b"{}")
