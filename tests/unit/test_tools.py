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


@pytest.mark.parametrize("executable", ["/opt/k/bin/containerd-shim-kuasar-runc-v1",
                                        "/opt/k/lib/kuasar/kuasar-0123abcd"])
def test_the_install_prefix_of_a_program_name_and_of_the_build_it_links_to(executable: str) -> None:
    # A frozen program's sys.executable is the build's own file (lib/kuasar/kuasar-<digest>) the names link
    # to: its prefix's etc/kuasar (shim.toml, runc.toml) and bin/ (helpers) are found from either.
    assert tools.install_prefix(executable) == Path("/opt/k")
    assert tools.install_prefix("/home/me/kuasar/.venv/bin/python") == Path("/home/me/kuasar/.venv")
    assert tools.install_prefix("/srv/kuasar-build") is None


def test_a_frozen_binary_finds_the_helpers_in_its_prefixs_bin_from_its_build_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    helper = program(tmp_path / "prefix" / "bin" / "vhost-device-vsock")
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "prefix" / "lib" / "kuasar" / "kuasar-0123abcd"))
    monkeypatch.delenv("KUASAR_PREFIX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert tools.find_tool("vhost-device-vsock") == str(helper)
