"""A runc task server whose sweep of a dead one's leftovers is slow (test_task_server_start).

Run as a task server's module (TaskServerLaunch), forked or exec'd: the sweep of recorded pods
(pod_leftovers.sweep) writes the process's pid to `<dir>/SWEEPING_PID` and then takes SWEEP_S seconds,
awaited (the event loop turns meanwhile) or, with SWEEP_HOW=block, in time.sleep (a synchronous step,
as cgroups.empty_and_remove is: the loop stands still). HEARTBEAT_S is the task server's
HEARTBEAT_INTERVAL. All three come from the environment, which both ways of starting it pass on.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

SWEEP_S = "KUASAR_TEST_SWEEP_S"
SWEEP_HOW = "KUASAR_TEST_SWEEP_HOW"
HEARTBEAT_S = "KUASAR_TEST_HEARTBEAT_S"
SWEEPING_PID = "sweeping.pid"


def main() -> None:
    from kuasar.common import pod_leftovers, task_server
    from kuasar.runc import task_server_main

    seconds = float(os.environ[SWEEP_S])
    blocking = os.environ.get(SWEEP_HOW) == "block"
    task_server.HEARTBEAT_INTERVAL = float(os.environ[HEARTBEAT_S])

    async def slow_sweep(directory: Path) -> int:
        (directory / SWEEPING_PID).write_text(str(os.getpid()))
        if blocking:
            time.sleep(seconds)  # noqa: ASYNC251 - on purpose: a sweep step that blocks the loop
        else:
            await asyncio.sleep(seconds)
        return 0

    pod_leftovers.sweep = slow_sweep  # type: ignore[assignment]
    task_server_main.main()


if __name__ == "__main__":
    main()
