"""`wasm-sandboxer`: the resident daemon's CLI (the daemon proper is kuasar.common.daemon_main; its
task server is `wasm-task-server`, task_server_main.py)."""

from __future__ import annotations

from kuasar.common.cli import sandboxer_command

main = sandboxer_command("wasm", "/run/kuasar/wasm-sandboxer.sock", "/run/kuasar-wasm",
                         "kuasar.wasm.sandboxer:WasmSandboxer")


if __name__ == "__main__":
    main()
