"""RuncSandboxer: a pod is a namespace-holding process; containers are runc containers joining it."""

from __future__ import annotations

from kuasar.common.config import DaemonConfig
from kuasar.common.pod_sandboxer import PodSandboxer
from kuasar.common.task_server import TaskServerLaunch, TaskServerSettings

TASK_SERVER_MODULE = "kuasar.runc.task_server_main"
TASK_SERVER_PROGRAM = "runc-task-server"
# A pod's /dev/shm, shared by its containers as through a pause container's: containerd's default size.
POD_SHM_SIZE = 64 << 20


class RuncSandboxer(PodSandboxer):
    name = "runc"

    def __init__(self, config: DaemonConfig) -> None:
        section = config.section("runc")
        settings = TaskServerSettings(str(config.dir), config.events_address, config.log_level,
                                      {"runc": str(section.get("binary", "runc"))})
        # runc containers join the pod's user namespace through the spec containerd writes for them.
        super().__init__(config, TaskServerLaunch(TASK_SERVER_MODULE, TASK_SERVER_PROGRAM, settings), POD_SHM_SIZE,
                         pod_files=True, user_namespaces=True)
