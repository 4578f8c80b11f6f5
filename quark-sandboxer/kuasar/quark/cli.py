"""`quark-sandboxer`: the resident daemon (backend `quark` or `runsc`), plus the runsc backend's task server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from kuasar.common.cli import sandboxer_command
from kuasar.common.config import DaemonConfig
from kuasar.common.errors import KuasarError
from kuasar.common.sandboxer import Sandboxer
from kuasar.common.task_server import run_task_server

from .config import QuarkConfig


def _config_path() -> str | None:
    ctx = click.get_current_context(silent=True)
    return ctx.params.get("config_path") if ctx is not None else None


def make_sandboxer(config: DaemonConfig) -> Sandboxer:
    quark = QuarkConfig.from_daemon(config)
    if quark.backend == "runsc":
        from .gvisor_sandboxer import GvisorSandboxer

        path = _config_path()
        return GvisorSandboxer(config, quark, str(Path(path).absolute()) if path else None)
    from .quark_sandboxer import QuarkSandboxer

    return QuarkSandboxer(config, quark)


main = sandboxer_command("quark", "/run/kuasar/quark-sandboxer.sock", "/run/kuasar-quark", make_sandboxer)


@main.command("task-server", hidden=True)
@click.option("--ready-fd", type=int, default=-1, help="Write one byte here once serving.")
@click.pass_obj
def task_server(config: DaemonConfig, ready_fd: int) -> None:
    """Serve the Task API and hold the gVisor pods (started by the sandboxer, outlives it)."""
    from .gvisor_tasks import GvisorTasks

    try:
        quark = QuarkConfig.from_daemon(config)
    except KuasarError as exc:
        raise click.ClickException(exc.message) from None
    asyncio.run(run_task_server(Path(config.dir), config.events_address, ready_fd,
                                lambda reaper, events, d: GvisorTasks(reaper, events, d, quark)))


if __name__ == "__main__":
    main()
