"""`containerd-shim-kuasar-<type>-v2`: a forwarding shim v2 so containerd 1.6/1.7 can run pods on our sandboxers.

containerd before 2.0 has no `sandbox` proxy plugins, so it cannot call a sandboxer's Controller itself.
It runs a shim v2 binary per container instead (reference: containerd-sandbox-protocol.md section 13):

    containerd-shim-kuasar-runc-v2 -namespace <ns> -address <sock> -publish-binary <containerd> \
        -id <container id> [-debug] start          (cwd = the bundle, stdin = runtime options)

and dials the ttrpc address the binary prints (`containerd.task.v2.Task`, which every task server of
ours serves next to v3). This binary starts nothing long-lived. `start`:

1. names the container's sandbox: the bundle's `io.kubernetes.cri.sandbox-id` annotation (CRI on 1.6:
   the pause container is the first container of a pod, and carries its own id there), otherwise the
   container id itself: a plain `ctr run` container becomes its own one-container sandbox;
2. makes sure that sandbox exists and is ready on the sandboxer (Controller.Status, else Create + Start
   over the sandboxer's gRPC socket);
3. prints the task address from Start (`unix:///...`, the plain form 1.6 reads) and writes it to
   `<bundle>/address`, which 1.6 reads back to re-attach after its own restart.

`delete` (after every task's connection closes, and for cleanup) has the task server forget the
container (killing it first if need be), and when the container was the one that named the sandbox
(`ctr run`'s container, CRI's pause container) it stops and shuts down that sandbox too. It prints a
`containerd.task.v2.DeleteResponse` and exits 0.

Where the sandboxer listens: $KUASAR_SANDBOXER_ADDRESS, else `[<type>] sandboxer_address` in the shim
config ($KUASAR_SHIM_CONFIG, /etc/kuasar/shim.toml, or <prefix>/etc/kuasar/shim.toml next to this
binary's bin/), else `/run/kuasar/<type>-sandboxer.sock`. containerd 1.6 reads `start`'s stdout and
stderr together as the address, so `start` logs only to the file named by $KUASAR_SHIM_LOG (if set);
`delete` logs to stderr, which containerd copies into its own log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2

from . import __version__, runtime_info, tools
from .api.containerd.runtime.task.v2 import shim_pb2 as task
from .api.containerd.services.sandbox.v1 import sandbox_pb2 as sb
from .api.containerd.services.sandbox.v1 import sandbox_pb2_grpc as sb_grpc
from .api.runtime.v1 import api_pb2 as cri
from .errors import KuasarError
from .ids import validate_id
from .shim_helper import _go_style, check_bundle, delete_or_clean_up, program_type
from .shim_orphans import BUNDLE_LABEL, SHIM_LABEL
from .state import write_atomic

log = logging.getLogger("kuasar.shim.v2")

SANDBOX_TYPES = ("runc", "wasm", "vmm", "quark", "gvisor")
ADDRESS_ENV = "KUASAR_SANDBOXER_ADDRESS"
CONFIG_ENV = "KUASAR_SHIM_CONFIG"
TYPE_ENV = "KUASAR_SANDBOX_TYPE"
SYSTEM_CONFIG = Path("/etc/kuasar/shim.toml")
SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"
CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"
# CRI's other sandbox annotations (containerd 1.6 puts them on every container of a pod).
CRI_ANNOTATIONS = {"name": "io.kubernetes.cri.sandbox-name", "namespace": "io.kubernetes.cri.sandbox-namespace",
                   "uid": "io.kubernetes.cri.sandbox-uid", "log_directory": "io.kubernetes.cri.sandbox-log-directory"}
SHIM_STATE = "kuasar-shim.json"
ADDRESS_FILE = "address"
# The whole start must fit containerd's shim start (no timeout of its own, but CRI's callers have one);
# a sandboxer answers in milliseconds, a VM sandbox may take seconds to boot.
RPC_TIMEOUT = 60.0
# containerd 1.6 kills `delete` after 5 s (io.containerd.timeout.shim.cleanup), then keeps the bundle and
# never asks again; ~0.5 s of that goes to a frozen binary's start-up. The whole action fits in this:
DELETE_DEADLINE = 4.0
# ... of which the owner's sandbox removal (Stop, then Shutdown) keeps this much for itself.
SANDBOX_REMOVAL_RESERVE = 1.5
POD_CONFIG_TYPE_URL = "type.googleapis.com/runtime.v1.PodSandboxConfig"


class ShimError(Exception):
    pass


# -- configuration ---------------------------------------------------------------------------------
def sandbox_type(program: str, env: Mapping[str, str]) -> str:
    own_type = program_type(os.path.basename(program), "v2")
    if own_type:
        return own_type
    if env.get(TYPE_ENV):
        return env[TYPE_ENV]
    raise ShimError(f"cannot tell the sandbox type from the program name {program!r} "
                    f"(want containerd-shim-kuasar-<type>-v2, or set {TYPE_ENV})")


def config_candidates(env: Mapping[str, str], executable: str) -> list[Path]:
    if env.get(CONFIG_ENV):
        return [Path(env[CONFIG_ENV])]
    candidates = [SYSTEM_CONFIG]
    prefix = tools.install_prefix(executable)
    if prefix is not None:
        candidates.append(prefix / "etc" / "kuasar" / "shim.toml")
    return candidates


def default_address(kind: str) -> str:
    return f"/run/kuasar/{kind}-sandboxer.sock"


def sandboxer_address(kind: str, env: Mapping[str, str], executable: str) -> str:
    """The sandboxer's gRPC socket path for this sandbox type (see the module docstring for the order)."""
    if env.get(ADDRESS_ENV):
        return env[ADDRESS_ENV].removeprefix("unix://")
    for path in config_candidates(env, executable):
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ShimError(f"shim config {path}: {exc}") from None
        except UnicodeDecodeError as exc:  # a ValueError, but not TOML's
            raise ShimError(f"shim config {path} is not UTF-8: {exc.reason} at byte {exc.start}") from None
        section = data.get(kind, {})
        address = section.get("sandboxer_address") if isinstance(section, dict) else None
        if address is not None and not isinstance(address, str):
            raise ShimError(f"shim config {path}: [{kind}] sandboxer_address must be a string (a socket path)")
        if address:
            return address.removeprefix("unix://")
        break  # the first config file found is the one that counts
    return default_address(kind)


