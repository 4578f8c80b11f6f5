"""WasmSandboxer: a pod is a namespace-holding process; containers are processes running a module."""

from __future__ import annotations

from kuasar.common.config import DaemonConfig
from kuasar.common.errors import InvalidArgument
from kuasar.common.pod_sandboxer import PodSandboxer
from kuasar.common.task_server import self_command

from .cache import DEFAULT_MAX_BYTES
from .tasks import RUNTIMES

CLI_MODULE = "kuasar.wasm.cli"


def task_server_options(section: dict) -> list[str]:
    """`[wasm]` config keys as task-server flags (the task server reads no config file)."""
    runtime = str(section.get("runtime", "wasmtime")).lower()
    if runtime not in RUNTIMES:
        raise InvalidArgument(f"[wasm] runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    cache = section.get("cache", True)
    max_mb = section.get("cache_max_mb", DEFAULT_MAX_BYTES >> 20)
    if not isinstance(cache, bool):
        raise InvalidArgument("[wasm] cache must be true or false")
    if isinstance(max_mb, bool) or not isinstance(max_mb, int) or max_mb < 0:
        raise InvalidArgument("[wasm] cache_max_mb must be a non-negative integer")
    return ["--runtime", runtime, "--wasmedge", str(section.get("wasmedge", "wasmedge")),
            "--cache" if cache else "--no-cache", "--cache-max-mb", str(max_mb)]


class WasmSandboxer(PodSandboxer):
    name = "wasm"

    def __init__(self, config: DaemonConfig) -> None:
        command = [*self_command(CLI_MODULE), "--dir", str(config.dir), "--log-level", config.log_level]
        if config.events_address:
            command += ["--events-address", config.events_address]
        command += ["task-server", *task_server_options(config.section("wasm"))]
        super().__init__(config, command)
