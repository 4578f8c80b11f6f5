"""`quark-task-server`: the task server of quark-sandboxer's runsc backend (internal, not for users).

Apart from quark-sandboxer's click CLI on purpose: the task server is resident, and whatever it imports
stays in its memory, so it loads neither click nor the config loader nor the Sandbox API. It gets the
`[quark]` section the sandboxer already checked.
"""

from __future__ import annotations

from kuasar.common.lean import keep_out_unused_modules


def main() -> None:
    keep_out_unused_modules()
    from kuasar.common.task_server import task_server_main

    from .config import QuarkConfig
    from .gvisor_tasks import GvisorTasks

    task_server_main(lambda options, reaper, events, directory: GvisorTasks(
        reaper, events, directory, QuarkConfig.from_section(options)))


if __name__ == "__main__":
    main()
