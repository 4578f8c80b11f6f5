"""`runc-sandboxer`: the resident daemon, plus the `task-server` it starts for itself."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from kuasar.common.cli import sandboxer_command
from kuasar.common.config import DaemonConfig
from kuasar.common.sandboxer import Sandboxer


def make_sandboxer(config: DaemonConfig) -> Sandboxer:
    # Imported on use: the task server, started through this same command, needs none of it.
    from .sandboxer import RuncSandboxer

    return RuncSandboxer(config)


main = sandboxer_command("runc", "/run/kuasar/runc-sandboxer.sock", "/run/kuasar-runc", make_sandboxer)


@main.command("task-server", hidden=True)
@click.option("--runc", "runc_binary", default="runc", help="runc binary to run containers with.")
@click.option("--ready-fd", type=int, default=-1, help="Write one byte here once serving.")
@click.pass_obj
def task_server(config: DaemonConfig, runc_binary: str, ready_fd: int) -> None:
    """Serve the Task API and hold the pods (started by the sandboxer, outlives it)."""
    from kuasar.common.task_server import run_task_server

    from .tasks import RuncTasks

    directory = Path(config.dir)
    asyncio.run(run_task_server(
        directory, config.events_address, ready_fd,
        lambda reaper, events, d: RuncTasks(reaper, events, d, runc_binary)))


if __name__ == "__main__":
    main()
