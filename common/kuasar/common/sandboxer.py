"""The seam between the shared Sandbox API server and each sandbox type.

A sandbox type implements `Sandboxer`; the controller (`controller.py`) owns records, locking, state
transitions and persistence, so a sandbox type only says how to make, stop and observe its pods.
"""

from __future__ import annotations

import abc
import base64
import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2

# containerd's exit status for a process whose status was lost with its supervisor (a dead shim).
LOST_EXIT_STATUS = 255


class SandboxState:
    CREATED = "created"
    READY = "ready"
    STOPPED = "stopped"


@dataclass
class ExitInfo:
    exit_status: int
    exited_at_ns: int = field(default_factory=time.time_ns)


@dataclass
class SandboxRecord:
    """Everything known about one sandbox; persisted as JSON after every change."""

    id: str
    sandboxer: str = ""
    netns_path: str = ""
    created_at_ns: int = field(default_factory=time.time_ns)
    # runtime.v1.PodSandboxConfig exactly as CRI sent it (protobuf bytes, base64 in JSON).
    pod_config_b64: str = ""
    # CRI's sandbox metadata (the JSON in sandbox.extensions["metadata"]), kept for diagnostics.
    cri_metadata: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    state: str = SandboxState.CREATED
    pid: int = 0
    address: str = ""
    version: int = 0
    exit_status: int = 0
    exited_at_ns: int = 0
    # Sandbox-type specific facts (cgroup paths, task server generation, ...).
    extra: dict[str, Any] = field(default_factory=dict)

    def found_gone(self) -> None:
        """A ready sandbox whose process a restarted sandboxer no longer finds: exited, status lost,
        at the time it was found gone (CRI would otherwise show an exit in 1970)."""
        self.state, self.exit_status, self.exited_at_ns = SandboxState.STOPPED, LOST_EXIT_STATUS, time.time_ns()

    @property
    def pod_config_bytes(self) -> bytes:
        return base64.b64decode(self.pod_config_b64) if self.pod_config_b64 else b""

    def to_json(self) -> dict[str, Any]:
        # Shallow: every field already is JSON (str, int, dicts of them), and the dict is serialized
        # at once. asdict()'s deep copy cost ~50 µs per save, and a pod start saves twice.
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SandboxRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class StartResult:
    pid: int
    address: str
    version: int = 3
    labels: dict[str, str] = field(default_factory=dict)


class Sandboxer(abc.ABC):
    """One sandbox technology. Methods may raise `kuasar.common.errors.KuasarError` subclasses."""

    name: str = "sandboxer"

    def persist(self, record: SandboxRecord) -> None:  # noqa: B027 - the controller puts its own here
        """Write `record` to disk now: for a change the type makes outside a call of the controller's
        (which saves a record after each of its own), e.g. a helper process started again."""

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Synchronous start-up work that must happen before the event loop and its threads exist
        (e.g. forking a helper process from this still single-threaded one)."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire long-lived resources (task server, runtime checks) before serving."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what `open` acquired; running pods are left running."""

    @abc.abstractmethod
    async def create(self, record: SandboxRecord) -> None:
        """Prepare the sandbox (directories, config). A type may begin starting it here (runc and wasm
        launch the pod process), provided Start reports the outcome and Stop/Shutdown remove it."""

    @abc.abstractmethod
    async def start(self, record: SandboxRecord) -> StartResult:
        """Start the process that holds the pod's namespaces; return its pid and the task address."""

    @abc.abstractmethod
    async def wait(self, record: SandboxRecord) -> ExitInfo:
        """Block until the sandbox's process exits, for whatever reason."""

    @abc.abstractmethod
    async def stop(self, record: SandboxRecord, timeout: float) -> None:
        """Stop the pod's containers and its process; `timeout` > 0 allows a graceful phase."""

    @abc.abstractmethod
    async def shutdown(self, record: SandboxRecord) -> None:
        """Remove everything the sandbox made (it is already stopped)."""

    @abc.abstractmethod
    async def metrics(self, record: SandboxRecord) -> any_pb2.Any:
        """Resource usage of the whole pod, as an Any (cgroup v1 or v2 Metrics)."""

    async def recover(self, records: list[SandboxRecord]) -> None:  # noqa: B027 - optional hook
        """Re-attach to sandboxes that were running before a restart (mark dead ones exited)."""

    async def remove_unrecorded(self, recorded: set[str]) -> None:  # noqa: B027 - optional hook
        """At start-up, after recover: remove what this type holds for sandbox ids outside `recorded`
        (every id with state on disk, readable or not), left by a crash before a first save."""

    async def update(self, record: SandboxRecord, fields: list[str]) -> None:  # noqa: B027
        """React to Controller.Update; the controller already stored labels/extensions."""

    def status_info(self, record: SandboxRecord, verbose: bool) -> dict[str, str]:
        return {}
