"""`wasm-sandboxer`: the resident daemon, plus the `task-server` it starts for itself."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from kuasar.common.cli import sandboxer_command
from kuasar.common.config import DaemonConfig
from kuasar.common.task_server import run_task_server

from .sandboxer import WasmSandboxer

main = sandboxer_command("wasm", "/run/kuasar/wasm-sandboxer.sock", "/run/kuasar-wasm", WasmSandboxer)


@main.command("task-server", hidden=True)
@click.option("--runtime", type=click.Choice(["wasmtime", "wasmedge"]), default="wasmtime",
              help="Default engine (a container's io.kuasar.wasm.runtime annotation overrides it).")
@click.option("--wasmedge", default="wasmedge", help="WasmEdge binary, for runtime wasmedge.")
@click.option("--cache/--no-cache", default=True, help="Keep compiled modules on disk.")
@click.option("--cache-max-mb", type=int, default=512, help="Size bound of the compiled-module cache.")
@click.option("--ready-fd", type=int, default=-1, help="Write one byte here once serving.")
@click.pass_obj
def task_server(config: DaemonConfig, runtime: str, wasmedge: str, cache: bool, cache_max_mb: int,
                ready_fd: int) -> None:
    """Serve the Task API and hold the pods (started by the sandboxer, outlives it)."""
    # Loading wasmtime here, once, saves every container process the ~70 ms import; loading the
    # library starts no thread. Compiling would (runner.py), so this process never compiles.
    import wasmtime  # noqa: F401

    from .runner import forbid_compiling_here
    from .tasks import WasmSettings, WasmTasks

    forbid_compiling_here()
    settings = WasmSettings(runtime, wasmedge, cache, cache_max_mb << 20)
    directory = Path(config.dir)
    asyncio.run(run_task_server(
        directory, config.events_address, ready_fd,
        lambda reaper, events, d: WasmTasks(reaper, events, d, settings)))


if __name__ == "__main__":
    main()
