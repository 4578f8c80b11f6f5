"""`quark-sandboxer`: the resident daemon, backend `quark` or `runsc` (whose task server is
`quark-task-server`, task_server_main.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kuasar.common.cli import sandboxer_command
from kuasar.common.config import DaemonConfig

from .config import QuarkConfig

if TYPE_CHECKING:
    from kuasar.common.sandboxer import Sandboxer


def make_sandboxer(config: DaemonConfig) -> Sandboxer:
    quark = QuarkConfig.from_daemon(config)
    if quark.backend == "runsc":
        from .gvisor_sandboxer import GvisorSandboxer

        return GvisorSandboxer(config, quark)
    from .quark_sandboxer import QuarkSandboxer

    return QuarkSandboxer(config, quark)


main = sandboxer_command("quark", "/run/kuasar/quark-sandboxer.sock", "/run/kuasar-quark", make_sandboxer)


if __name__ == "__main__":
    main()
