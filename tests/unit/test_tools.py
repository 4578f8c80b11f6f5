"""Where helper programs are looked for, in a checkout and in an installed (frozen) binary."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kuasar.common import tools


def program(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_a_frozen_binary_never_runs_a_program_planted_where_its_modules_are_unpacked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A frozen binary's modules are unpacked under $TMPDIR: the checkout that __file__ pointed into was
    # /tmp there, and an installed vmm-sandboxer ran /tmp/.prefix/bin/qemu-system-x86_64 as root.
    unpacked = tmp_path / "tmp"
    program(unpacked / ".prefix" / "bin" / "qemu-system-x86_64")
    monkeypatch.setattr(tools, "CHECKOUT", unpacked)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "usr-local" / "bin" / "kuasar"))
    monkeypatch.delenv("KUASAR_PREFIX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert tools.find_tool("qemu-system-x86_64") is None
    # what `make install` put beside the binary is found
    beside = program(tmp_path / "usr-local" / "bin" / "vhost-device-vsock")
    assert tools.find_tool("vhost-device-vsock") == str(beside)


def test_a_checkout_finds_what_make_setup_fetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetched = program(tmp_path / ".prefix" / "bin" / "vhost-device-vsock")
    monkeypatch.setattr(tools, "CHECKOUT", tmp_path)
    monkeypatch.delattr(sys, "frozen", raising=False)
    monkeypatch.delenv("KUASAR_PREFIX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert tools.find_tool("vhost-device-vsock") == str(fetched)
    assert tools.find_tool("nope") is None
    assert tools.find_tool(str(fetched)) == str(fetched)
