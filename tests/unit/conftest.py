"""Fixtures shared by unit test modules."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest


@pytest.fixture
def running() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts (append them): killed and reaped after it, whatever it left."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()
