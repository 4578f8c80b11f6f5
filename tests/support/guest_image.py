"""The vm-agent guest image for the VM tests: scripts/build_guest_image.py (cached: a no-op when
nothing changed) run as `make guest-image` would, its outcome turned into a skip or a failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kuasar.vmagent.imagebuild.builder import EXIT_KERNEL_UNAVAILABLE

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO / "build" / "guest"


def build_guest_image(timeout: float) -> tuple[Path, Path]:
    """(vmlinux, initramfs) in build/guest/. Skips only when the kernel package cannot be downloaded
    here (the script's own exit status: its progress lines name apt-get on every first build, so
    they cannot tell); any other failure fails the test."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "build_guest_image.py")],
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode == EXIT_KERNEL_UNAVAILABLE:
        pytest.skip(f"guest kernel package could not be downloaded:\n{result.stderr[-2000:]}")
    if result.returncode != 0:
        pytest.fail(f"guest image build failed:\n{result.stderr[-4000:]}")
    manifest = json.loads((IMAGE_DIR / "manifest.json").read_text())
    return IMAGE_DIR / "vmlinux", IMAGE_DIR / manifest["initramfs"]["file"]
