"""`wasm-sandboxer` entry point. The component is planned, not built: it says so and exits non-zero."""

from __future__ import annotations

import sys

from kuasar.common.cli import not_implemented_command

main = not_implemented_command("wasm-sandboxer", "WebAssembly pods (wasmtime)")

if __name__ == "__main__":
    sys.exit(main())
