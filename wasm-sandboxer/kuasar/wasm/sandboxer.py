"""WasmSandboxer: a pod is a namespace-holding process; containers are processes running a module."""

from __future__ import annotations

from typing import Any

from kuasar.common.config import DaemonConfig
from kuasar.common.errors import InvalidArgument
from kuasar.common.pod_sandboxer import PodSandboxer
from kuasar.common.task_server import TaskServerLaunch, TaskServerSettings

from .cache import DEFAULT_MAX_BYTES
from .image_modules import containerd_address
from .tasks import RUNTIMES

TASK_SERVER_MODULE = "kuasar.wasm.task_server_main"
TASK_SERVER_PROGRAM = "wasm-task-server"


WASM_KEYS = {"runtime": str, "cache": bool, "cache_max_mb": int, "wasmedge": str, "linux_containers": bool,
             "runc": str, "containerd_address": str}
# A pod's /dev/shm for its Linux containers (pod_tasks.py), as runc-sandboxer's: containerd's default size.
POD_SHM_SIZE = 64 << 20


def task_server_options(section: dict, events_address: str = "") -> dict[str, Any]:
    """`[wasm]` config keys, checked, as the task server's WasmSettings (it reads no config file).
    containerd's gRPC socket, where images' wasm layers are read, defaults to the one beside the ttrpc
    socket events go to."""
    runtime = str(section.get("runtime", "wasmtime")).lower()
    if runtime not in RUNTIMES:
        raise InvalidArgument(f"[wasm] runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    cache = section.get("cache", True)
    max_mb = section.get("cache_max_mb", DEFAULT_MAX_BYTES >> 20)
    if not isinstance(cache, bool):
        raise InvalidArgument("[wasm] cache must be true or false")
    if isinstance(max_mb, bool) or not isinstance(max_mb, int) or max_mb < 0:
        raise InvalidArgument("[wasm] cache_max_mb must be a non-negative integer")
    linux_containers = section.get("linux_containers", True)
    if not isinstance(linux_containers, bool):
        raise InvalidArgument("[wasm] linux_containers must be true or false")
    return {"runtime": runtime, "wasmedge": str(section.get("wasmedge", "wasmedge")), "cache": cache,
            "cache_max_bytes": max_mb << 20, "linux_containers": linux_containers,
            "runc": str(section.get("runc", "runc")),
            "containerd_address": str(section.get("containerd_address") or containerd_address(events_address))}


class WasmSandboxer(PodSandboxer):
    name = "wasm"

    def __init__(self, config: DaemonConfig) -> None:
        config.check_tables("wasm")
        options = task_server_options(config.section("wasm", WASM_KEYS), config.events_address or "")
        settings = TaskServerSettings(str(config.dir), config.events_address, config.log_level, options)
        # Linux containers see the pod's /etc files and /dev/shm, as in runc-sandboxer's pods; WebAssembly
        # modules do not use them.
        linux = options["linux_containers"]
        super().__init__(config, TaskServerLaunch(TASK_SERVER_MODULE, TASK_SERVER_PROGRAM, settings),
                         POD_SHM_SIZE if linux else 0, pod_files=linux)
