"""Binding onto places a pod can write to without following a symlink on the way (kuasar.common.beneath),
in a mount namespace of the test's own (`unshare -m`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kuasar.common import beneath
from kuasar.common.errors import InvalidArgument

REPO = Path(__file__).resolve().parents[2]


def test_open_beneath_makes_what_is_missing_and_refuses_a_symlink_anywhere(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    parent, fd, name = beneath.open_beneath(root, "/a/b/file", beneath.FILE)
    os.close(parent)
    os.close(fd)
    assert name == "file" and (root / "a" / "b" / "file").is_file()
    (root / "link").symlink_to(outside)  # what a pod swaps in between a check and a use
    (root / "a" / "last").symlink_to(outside / "x")
    for relative in ("link/file", "link/deeper/file", "a/last"):
        with pytest.raises(OSError):
            beneath.open_beneath(root, relative, beneath.FILE)
    for relative in ("", "/", "a/../../x"):
        with pytest.raises(InvalidArgument):
            beneath.open_beneath(root, relative, beneath.FILE)
    assert list(outside.iterdir()) == []  # nothing was made through the links


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="mounts: root and unshare")
def test_a_bind_goes_onto_the_place_opened_and_a_read_only_one_is_read_only(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import errno, os, sys
        from pathlib import Path
        sys.path[:0] = [{str(REPO / "common")!r}]
        from kuasar.common import beneath
        from kuasar.common.errors import InvalidArgument
        base = Path({str(tmp_path)!r})
        root, outside, source = base / "root", base / "outside", base / "conf"
        root.mkdir(); outside.mkdir(); source.write_text("setting=1\\n")
        beneath.bind_beneath(str(source), root, "etc/app.conf", readonly=True)
        print((root / "etc" / "app.conf").read_text().strip())
        try:
            (root / "etc" / "app.conf").write_text("changed")
        except OSError as err:
            print(err.errno == errno.EROFS)
        (root / "var").symlink_to(outside)
        try:
            beneath.bind_beneath(str(source), root, "var/app.conf")
        except InvalidArgument as err:
            print("refused" if "symbolic link" in str(err) else err)
        print(os.listdir(outside))
    """)
    result = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", script],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["setting=1", "True", "refused", "[]"]
