"""`containerd-shim-kuasar-<type>-v1`: the shim binary containerd 2.1 needs to re-attach after a restart.

A sandboxer's containers are never started through a shim: containerd dials the task address that
Controller.Start/Status returned (API version 3). But when containerd itself restarts it re-attaches
to a surviving task bundle only if a binary named after the runtime type (`io.containerd.kuasar-runc.v1`
-> `containerd-shim-kuasar-runc-v1`) is on its PATH; otherwise it deletes the bundle and the container is
lost. Once such a re-attached task is deleted (or its connection drops) containerd runs

    containerd-shim-kuasar-runc-v1 -namespace k8s.io -address <sock> -publish-binary <path> \
        -id <cid> -bundle <bundle> [-debug] delete

(cwd = the bundle) and expects a serialized `containerd.task.v2.DeleteResponse` on stdout and exit 0
(reference: containerd-sandbox-protocol.md sections 11 and 13.3). This module is that binary for every
sandbox type: `delete` asks the task server named in `<bundle>/bootstrap.json` to forget the container
(killing it first if it still runs) and, if no task server answers, unmounts what it can itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from . import __version__, mounts, runtime_info
from .api.containerd.runtime.task.v2 import shim_pb2 as task
from .api.containerd.types.task import task_pb2 as types
from .errors import KuasarError, NotFound
from .ids import validate_id
from .ttrpc import NAMESPACE_KEY, TtrpcClient

log = logging.getLogger("kuasar.shim")

TASK_SERVICE = "containerd.task.v3.Task"
BOOTSTRAP_FILE = "bootstrap.json"
# What containerd reports for a process whose supervisor vanished with its exit status.
LOST_EXIT_STATUS = 255
# containerd gives the whole `delete` 5 s (io.containerd.timeout.shim.cleanup) and then only warns;
# these keep us inside that budget even when the task server is slow or half-dead.
CONNECT_TIMEOUT = 1.0
CALL_TIMEOUT = 1.0
KILL_WAIT_TIMEOUT = 2.0
# containerd gives `delete` 5 s (io.containerd.timeout.shim.cleanup) and kills it then, with no answer
# read: the calls above could add up to 7 s, so the whole conversation is bounded, leaving time for the
# local clean-up and the answer.
TASK_SERVER_BUDGET = 4.0
DEFAULT_NAMESPACE = "k8s.io"
# unix: the runc and wasm task servers; hvsock: a VM's agent behind its VMM's hybrid-vsock socket.
DIALABLE = ("unix://", "hvsock://")

START_REFUSED = ("a kuasar sandboxer serves its containers from its own task server; containerd must "
                 "dial the task address from Controller.Start (needs containerd >= 2.1 and task API "
                 "version 3) and never starts them through a shim")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The flags containerd's shim client passes (Go `flag` style: `-name value`, `-name=value`)."""
    parser = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]) or "containerd-shim-kuasar-v1",
                                     allow_abbrev=False,
                                     description="containerd shim v2 entry point of a kuasar sandboxer")

    def flag(name: str, **kwargs: object) -> None:
        parser.add_argument(f"-{name}", f"--{name}", **kwargs)  # type: ignore[arg-type]

    flag("namespace", default=os.environ.get("NAMESPACE", DEFAULT_NAMESPACE))
    flag("address", default="", help="containerd's gRPC socket (unused)")
    flag("publish-binary", dest="publish_binary", default="", help="containerd binary (unused)")
    flag("id", default="")
    flag("bundle", default="", help="the task bundle (default: the working directory)")
    flag("socket", default="", help="ignored; kept for compatibility with containerd's shim flags")
    flag("debug", action="store_true")
    flag("v", dest="show_version", action="store_true", help="print the version and exit")
    flag("info", action="store_true",
         help="read the runtime options from stdin, print the runtime's info (protobuf) and exit")
    parser.add_argument("action", nargs="?", default="", choices=["", "start", "delete"])
    return parser.parse_args(_go_style(argv, VALUE_FLAGS))


# containerd runs `containerd-shim-<runtime>-<version>`: ours are named after their sandbox type.
PROGRAM_RE = re.compile(r"^containerd-shim-kuasar-(?P<type>[a-z0-9]+)-(?P<version>v[12])$")


