"""RuncSandboxer: a pod is a namespace-holding process; containers are runc containers joining it."""

from __future__ import annotations

from kuasar.common.config import DaemonConfig
from kuasar.common.pod_sandboxer import PodSandboxer
from kuasar.common.task_server import self_command

CLI_MODULE = "kuasar.runc.cli"


class RuncSandboxer(PodSandboxer):
    name = "runc"

    def __init__(self, config: DaemonConfig) -> None:
        section = config.section("runc")
        command = [*self_command(CLI_MODULE), "--dir", str(config.dir), "--log-level", config.log_level]
        if config.events_address:
            command += ["--events-address", config.events_address]
        command += ["task-server", "--runc", str(section.get("binary", "runc"))]
        super().__init__(config, command)
