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
from kuasar.common.task_server import TaskServerLaunch, TaskServerSettings

from .config import QuarkConfig

TASK_SERVER_MODULE = "kuasar.quark.task_server_main"
TASK_SERVER_PROGRAM = "quark-task-server"


def require_binary(program: str, what: str, hint: str) -> str:
    try:
        return resolve(program)
    except NotFound:
        raise FailedPrecondition(f"{what} binary {program!r} not found or not executable; {hint}") from None


class GvisorSandboxer(PodSandboxer):
    name = "quark(runsc)"

    def __init__(self, config: DaemonConfig, quark: QuarkConfig) -> None:
        self.quark = quark
        # The task server gets the [quark] section as checked here, not the config file's path.
        settings = TaskServerSettings(str(config.dir), config.events_address, config.log_level,
                                      config.section("quark"))
        # Containers get the pod's /etc/hostname, hosts and resolv.conf bound in (gvisor_tasks), as runc's do.
        super().__init__(config, TaskServerLaunch(TASK_SERVER_MODULE, TASK_SERVER_PROGRAM, settings),
                         pod_files=True)

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