def program_type(prog: str, version: str) -> str | None:
    """The sandbox type a shim program of this version (`v1`: this helper, `v2`: the forwarding shim)
    stands for, from its name (`containerd-shim-kuasar-runc-v1`)."""
    match = PROGRAM_RE.match(prog)
    return match.group("type") if match and match.group("version") == version else None


VALUE_FLAGS = frozenset({"namespace", "address", "publish-binary", "id", "bundle", "socket"})


def _go_style(argv: Sequence[str], value_flags: frozenset[str]) -> list[str]:
    """Go's `flag` takes the word after `-id` as its value even when it starts with `-`; argparse would
    not, so join such pairs as `-id=<value>` first."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg.lstrip("-") in value_flags and arg.startswith("-") and "=" not in arg:
            value = next(args, None)
            out.append(arg if value is None else f"{arg}={value}")
        else:
            out.append(arg)
    return out


def bootstrap_address(bundle: Path) -> str | None:
    """The address of the task server that served this bundle, from containerd's bootstrap.json."""
    try:
        data = json.loads((bundle / BOOTSTRAP_FILE).read_bytes())
    except FileNotFoundError:
        log.debug("%s has no %s", bundle, BOOTSTRAP_FILE)
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable %s: %s", bundle, BOOTSTRAP_FILE, exc)
        return None
    if not isinstance(data, dict) or data.get("protocol", "ttrpc") != "ttrpc":
        log.warning("%s: %s is not a ttrpc endpoint: %r", bundle, BOOTSTRAP_FILE, data)
        return None
    address = str(data.get("address", ""))
    if not address.startswith(DIALABLE) or address in DIALABLE:
        log.warning("%s: cannot dial task address %r", bundle, address)
        return None
    return address


async def dial(address: str) -> TtrpcClient:
    """A ttrpc client to the task server, within CONNECT_TIMEOUT."""
    async with asyncio.timeout(CONNECT_TIMEOUT):
        if address.startswith("hvsock://"):
            from . import hvsock  # only the VM sandboxer's tasks need it

            return await hvsock.connect_address(address, timeout=CONNECT_TIMEOUT)
        return await TtrpcClient.connect_unix(address.removeprefix("unix://"))


def lost_response() -> task.DeleteResponse:
    """What we say when nobody knows the exit status any more (containerd's own choice: 255, now)."""
    response = task.DeleteResponse(pid=0, exit_status=LOST_EXIT_STATUS)
    response.exited_at.FromNanoseconds(time.time_ns())
    return response


async def delete_via_task_server(address: str, container_id: str, namespace: str) -> task.DeleteResponse:
    """Have the task server stop (if still running) and forget `container_id`; its exit as DeleteResponse.

    A task server that does not know the id any more already cleaned up: the exit is reported lost.
    Errors other than NotFound propagate (the caller then cleans up on its own).
    """
    client = await dial(address)
    async with client:
        metadata = {NAMESPACE_KEY: namespace}

        async def call(method: str, request: Message, response_type: type[Message],
                       timeout: float = CALL_TIMEOUT) -> Message:  # noqa: ASYNC109
            return await client.call(TASK_SERVICE, method, request, response_type, timeout=timeout,
                                     metadata=metadata)

        try:
            state = await call("State", task.StateRequest(id=container_id), task.StateResponse)
        except NotFound:
            # Still a Delete: a VM's task proxy or a Quark relay in front of the task server keeps the
            # container's host side (its rootfs, volumes) until it sees a Delete answered, also NOT_FOUND
            # (a Create cut off by containerd's restart left it there).
            log.info("task server no longer knows container %s; deleting what is left in front of it", container_id)
            with contextlib.suppress(NotFound):
                await call("Delete", task.DeleteRequest(id=container_id), task.DeleteResponse)
            return lost_response()
        if state.status != types.STOPPED:
            log.info("container %s is still %s; killing it", container_id, types.Status.Name(state.status))
            if state.status in (types.PAUSED, types.PAUSING):
                try:
                    await call("Resume", task.ResumeRequest(id=container_id), empty_pb2.Empty)
                except KuasarError as exc:
                    log.warning("resuming %s before the kill: %s", container_id, exc.message)
            try:
                await call("Kill", task.KillRequest(id=container_id, signal=signal.SIGKILL, all=True),
                           empty_pb2.Empty)
            except NotFound:
                pass  # it exited meanwhile
            await call("Wait", task.WaitRequest(id=container_id), task.WaitResponse, timeout=KILL_WAIT_TIMEOUT)
        response = await call("Delete", task.DeleteRequest(id=container_id), task.DeleteResponse)
        assert isinstance(response, task.DeleteResponse)
        if not response.HasField("exited_at"):
            response.exited_at.FromNanoseconds(time.time_ns())
        log.info("container %s deleted by its task server (exit %d)", container_id, response.exit_status)
        return response


