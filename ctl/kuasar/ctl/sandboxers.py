"""Talking to our sandboxers directly: their state directories and their Controller sockets.

Every sandboxer keeps one `sandbox.json` per sandbox under `<dir>/sandboxes/<id>/` (written atomically)
and serves `containerd.services.sandbox.v1.Controller` on its `--listen` socket. Listing reads the state
files (it works while the sandboxer is down); the live state comes from a Status call when the socket
answers. Both are root-only (mode 0700/0600), like the sandboxers themselves.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2 as sb
from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2_grpc as sb_grpc
from kuasar.common.api.runtime.v1 import api_pb2 as cri

KINDS = ("runc", "wasm", "vmm", "quark", "gvisor")
STATE_FILE = "sandbox.json"
STATUS_TIMEOUT = 5.0


@dataclass
class SandboxerRef:
    kind: str
    socket: str
    directory: str


def default_ref(kind: str) -> SandboxerRef:
    """The defaults of `<kind>-sandboxer` (gvisor is a second quark-sandboxer with its own socket and dir)."""
    return SandboxerRef(kind, f"/run/kuasar/{kind}-sandboxer.sock", f"/run/kuasar-{kind}")


@dataclass
class SandboxRow:
    id: str
    kind: str
    state: str
    pid: int = 0
    created_at_ns: int = 0
    name: str = ""
    namespace: str = ""
    address: str = ""
    live: bool = False
    record: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.kind, "state": self.state, "pid": self.pid,
                "created_at": self.created_at_ns, "name": self.name, "namespace": self.namespace,
                "address": self.address, "live": self.live}


class SandboxerClient:
    """A synchronous Controller client (short deadlines: this is a diagnostic tool)."""

    def __init__(self, socket: str, timeout: float = STATUS_TIMEOUT) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.stub = sb_grpc.ControllerStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> SandboxerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def status(self, sandbox_id: str, verbose: bool = False) -> sb.ControllerStatusResponse:
        return self.stub.Status(sb.ControllerStatusRequest(sandbox_id=sandbox_id, verbose=verbose),
                                timeout=self.timeout)


def read_records(directory: str) -> dict[str, dict[str, Any]]:
    """`{sandbox id: sandbox.json}` from a sandboxer's state dir; {} when it has none; LookupError when we may
    not read it (an empty list would say there are no sandboxes).
    A record that is not a JSON object is skipped like one that is not JSON at all."""
    root = Path(directory) / "sandboxes"
    found: dict[str, dict[str, Any]] = {}
    try:
        entries = sorted(root.iterdir())
    except PermissionError:
        raise LookupError(f"cannot read {root}: permission denied (a sandboxer's state is root's)") from None
    except OSError:
        return found
    for entry in entries:
        try:
            record = json.loads((entry / STATE_FILE).read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            found[entry.name] = record
    return found


def pod_names(record: dict[str, Any]) -> tuple[str, str]:
    """(name, namespace) of the pod, from the PodSandboxConfig the sandboxer keeps."""
    try:
        config = cri.PodSandboxConfig.FromString(base64.b64decode(record.get("pod_config_b64") or ""))
    except Exception:  # noqa: BLE001 - a diagnostic listing shows what it can
        return "", ""
    return config.metadata.name, config.metadata.namespace


def _int(value: Any) -> int:
    """A record's number, or 0 (shown as "-") when the file holds something else: one damaged or
    foreign state file must not take the whole listing down."""
    try:
        return int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0


def row_from_record(kind: str, sandbox_id: str, record: dict[str, Any]) -> SandboxRow:
    name, namespace = pod_names(record)
    return SandboxRow(id=sandbox_id, kind=kind, state=str(record.get("state", "unknown")),
                      pid=_int(record.get("pid")), created_at_ns=_int(record.get("created_at_ns")),
                      name=name, namespace=namespace, address=str(record.get("address") or ""), record=record)


def apply_status(row: SandboxRow, status: sb.ControllerStatusResponse) -> None:
    row.live = True
    row.state = {"SANDBOX_READY": "ready", "SANDBOX_NOTREADY": "notready"}.get(status.state, status.state)
    row.pid = status.pid or row.pid
    row.address = status.address or row.address
    if status.HasField("created_at") and status.created_at.ToNanoseconds():
        row.created_at_ns = status.created_at.ToNanoseconds()


def list_sandboxes(refs: list[SandboxerRef], live: bool = True) -> list[SandboxRow]:
    rows: list[SandboxRow] = []
    for ref in refs:
        records = read_records(ref.directory)
        if not records:
            continue
        client = SandboxerClient(ref.socket) if live and Path(ref.socket).exists() else None
        try:
            for sandbox_id, record in records.items():
                row = row_from_record(ref.kind, sandbox_id, record)
                if client is not None:
                    try:
                        apply_status(row, client.status(sandbox_id))
                    except grpc.RpcError as exc:
                        if exc.code() == grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                            client.channel.close()
                            client = None  # the sandboxer is down: state files only
                rows.append(row)
        finally:
            if client is not None:
                client.channel.close()
    return rows


def find(refs: list[SandboxerRef], sandbox_id: str) -> tuple[SandboxerRef, str]:
    """The sandboxer holding `sandbox_id` (or the one sandbox whose id starts with it) and the full id."""
    if not sandbox_id:  # a prefix of every id: it named the only sandbox there was
        raise LookupError("a sandbox id (or the start of one) is needed")
    matches: list[tuple[SandboxerRef, str]] = []
    for ref in refs:
        ids = read_records(ref.directory)
        if sandbox_id in ids:
            return ref, sandbox_id
        matches += [(ref, i) for i in ids if i.startswith(sandbox_id)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise LookupError(f"{sandbox_id!r} matches several sandboxes: "
                          + ", ".join(i for _, i in matches))
    # Not in any state dir we can read: ask every socket that exists.
    for ref in refs:
        try:
            if not Path(ref.socket).exists():
                continue
        except PermissionError:
            raise LookupError(f"cannot reach {ref.socket}: permission denied (a sandboxer's socket is root's)"
                              ) from None
        with SandboxerClient(ref.socket) as client:
            try:
                client.status(sandbox_id)
                return ref, sandbox_id
            except grpc.RpcError:
                continue
    raise LookupError(f"no sandboxer knows sandbox {sandbox_id!r}")