# -- the bundle ------------------------------------------------------------------------------------
@dataclass
class BundleInfo:
    container_id: str
    sandbox_id: str
    annotations: dict[str, str]
    hostname: str
    netns_path: str
    cgroup_parent: str = ""
    host_pid: bool = False  # the spec has no PID namespace of its own (hostPID)
    bundle: str = ""


def _pod_cgroup_parent(spec: dict, container_id: str) -> str:
    """CRI's cgroup_parent, read back from its pause container's cgroupsPath: containerd 1.6 writes
    `<parent>/<id>`, or `<slice>:cri-containerd:<id>` for a systemd slice."""
    if (spec.get("annotations") or {}).get(CONTAINER_TYPE_ANNOTATION) != "sandbox":
        return ""  # not a CRI pod (`ctr run`): no parent to honour
    path = str((spec.get("linux") or {}).get("cgroupsPath") or "")
    slice_name, sep, rest = path.partition(":")
    if sep:
        return slice_name if rest.endswith(f":{container_id}") else ""
    parent, _, leaf = path.rstrip("/").rpartition("/")
    return parent if leaf == container_id and parent else ""


def read_bundle(bundle: Path, container_id: str) -> BundleInfo:
    try:
        spec = json.loads((bundle / "config.json").read_bytes())
    except (OSError, ValueError) as exc:
        raise ShimError(f"{bundle}/config.json: {exc}") from None
    annotations = {str(k): str(v) for k, v in (spec.get("annotations") or {}).items()}
    sandbox_id = annotations.get(SANDBOX_ID_ANNOTATION) or container_id
    netns = ""
    namespaces = (spec.get("linux") or {}).get("namespaces") or []
    for ns in namespaces:
        if ns.get("type") == "network" and ns.get("path"):
            netns = str(ns["path"])
    return BundleInfo(container_id, validate_id(sandbox_id, "sandbox id"), annotations,
                      str(spec.get("hostname") or ""), netns, _pod_cgroup_parent(spec, container_id),
                      host_pid=not any(ns.get("type") == "pid" for ns in namespaces), bundle=str(bundle))


