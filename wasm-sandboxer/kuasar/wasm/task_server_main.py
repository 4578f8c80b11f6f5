"""`wasm-task-server`: the task server wasm-sandboxer starts for itself (internal, not for users).

Apart from wasm-sandboxer's click CLI on purpose: the task server is resident, and whatever it imports
stays in its memory, so it loads neither click nor the config loader nor the Sandbox API.
"""

from __future__ import annotations

from kuasar.common.lean import keep_out_unused_modules


def main() -> None:
    keep_out_unused_modules()
    # Loading wasmtime here, once, saves every container process the ~70 ms import; loading the
    # library starts no thread. Compiling would (runner.py), so this process never compiles.
    import wasmtime  # noqa: F401

    from kuasar.common.task_server import task_server_main

    from .runner import forbid_compiling_here
    from .tasks import WasmSettings, WasmTasks

    forbid_compiling_here()
    task_server_main(lambda options, reaper, events, directory: WasmTasks(
        reaper, events, directory, WasmSettings(**options)))


if __name__ == "__main__":
    main()
