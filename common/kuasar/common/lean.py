"""Keep the resident daemons small: modules they never use are kept out before anything imports them.

Every module a resident process imports stays in its memory for the process's whole life, and memory
is a headline figure (see benchmarks/). Call `keep_out_unused_modules()` first thing in a daemon's
entry point, before asyncio is imported.
"""

from __future__ import annotations

import sys

# The daemons talk over unix sockets and vsock only, never TLS. asyncio imports ssl whenever it can,
# which maps libssl and libcrypto (about 4 MB of one process's PSS); without it asyncio works as
# designed for Pythons built without ssl. A None entry makes `import ssl` raise ImportError.
UNUSED_MODULES = ("ssl",)


def keep_out_unused_modules() -> None:
    for name in UNUSED_MODULES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
