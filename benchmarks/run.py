#!/usr/bin/env python3
"""Run the benchmarks: ``python benchmarks/run.py [--smoke] [options]`` (see ``--help``); needs root."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `benchmarks`, `tests`

from benchmarks.cli import main  # noqa: E402 - needs the path above

if __name__ == "__main__":
    sys.exit(main())
