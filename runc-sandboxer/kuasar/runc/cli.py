"""`runc-sandboxer`: the resident daemon (its task server is `runc-task-server`, task_server_main.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kuasar.common.cli import sandboxer_command
from kuasar.common.config import DaemonConfig

if TYPE_CHECKING:
    from kuasar.common.sandboxer import Sandboxer


def make_sandboxer(config: DaemonConfig) -> Sandboxer:
    from .sandboxer import RuncSandboxer

    return RuncSandboxer(config)


main = sandboxer_command("runc", "/run/kuasar/runc-sandboxer.sock", "/run/kuasar-runc", make_sandboxer)


if __name__ == "__main__":
    main()
