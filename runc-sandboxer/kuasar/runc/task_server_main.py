"""`runc-task-server`: the task server runc-sandboxer starts for itself (internal, not for users).

Apart from runc-sandboxer's click CLI on purpose: the task server is resident, and whatever it imports
stays in its memory, so it loads neither click nor the config loader nor the Sandbox API.
"""

from __future__ import annotations

from kuasar.common.lean import keep_out_unused_modules


def main() -> None:
    keep_out_unused_modules()
    from kuasar.common.host_runc_tasks import RuncTasks
    from kuasar.common.task_server import task_server_main

    task_server_main(lambda options, reaper, events, directory: RuncTasks(
        reaper, events, directory, str(options.get("runc", "runc"))))


if __name__ == "__main__":
    main()
