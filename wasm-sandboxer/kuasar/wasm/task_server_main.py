"""`wasm-task-server`: the task server wasm-sandboxer starts for itself (internal, not for users).

Apart from wasm-sandboxer's click CLI on purpose: the task server is resident, and whatever it imports
stays in its memory, so it loads neither click nor the config loader nor the Sandbox API.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kuasar.common.lean import keep_out_unused_modules

if TYPE_CHECKING:
    from kuasar.common.events import EventPublisher
    from kuasar.common.reaper import Reaper

    from .pod_tasks import WasmPodTasks


def make_backend(options: dict[str, Any], reaper: Reaper, events: EventPublisher, directory: Path) -> WasmPodTasks:
    """The task backend for the sandboxer's `[wasm]` options: wasm containers, and Linux ones unless
    `linux_containers` is off."""
    from kuasar.common.host_runc_tasks import RuncTasks

    from .pod_tasks import WasmPodTasks
    from .tasks import WasmSettings, WasmTasks

    settings = WasmSettings(**options)
    linux = RuncTasks(reaper, events, directory, settings.runc) if settings.linux_containers else None
    return WasmPodTasks(WasmTasks(reaper, events, directory, settings), linux)


def main() -> None:
    keep_out_unused_modules()
    # Loading wasmtime here, once, saves every container process the ~70 ms import; loading the
    # library starts no thread. Compiling would (runner.py), so this process never compiles.
    import wasmtime  # noqa: F401

    from kuasar.common.task_server import task_server_main

    from .runner import forbid_compiling_here

    forbid_compiling_here()
    task_server_main(make_backend)


if __name__ == "__main__":
    main()
