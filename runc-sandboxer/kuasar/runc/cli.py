"""`runc-sandboxer`: the resident daemon's CLI (the daemon proper is kuasar.common.daemon_main; its
task server is `runc-task-server`, task_server_main.py)."""

from __future__ import annotations

from kuasar.common.cli import sandboxer_command

main = sandboxer_command("runc", "/run/kuasar/runc-sandboxer.sock", "/run/kuasar-runc",
                         "kuasar.runc.sandboxer:RuncSandboxer")


if __name__ == "__main__":
    main()
