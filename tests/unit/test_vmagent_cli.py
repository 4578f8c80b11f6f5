"""vm-agent's command line on bad input: a clear error, not a traceback or a value taken silently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from kuasar.vmagent.cli import main


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["boot", "--image", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "is not a guest image" in result.output, result.output
    console = subprocess.run([sys.executable, "-m", "kuasar.vmagent.cli", "console", str(tmp_path / "missing.sock")],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert console.returncode == 1 and "Error: the guest's console at" in console.stderr, console.stderr
    assert "Traceback" not in console.stderr
    result = runner.invoke(main, ["serve", "--listen", str(tmp_path / "s.sock"), "--log-level", "bogus"])
    assert result.exit_code == 2 and "'bogus' is not one of" in result.output, result.output
