"""The README's two commands, the Makefile they use and .ci/run, in throw-away copies of the checkout
(a path with a space, stub setup and tools): nothing here installs or runs the real targets."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make (scripts/setup.sh installs it)")


def readme_commands() -> list[str]:
    quick_start = REPO.joinpath("README.md").read_text().split("## Quick start", 1)[1]
    block = re.search(r"```sh\n(.*?)```", quick_start, re.S)
    assert block
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_commands_need_nothing_but_bash_first() -> None:
    # a fresh machine has no make: the setup is started by bash, and installs make
    commands = readme_commands()
    assert commands == ["bash scripts/setup.sh && make run", "bash scripts/setup.sh && make test"]
    assert re.search(r"^\s*local packages=\(make ", REPO.joinpath("scripts/setup.sh").read_text(), re.M)


def test_ci_runs_the_readme_test_command() -> None:
    ci = REPO.joinpath(".ci/run").read_text()
    assert readme_commands()[1] in ci
    assert ci.index("bash scripts/setup.sh\n") < ci.index("make lint") < ci.index(readme_commands()[1])


def checkout(tmp_path: Path, makefile_rules: str = "") -> Path:
    """A copy of the Makefile (plus MAKEFILE_RULES) and .ci/run in a path with a space, with a stub
    setup.sh and venv."""
    root = tmp_path / "a checkout"
    (root / ".ci").mkdir(parents=True)
    (root / "scripts").mkdir()
    (root / ".venv/bin").mkdir(parents=True)
    shutil.copy(REPO / ".ci/run", root / ".ci/run")
    (root / "Makefile").write_text(REPO.joinpath("Makefile").read_text() + makefile_rules)
    (root / "scripts/setup.sh").write_text("echo setup-ran\n")
    (root / ".venv/bin/ruff").write_text('#!/bin/sh\necho "ruff ran: $*"\n')
    # pytest says which options it got from the environment and lasts $SLEEP seconds
    (root / ".venv/bin/python").write_text('#!/bin/sh\necho "python ran: $*"\nif [ "$1 $2" = "-m pytest" ]; then\n'
                                           '    echo "pytest options: $PYTEST_ADDOPTS"; exec sleep "${SLEEP:-0}"\nfi\n')
    for tool in ("python", "ruff"):
        (root / ".venv/bin" / tool).chmod(0o755)
    return root


@needs_make
def test_make_works_in_a_path_with_spaces(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    for target, ran in [("lint", "ruff ran: check ."), ("protos", "python ran: scripts/gen_protos.py")]:
        out = subprocess.run(["make", "-s", target], cwd=root, capture_output=True, text=True, timeout=60,
                             check=False)
        assert out.returncode == 0 and ran in out.stdout, out.stdout + out.stderr


@needs_make
def test_make_puts_root_sbin_on_path(tmp_path: Path) -> None:
    # root by `su` without `-`: no sbin directories on PATH, where tc and iptables live
    root = checkout(tmp_path, '\nshow-path:\n\t@echo "$$PATH"\n')
    out = subprocess.run(["make", "-s", "show-path"], cwd=root, capture_output=True, text=True, timeout=60,
                         check=False, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert {"/usr/sbin", "/sbin"} <= set(out.stdout.strip().split(":"))


@needs_make
@pytest.mark.skipif(shutil.which("timeout") is None, reason="no timeout (coreutils)")
def test_ci_fails_clearly_when_the_tests_outlast_their_budget(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    started = time.monotonic()
    out = subprocess.run([str(root / ".ci/run")], capture_output=True, text=True, timeout=60, check=False,
                         env={"PATH": "/usr/bin:/bin", "KUASAR_CI_TEST_BUDGET": "1s", "SLEEP": "30"})
    assert out.returncode == 124 and time.monotonic() - started < 20, out.stdout + out.stderr
    assert "did not finish within 1s" in out.stderr
    assert "pytest options: --durations=20" in out.stdout
    fast = subprocess.run([str(root / ".ci/run")], capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin", "KUASAR_CI_TEST_BUDGET": "20s", "SLEEP": "0"})
    assert fast.returncode == 0 and "did not finish" not in fast.stderr, fast.stdout + fast.stderr
