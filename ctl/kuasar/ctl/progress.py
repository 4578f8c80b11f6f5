"""Progress for slow steps (RunPodSandbox, image pulls, VM boots): a spinner on a terminal, else nothing.

Everything goes to stderr so stdout stays what a script reads (an id, a table, JSON).
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TextIO

FRAMES = "|/-\\"
INTERVAL = 0.1


@asynccontextmanager
async def step(label: str, enabled: bool = True, out: TextIO | None = None) -> AsyncIterator[None]:
    """Show `label` with a spinner and the elapsed time while the body runs, then `label ... done (1.2s)`."""
    out = out or sys.stderr
    live = enabled and out.isatty()
    started = time.monotonic()
    spinner: asyncio.Task[None] | None = None

    async def spin() -> None:
        for frame in itertools.cycle(FRAMES):
            out.write(f"\r{frame} {label} {time.monotonic() - started:4.1f}s")
            out.flush()
            await asyncio.sleep(INTERVAL)

    if live:
        spinner = asyncio.create_task(spin())
    ok = False
    try:
        yield
        ok = True
    finally:
        if spinner is not None:
            spinner.cancel()
            try:
                await spinner
            except asyncio.CancelledError:
                pass
            outcome = "done" if ok else "failed"
            out.write(f"\r{label} ... {outcome} ({time.monotonic() - started:.1f}s)\033[K\n")
            out.flush()
