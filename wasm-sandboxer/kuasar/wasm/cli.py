"""`wasm-sandboxer`: the resident daemon (its task server is `wasm-task-server`, task_server_main.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kuasar.common.cli import sandboxer_command
from kuasar.common.config import DaemonConfig

if TYPE_CHECKING:
    from kuasar.common.sandboxer import Sandboxer


def make_sandboxer(config: DaemonConfig) -> Sandboxer:
    from .sandboxer import WasmSandboxer

    return WasmSandboxer(config)


main = sandboxer_command("wasm", "/run/kuasar/wasm-sandboxer.sock", "/run/kuasar-wasm", make_sandboxer)


if __name__ == "__main__":
    main()
