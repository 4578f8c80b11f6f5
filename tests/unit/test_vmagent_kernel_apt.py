"""The guest image builder's apt steps on a base image whose package lists were cleaned: the kernel
package is resolved and downloaded after one `apt-get update` (apt replaced by a fake)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kuasar.vmagent.imagebuild import builder

DEPENDS = b"linux-image-amd64\n  Depends: linux-image-6.1.0-28-amd64\n"


class FakeApt:
    """apt-cache and apt-get over package lists that exist only after `apt-get update`."""

    def __init__(self, depends_after_update: bytes = DEPENDS) -> None:
        self.calls: list[str] = []
        self.updated = False
        self.depends_after_update = depends_after_update

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        command = f"{argv[0]} {argv[-2] if argv[0] == 'apt-cache' else argv[-1]}"
        self.calls.append(command)
        if argv[0] == "apt-get" and argv[-1] == "update":
            self.updated = True
        elif not self.updated:
            raise builder.BuildError(f"{command} failed (100): E: No packages found")
        elif argv[0] == "apt-cache":
            return subprocess.CompletedProcess(argv, 0, self.depends_after_update, b"")
        else:
            (Path(kwargs["cwd"]) / f"{argv[-1]}_6.1.123-1_amd64.deb").write_bytes(b"deb")
        return subprocess.CompletedProcess(argv, 0, b"", b"")


def test_kernel_package_resolved_after_one_update(monkeypatch: pytest.MonkeyPatch) -> None:
    apt = FakeApt()
    monkeypatch.setattr(builder, "_run", apt.run)
    assert builder.resolve_kernel_package() == "linux-image-6.1.0-28-amd64"
    assert apt.calls == ["apt-cache depends", "apt-get update", "apt-cache depends"]


def test_kernel_package_unknown_even_after_update(monkeypatch: pytest.MonkeyPatch) -> None:
    apt = FakeApt(depends_after_update=b"linux-image-amd64\n")
    monkeypatch.setattr(builder, "_run", apt.run)
    with pytest.raises(builder.BuildError, match="no linux-image-amd64 dependency"):
        builder.resolve_kernel_package()
    assert apt.calls.count("apt-get update") == 1


def test_kernel_deb_downloaded_after_one_update(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    apt = FakeApt()
    monkeypatch.setattr(builder, "_run", apt.run)
    said: list[str] = []
    deb = builder.fetch_kernel_deb("linux-image-6.1.0-28-amd64", tmp_path / "debs", said.append)
    assert deb.name == "linux-image-6.1.0-28-amd64_6.1.123-1_amd64.deb"
    assert apt.calls == ["apt-get linux-image-6.1.0-28-amd64", "apt-get update", "apt-get linux-image-6.1.0-28-amd64"]
    assert any("refreshing the package lists once" in line for line in said)