def pod_config(info: BundleInfo, namespace: str) -> cri.PodSandboxConfig:
    """The PodSandboxConfig a sandboxer expects, from what a 1.6 bundle tells (CRI's annotations if any)."""
    ann = info.annotations
    host_network = not info.netns_path
    # A pause spec has a PID namespace of its own whether or not the pod shares one, so the pod process
    # always holds one: a container that joins it (shareProcessNamespace) never lands in the host's.
    namespaces = cri.NamespaceOption(network=cri.NODE if host_network else cri.POD,
                                     pid=cri.NODE if info.host_pid else cri.POD, ipc=cri.POD)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=ann.get(CRI_ANNOTATIONS["name"], info.sandbox_id),
                                        namespace=ann.get(CRI_ANNOTATIONS["namespace"], namespace),
                                        uid=ann.get(CRI_ANNOTATIONS["uid"], "")),
        hostname="" if host_network else info.hostname,
        log_directory=ann.get(CRI_ANNOTATIONS["log_directory"], ""),
        annotations={k: v for k, v in ann.items() if not k.startswith("io.kubernetes.cri.")},
        linux=cri.LinuxPodSandboxConfig(
            cgroup_parent=info.cgroup_parent,
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=namespaces)))


def task_address(address: str) -> str:
    """`ttrpc+unix:///x` -> `unix:///x`, the only form containerd 1.6 dials."""
    proto, sep, rest = address.partition("+")
    if sep and proto != "ttrpc":
        raise ShimError(f"the sandboxer's task address {address!r} is {proto}, containerd 1.6 speaks ttrpc only")
    rest = rest if sep else address
    if not rest.startswith("unix://"):
        raise ShimError(f"the sandboxer's task address {address!r} is not a unix socket; containerd 1.6 can "
                        "only dial unix sockets (use containerd >= 2.1 and its Sandbox API for this type)")
    return rest


