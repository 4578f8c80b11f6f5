"""The VM tests' skip gates on a Debian 13 host: the guest's interpreter is whatever the image builder
picks (default_python: python3.13 there), not a hard-coded /usr/bin/python3.11."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import kuasar.vmm.config
from tests.integration import test_vmm_cri as vmm

DEBIAN12_PYTHON = "/usr/bin/python3.11"


@pytest.fixture
def trixie_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tool the VM tests need is there, except a python3.11 (Debian 13 has 3.13)."""
    real_exists = os.path.exists
    monkeypatch.setattr(vmm, "integration_skip_reason", lambda: None)
    monkeypatch.setattr(kuasar.vmm.config, "find_program", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None if name == DEBIAN12_PYTHON
                        else f"/usr/bin/{Path(name).name}")
    monkeypatch.setattr(os.path, "exists", lambda path: path != DEBIAN12_PYTHON and real_exists(path))


def test_vmm_gate_runs_with_the_builders_python(trixie_host: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmm, "default_python", lambda: Path("/usr/bin/python3"), raising=False)
    assert vmm.vm_skip_reason() is None


def test_vmm_gate_skips_without_a_guest_python(trixie_host: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmm, "default_python", lambda: None, raising=False)
    assert "python3 >= 3.11" in (vmm.vm_skip_reason() or "")
