"""The runsc backend, sandboxer side: pods are gVisor sandboxes kept by the task server.

Like runc-sandboxer, the Task API and the pods live in a separate resident task server (it holds
containerd's connections and the `runsc wait` / `runsc exec` watchers), so a restart of the sandboxer
re-attaches to running pods; the sandboxer only keeps the Sandbox API and the sandbox records.
"""

from __future__ import annotations

from kuasar.common.config import DaemonConfig
from kuasar.common.errors import FailedPrecondition, NotFound
from kuasar.common.pod_sandboxer import PodSandboxer
from kuasar.common.sandboxer import SandboxRecord
from kuasar.common.spawn import resolve
from kuasar.common.task_server import self_command

from .config import QuarkConfig

CLI_MODULE = "kuasar.quark.cli"


def require_binary(program: str, what: str, hint: str) -> str:
    try:
        return resolve(program)
    except NotFound:
        raise FailedPrecondition(f"{what} binary {program!r} not found or not executable; {hint}") from None


class GvisorSandboxer(PodSandboxer):
    name = "quark(runsc)"

    def __init__(self, config: DaemonConfig, quark: QuarkConfig, config_path: str | None) -> None:
        self.quark = quark
        command = [*self_command(CLI_MODULE), "--dir", str(config.dir), "--log-level", config.log_level]
        if config_path:
            command += ["--config", config_path]
        if config.events_address:
            command += ["--events-address", config.events_address]
        command += ["task-server"]
        super().__init__(config, command)

    async def open(self) -> None:
        require_binary(self.quark.runsc, "gVisor runsc",
                       "install gVisor (`make setup` puts Debian's runsc in .prefix/bin) or set [quark] runsc")
        await super().open()

    def status_info(self, record: SandboxRecord, verbose: bool) -> dict[str, str]:
        info = super().status_info(record, verbose)
        if verbose:
            info["backend"] = "runsc"
            info["platform"] = self.quark.platform
        return info