# -- talking to the sandboxer ----------------------------------------------------------------------
class Sandboxer:
    """A synchronous Controller client on the sandboxer's unix socket."""

    def __init__(self, socket_path: str, kind: str, timeout: float = RPC_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.kind = kind
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.stub = sb_grpc.ControllerStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Sandboxer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.UNAVAILABLE:
                raise ShimError(f"the {self.kind} sandboxer does not answer on {self.socket_path} "
                                f"(is it running? set {ADDRESS_ENV} or the shim config)") from None
            raise

    def status(self, sandbox_id: str) -> sb.ControllerStatusResponse | None:
        try:
            return self.call("Status", sb.ControllerStatusRequest(sandbox_id=sandbox_id, sandboxer=self.kind))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                return None
            raise

    def ensure(self, info: BundleInfo, namespace: str) -> tuple[str, bool]:
        """(task address, whether this call created the sandbox) for a ready sandbox `info.sandbox_id`."""
        sandbox_id = info.sandbox_id
        status = self.status(sandbox_id)
        if status is not None and status.state == "SANDBOX_READY" and status.address:
            return status.address, False
        if info.container_id != sandbox_id:
            # Only the container that names the sandbox (CRI's pause container, `ctr run`'s) makes it:
            # a missing one was removed with that container's delete (1.6's pod teardown may still be
            # starting a container meanwhile), and one made here would have no owner to remove it.
            state = status.state if status is not None else "gone"
            raise ShimError(f"sandbox {sandbox_id} is {state}; containers cannot join it")
        if status is not None:
            # A stopped sandbox of the same id (a container re-run under its old id): replace it.
            log.info("sandbox %s exists but is %s; replacing it", sandbox_id, status.state)
            self.remove(sandbox_id)
        options = any_pb2.Any(type_url=POD_CONFIG_TYPE_URL,
                              value=pod_config(info, namespace).SerializeToString())
        request = sb.ControllerCreateRequest(sandbox_id=sandbox_id, options=options, netns_path=info.netns_path,
                                             annotations=info.annotations, sandboxer=self.kind)
        request.sandbox.sandbox_id = sandbox_id
        request.sandbox.labels[SHIM_LABEL] = "v2"
        # Whose bundle, once containerd removed it, tells the sandboxer the sandbox is an orphan
        # (shim_orphans.py), in case the owner's `delete` could not remove it.
        request.sandbox.labels[BUNDLE_LABEL] = info.bundle
        created = True
        try:
            self.call("Create", request)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:  # type: ignore[attr-defined]
                raise
            created = False  # a concurrent start made it first; Start below is idempotent for READY
        try:
            started = self.call("Start", sb.ControllerStartRequest(sandbox_id=sandbox_id, sandboxer=self.kind))
        except BaseException:
            if created:
                self.discard(sandbox_id)
            raise
        return started.address, created

    def discard(self, sandbox_id: str) -> None:
        """Remove a sandbox this start made, on its way out with an error: containerd 1.6 only deletes
        the bundle of a shim whose start failed, so nothing else would ever remove it."""
        try:
            self.remove(sandbox_id)
        except Exception as exc:  # noqa: BLE001 - the error being raised is the one to report
            log.error("sandbox %s: removing it after a failed start: %s", sandbox_id, exc)

    def remove(self, sandbox_id: str, deadline: float | None = None) -> None:
        """Stop and Shut down the sandbox; with a `deadline` (time.monotonic()) both calls end by then."""

        def timeout() -> float | None:
            if deadline is None:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise ShimError("no time left before containerd's cleanup deadline")
            return left

        self.call("Stop", sb.ControllerStopRequest(sandbox_id=sandbox_id, timeout_secs=0, sandboxer=self.kind),
                  timeout())
        self.call("Shutdown", sb.ControllerShutdownRequest(sandbox_id=sandbox_id, sandboxer=self.kind), timeout())


# -- actions ---------------------------------------------------------------------------------------
def start(opts: argparse.Namespace, kind: str, socket_path: str) -> str:
    container_id = validate_id(opts.id, "-id")
    bundle = Path(os.getcwd())
    info = read_bundle(bundle, container_id)
    with Sandboxer(socket_path, kind) as sandboxer:
        address, created = sandboxer.ensure(info, opts.namespace)
        try:
            plain = task_address(address)  # a VM's (hvsock) is not one containerd 1.6 can dial
            state = {"sandbox_id": info.sandbox_id, "sandboxer": socket_path, "type": kind,
                     "owner": info.sandbox_id == container_id, "created": created, "address": plain}
            write_atomic(bundle / SHIM_STATE, (json.dumps(state) + "\n").encode(), mode=0o644, durable=False)
            write_atomic(bundle / ADDRESS_FILE, plain.encode(), mode=0o644, durable=False)
        except BaseException:
            if created:
                sandboxer.discard(info.sandbox_id)
            raise
    log.info("container %s -> sandbox %s at %s", container_id, info.sandbox_id, plain)
    return plain


def delete(opts: argparse.Namespace, kind: str, socket_path: str) -> task.DeleteResponse:
    deadline = time.monotonic() + DELETE_DEADLINE
    container_id = validate_id(opts.id, "-id")
    try:
        bundle = check_bundle(container_id, opts.bundle)
    except ValueError as exc:
        raise ShimError(str(exc)) from None
    state: dict[str, Any] = {}
    try:
        state = json.loads((bundle / SHIM_STATE).read_text())
    except (OSError, ValueError):
        pass
    address = str(state.get("address") or "")
    if not address:
        try:
            address = (bundle / ADDRESS_FILE).read_text().strip()
        except OSError:
            pass
    sandbox_id = str(state.get("sandbox_id") or "")
    owner = bool(state.get("owner")) and sandbox_id == container_id
    budget = DELETE_DEADLINE - (SANDBOX_REMOVAL_RESERVE if owner else 0.0)
    response = asyncio.run(delete_or_clean_up(address if address.startswith("unix://") else None, container_id,
                                              bundle, opts.namespace, budget))
    if owner:
        try:
            with Sandboxer(str(state.get("sandboxer") or socket_path), kind) as sandboxer:
                sandboxer.remove(sandbox_id, deadline)
            log.info("sandbox %s of container %s removed", sandbox_id, container_id)
        except (ShimError, grpc.RpcError) as exc:
            message = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)  # type: ignore[attr-defined]
            log.warning("removing sandbox %s: %s; the sandboxer removes it once containerd has removed %s",
                        sandbox_id, message, bundle)
    return response


