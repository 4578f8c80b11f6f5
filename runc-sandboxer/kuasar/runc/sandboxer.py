"""RuncSandboxer: a pod is a namespace-holding process; containers are runc containers joining it."""

from __future__ import annotations

import shutil

from kuasar.common.config import DaemonConfig
from kuasar.common.errors import InvalidArgument
from kuasar.common.pod_sandboxer import PodSandboxer
from kuasar.common.task_server import TaskServerLaunch, TaskServerSettings

TASK_SERVER_MODULE = "kuasar.runc.task_server_main"
TASK_SERVER_PROGRAM = "runc-task-server"
# A pod's /dev/shm, shared by its containers as through a pause container's: containerd's default size.
POD_SHM_SIZE = 64 << 20


RUNC_KEYS = {"binary": str}


class RuncSandboxer(PodSandboxer):
    name = "runc"

    def __init__(self, config: DaemonConfig) -> None:
        config.check_tables("runc")
        binary = config.section("runc", RUNC_KEYS).get("binary", "runc")
        if shutil.which(binary) is None:  # else every container would fail, under a healthy-looking unit
            raise InvalidArgument(f"[runc] binary {binary!r}: no such program (not on PATH, or not executable)")
        settings = TaskServerSettings(str(config.dir), config.events_address, config.log_level, {"runc": binary})
        # runc containers join the pod's user namespace through the spec containerd writes for them.
        super().__init__(config, TaskServerLaunch(TASK_SERVER_MODULE, TASK_SERVER_PROGRAM, settings), POD_SHM_SIZE,
                         pod_files=True, user_namespaces=True)