def unmount_rootfs(bundle: Path) -> None:
    rootfs = bundle / "rootfs"
    if not mounts.is_mountpoint(rootfs):
        return
    try:
        mounts.unmount_all(rootfs)
        log.info("unmounted %s", rootfs)
    except OSError as exc:
        log.warning("unmounting %s: %s", rootfs, exc)


async def delete(container_id: str, bundle: Path, namespace: str) -> task.DeleteResponse:
    """The whole `delete` action; never raises for a missing or broken task server."""
    return await delete_or_clean_up(bootstrap_address(bundle), container_id, bundle, namespace)


async def delete_or_clean_up(address: str | None, container_id: str, bundle: Path, namespace: str,
                             budget: float | None = None) -> task.DeleteResponse:
    """Have the task server at `address` delete the container within `budget` seconds (TASK_SERVER_BUDGET
    by default); else (no address, no answer, an error) unmount its rootfs here and report its exit
    lost. Never raises for those."""
    budget = TASK_SERVER_BUDGET if budget is None else budget
    if address is not None:
        try:
            async with asyncio.timeout(budget):
                return await delete_via_task_server(address, container_id, namespace)
        except TimeoutError:
            log.warning("task server %s did not delete %s within %.1f s; cleaning up locally", address,
                        container_id, budget)
        except Exception as exc:  # whatever went wrong, containerd still gets its DeleteResponse
            message = exc.message if isinstance(exc, KuasarError) else str(exc) or type(exc).__name__
            log.warning("task server %s did not delete %s (%s); cleaning up locally", address, container_id,
                        message)
    unmount_rootfs(bundle)
    return lost_response()


def check_bundle(container_id: str, bundle_flag: str) -> Path:
    """The bundle to clean up; refuses one that is not `<...>/<id>`, so a bad call touches nothing else."""
    bundle = Path(bundle_flag or os.getcwd())
    if not bundle.is_absolute():
        bundle = Path(os.getcwd()) / bundle
    if bundle.name != container_id:
        raise ValueError(f"bundle {str(bundle)!r} is not the bundle of container {container_id!r}")
    return bundle


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse already printed the usage error (or --help)
        return exc.code if isinstance(exc.code, int) else 2
    # stderr only: stdout carries the DeleteResponse, and containerd logs whatever stderr says.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(levelname)s: %(message)s")
    if opts.debug:
        log.setLevel(logging.DEBUG)
    prog = os.path.basename(sys.argv[0]) or "containerd-shim-kuasar-v1"
    if opts.show_version:
        print(f"{prog}:\n  Version: {__version__}\n  Revision: kuasar-py")
        return 0
    if opts.info:
        kind = program_type(prog, "v1")
        if kind is None:
            print(f"{prog}: -info: cannot tell the sandbox type from the program name "
                  "(want containerd-shim-kuasar-<type>-v1)", file=sys.stderr)
            return 2
        return runtime_info.print_info(prog, kind)
    if opts.action == "start":
        print(f"{prog}: start: {START_REFUSED}", file=sys.stderr)
        return 1
    if opts.action != "delete":
        print(f"{prog}: an action is required: delete (start is refused)", file=sys.stderr)
        return 2
    try:
        container_id = validate_id(opts.id, "-id")
        bundle = check_bundle(container_id, opts.bundle)
    except (KuasarError, ValueError) as exc:
        print(f"{prog}: delete: {exc}", file=sys.stderr)
        return 1
    response = asyncio.run(delete(container_id, bundle, opts.namespace))
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