# -- command line ----------------------------------------------------------------------------------
VALUE_FLAGS = frozenset({"namespace", "address", "publish-binary", "id", "bundle", "socket"})


def parse_args(argv: Sequence[str], prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False,
                                     description="forwarding shim v2 for a kuasar sandboxer (containerd 1.6/1.7)")

    def flag(name: str, **kwargs: Any) -> None:
        parser.add_argument(f"-{name}", f"--{name}", **kwargs)

    flag("namespace", default=os.environ.get("NAMESPACE", "default"))
    flag("address", default="", help="containerd's gRPC socket (unused)")
    flag("publish-binary", dest="publish_binary", default="", help="containerd binary (unused)")
    flag("id", default="")
    flag("bundle", default="", help="the task bundle (default: the working directory)")
    flag("socket", default="", help="ignored (containerd compatibility)")
    flag("debug", action="store_true")
    parser.add_argument("-v", "--version", dest="show_version", action="store_true",
                        help="print the version and exit")
    flag("info", action="store_true",
         help="read the runtime options from stdin, print the runtime's info (protobuf) and exit")
    parser.add_argument("action", nargs="?", default="", choices=["", "start", "delete"])
    return parser.parse_args(_go_style(argv, VALUE_FLAGS))


def setup_logging(debug: bool, action: str) -> None:
    # containerd 1.6 reads start's stdout AND stderr together as the address: `start` logs only to a file.
    # `delete`'s stderr ends up in containerd's log as "cleanup warnings".
    level = logging.DEBUG if debug else logging.WARNING
    fmt = "%(asctime)s %(name)s: %(levelname)s: %(message)s"
    if action == "start":
        log_file = os.environ.get("KUASAR_SHIM_LOG", "")
        if log_file:
            logging.basicConfig(level=level, filename=log_file, format=fmt)
        else:
            logging.basicConfig(level=logging.CRITICAL + 1, handlers=[logging.NullHandler()])
    else:
        logging.basicConfig(level=level, stream=sys.stderr, format=fmt)


def main(argv: Sequence[str] | None = None) -> int:
    prog = os.path.basename(sys.argv[0]) or "containerd-shim-kuasar-v2"
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv, prog)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if opts.show_version:
        print(f"{prog}:\n  Version: {__version__}\n  Revision: kuasar-py (forwarding shim v2)")
        return 0
    if opts.info:
        try:
            kind = sandbox_type(sys.argv[0], os.environ)
        except ShimError as exc:
            print(f"{prog}: -info: {exc}", file=sys.stderr)
            return 2
        return runtime_info.print_info(prog, kind, shim="v2")
    setup_logging(opts.debug, opts.action)
    if opts.action not in ("start", "delete"):
        print(f"{prog}: an action is required: start or delete", file=sys.stderr)
        return 2
    try:
        kind = sandbox_type(sys.argv[0], os.environ)
        socket_path = sandboxer_address(kind, os.environ, sys.executable if getattr(sys, "frozen", False)
                                        else sys.argv[0])
        if opts.action == "start":
            sys.stdin.close()  # the runtime options (an Any); our sandboxers take theirs from their config
            print(start(opts, kind, socket_path))
            return 0
        response = delete(opts, kind, socket_path)
    except (ShimError, KuasarError, grpc.RpcError) as exc:
        if isinstance(exc, grpc.RpcError):
            message = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
        else:
            message = exc.message if isinstance(exc, KuasarError) else str(exc)
        print(f"{prog} {opts.action}: {message}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
