"""The daemon proper of every sandboxer: `python -m kuasar.common.daemon_main SPEC_JSON`.

A sandboxer's click CLI (cli.py) parses the flags and the TOML config, then execs this module with
the result (same pid, so systemd's Type=notify and any supervisor see one process). The resident
daemon thereby carries neither click nor the TOML loader (~1.3 MB of every resident pair, measured
in benchmarks/), and this module imports nothing heavy before the unused modules are kept out.
A frozen binary runs the daemon in-process instead (`run`), without the exec.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

from .lean import keep_out_unused_modules

# What the CLI hands over: the DaemonConfig's fields, the type's Sandboxer factory ("module:callable")
# and its name; "lean" (optional, default true) says whether lean.UNUSED_MODULES may be kept out.
SPEC_KEYS = frozenset({"name", "listen", "dir", "log_level", "events_address", "sections", "factory"})


def spec_argv(spec: dict[str, Any]) -> list[str]:
    """argv that runs the daemon for `spec` (SPEC_KEYS)."""
    return [sys.executable, "-m", __name__, json.dumps(spec)]


def run_or_exit(spec: dict[str, Any]) -> None:
    """Serve until SIGTERM; a sandboxer that cannot start says why on stderr and exits with status 1."""
    from .errors import KuasarError

    try:
        run(spec)
    except KuasarError as exc:
        sys.stderr.write(f"{spec['name']}-sandboxer: {exc.message}\n")
        sys.exit(1)
    except OSError as exc:  # --dir or --listen unusable: a file in the way, a path too long for a socket
        where = f" ({exc.filename})" if exc.filename else ""
        sys.stderr.write(f"{spec['name']}-sandboxer: cannot start: {exc.strerror or exc}{where}\n")
        sys.exit(1)


def run(spec: dict[str, Any]) -> None:
    """Serve until SIGTERM. Raises KuasarError when the sandboxer cannot start."""
    if spec.get("lean", True):
        keep_out_unused_modules()
    import asyncio

    from .config import DaemonConfig
    from .daemon import prepare, serve
    from .logs import setup_logging

    setup_logging(spec["log_level"])
    config = DaemonConfig(listen=Path(spec["listen"]), dir=Path(spec["dir"]), log_level=spec["log_level"],
                          events_address=spec["events_address"], sections=spec["sections"])
    module, _, attr = spec["factory"].partition(":")
    make_sandboxer = getattr(importlib.import_module(module), attr)
    sandboxer, systemd = prepare(config, make_sandboxer)
    asyncio.run(serve(config, sandboxer, systemd))


def main() -> None:
    try:
        spec = json.loads(sys.argv[1])
        if not isinstance(spec, dict) or not SPEC_KEYS <= spec.keys():
            raise ValueError(f"a JSON object with {', '.join(sorted(SPEC_KEYS))}")
    except (IndexError, ValueError) as exc:
        sys.stderr.write(f"{__name__}: internal program, exec'd by a sandboxer's CLI (usage: SPEC_JSON): {exc}\n")
        sys.exit(2)
    run_or_exit(spec)


if __name__ == "__main__":
    main()
