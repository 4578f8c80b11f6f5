"""Which Sandboxer serves quark-sandboxer: the `[quark] backend` (Quark's QVisor, or gVisor's runsc)."""

from __future__ import annotations

from kuasar.common.config import DaemonConfig
from kuasar.common.sandboxer import Sandboxer

from .config import QuarkConfig


def make_sandboxer(config: DaemonConfig) -> Sandboxer:
    config.check_tables("quark")
    quark = QuarkConfig.from_daemon(config)
    if quark.backend == "runsc":
        from .gvisor_sandboxer import GvisorSandboxer

        return GvisorSandboxer(config, quark)
    from .quark_sandboxer import QuarkSandboxer

    return QuarkSandboxer(config, quark)
