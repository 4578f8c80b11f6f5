"""The task proxy of one VM: the hybrid-vsock endpoint containerd dials, relaying to the guest agent.

    python -m kuasar.vmm.proxy --listen <vm dir>/task.vsock --uds <vm dir>/vsock.sock \
        --share <vm dir>/shared --share-source <vm dir>/shared.host --guest-share /run/kuasar/state

Why it exists: containerd sends `Task.Create` straight to the task address with the *host* bundle
path and the container's rootfs as host overlay mounts, which the guest cannot see. Upstream CRI
never calls `Controller.Update`, so nothing reaches the sandboxer between CreateContainer and that
`Task.Create`. The proxy sits on that path and, for `Create`, does the host side first:

1. mount the rootfs (`CreateTaskRequest.rootfs`, normally one overlay) on the host at
   `<share>/<id>/rootfs`, bind the container's host volumes at `<share>/.volumes/<n>`, once for
   the pod per host path (and read-only flag), however many of its containers bind it;
2. write the spec rewritten for the guest (`spec.rewrite_spec`) to `<share>/<id>/config.json`;
3. forward `Create` with `bundle = <guest share>/<id>` and no rootfs mounts.

The share reaches the guest over 9p (or virtio-fs). A successful `Delete` of the init process (or a
failed `Create`) takes the host mounts down again. Every other frame, including the streaming IO
calls, is relayed unchanged. The listening socket speaks the hybrid-vsock handshake (`CONNECT
<port>` / `OK <port>`), so the address containerd gets is `ttrpc+hvsock://<listen>:1024`, the same
shape as a VMM's own vsock socket; each connection is one `CONNECT` to the guest through
vhost-device-vsock.

It is a process of its own (one per VM, in its own session) so that containerd's task connections
survive a restart of the sandboxer, as they would if containerd dialed the VMM's socket directly.

With `--netns` it also serves `kubectl port-forward` into the guest (see portforward.py): those
connections, too, then outlive a restart of the sandboxer. With `--log-dir` it keeps the VM's log
files bounded (vm_logs.py), also while the sandboxer is down.

With `--kill-timeout`, a SIGKILL of a container that the guest does not answer in time (a wedged guest
or agent: containerd's call, and with it the pod's stop, would wait until its deadline, at every retry)
is answered OK here and the proxy exits: the sandboxer ends a VM whose proxy exits, and containerd
takes every container behind the dropped connections for exited (255).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import signal
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kuasar.common import guest_forward, hvsock, mounts
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.ttrpc import request_pb2
from kuasar.common.errors import AlreadyExists, Code, FailedPrecondition, InvalidArgument, KuasarError, RuntimeFailure
from kuasar.common.ids import validate_id
from kuasar.common.state import write_atomic
from kuasar.common.task_api import TASK_SERVICES, refuse_restore
from kuasar.common.ttrpc import NAMESPACE_KEY

from . import hostfs, vm_logs
from .portforward import PortForwarder
from .spec import VOLUMES_DIR, ShareBind, rewrite_process, rewrite_resources, rewrite_spec

log = logging.getLogger("kuasar.vmm.proxy")

# The handshake's answer when the guest cannot be reached: any line without "OK" fails the dial at once.
GUEST_UNREACHABLE = b"ERR guest unreachable\n"
# <vm dir>/containers/<id>: the pod's containers, each file holding its namespace (HostPrep.record).
KNOWN_CONTAINERS_DIR = "containers"
HEADER = struct.Struct(">IIBB")
REQUEST, RESPONSE = 1, 2
MAX_FRAME = 4 << 20
# Requests whose JSON (in an Any field) names host things the guest lacks: (message, field, rewrite).
JSON_REWRITES: dict[str, tuple[type[Any], str, Callable[[Any], Any]]] = {
    "Exec": (task.ExecProcessRequest, "spec", rewrite_process),  # host security labels
    "Update": (task.UpdateTaskRequest, "resources", rewrite_resources),  # the host cpuset
}
HANDSHAKE_TIMEOUT = 10.0
# How long the proxy's own answer to an unanswered SIGKILL may take to leave before it exits anyway.
KILL_ANSWER_FLUSH = 2.0
GUEST_CONNECT_TIMEOUT = 5.0
MAX_SPEC_BYTES = 4 << 20
_CONNECT_RE = re.compile(rb"CONNECT (\d{1,10})\r?\n")


# Where the pod's volumes are bound in the shared directory: not a valid container id, so never one's.
POD_VOLUMES = ".volumes"


@dataclass
class _PodVolume:
    name: str
    users: set[str]  # container ids


class HostPrep:
    """The host half of a container in a VM: its directory in the shared directory, and the pod's
    volumes. A host path the pod's containers bind is shared into the VM once (per source and
    read-only flag), as on a host where both containers bind the one inode: through two 9p paths the
    guest sees two inodes, and a socket or FIFO one container makes there the other cannot reach."""

    def __init__(self, share: Path, guest_share: str, sandbox_pid: int = 0, source: Path | None = None) -> None:
        self.share = share
        # Where entries of the share are made, when the share is a read-only view of it (the guest then
        # cannot plant a symlink on a path we mount onto or delete: hostfs.read_only_view); mounts go
        # onto the share. Without one (a VM started before views), both are the share.
        self.source = source if source is not None else share
        # Beside the share, never in it (the guest can write there): which containers are this pod's.
        self.known = share.parent / KNOWN_CONTAINERS_DIR
        self.guest_share = guest_share.rstrip("/")
        self.sandbox_pid = sandbox_pid  # QEMU's: CRI names the pod's namespaces by it
        self.volumes: dict[tuple[str, bool], _PodVolume] = {}
        self._names = itertools.count()

    def host_dir(self, container_id: str) -> Path:
        return self.share / validate_id(container_id, "container id")

    def source_dir(self, container_id: str) -> Path:
        return self.source / validate_id(container_id, "container id")

    def prepare(self, req: task.CreateTaskRequest) -> task.CreateTaskRequest:
        """Mount and write what the guest needs; returns the request to forward."""
        cid = validate_id(req.id, "container id")
        host_dir = self.host_dir(cid)
        guest_bundle = f"{self.guest_share}/{cid}"
        if not os.path.isabs(req.bundle):
            raise InvalidArgument(f"bundle {req.bundle!r} is not an absolute host path")
        try:
            raw = (Path(req.bundle) / "config.json").read_bytes()
        except OSError as err:
            raise InvalidArgument(f"reading {req.bundle}/config.json: {err.strerror}") from None
        if len(raw) > MAX_SPEC_BYTES:
            raise InvalidArgument("config.json is too large")
        try:
            spec = json.loads(raw)
        except ValueError:
            raise InvalidArgument(f"{req.bundle}/config.json is not JSON") from None
        guest_spec, binds = rewrite_spec(spec, cid, guest_bundle, self.sandbox_pid)
        if os.path.lexists(host_dir):
            # A container of that id runs (its rootfs and volumes are mounted there), or a failed
            # attempt's cleanup failed; containerd's Delete of the id removes either.
            raise AlreadyExists(f"container {cid} already exists")
        source_dir = self.source_dir(cid)
        source_dir.mkdir(mode=0o711)
        try:
            rootfs = host_dir / "rootfs"
            (source_dir / "rootfs").mkdir()
            if req.rootfs:
                mounts.mount_rootfs(req.rootfs, rootfs)
            else:
                root = (spec.get("root") or {}).get("path", "rootfs")
                source = root if os.path.isabs(root) else os.path.join(req.bundle, root)
                hostfs.bind(source, rootfs, readonly=False, make_at=source_dir / "rootfs")
            shared = {f"{guest_bundle}/{VOLUMES_DIR}/{bind.name}": self._share_volume(cid, bind) for bind in binds}
            for mount in guest_spec.get("mounts") or []:
                if mount.get("source") in shared:
                    mount["source"] = f"{self.guest_share}/{POD_VOLUMES}/{shared[mount['source']]}"
            write_atomic(source_dir / "config.json", json.dumps(guest_spec).encode(), mode=0o644)
        except BaseException:
            self.cleanup(cid)
            raise
        forward = task.CreateTaskRequest()
        forward.CopyFrom(req)
        forward.bundle = guest_bundle
        del forward.rootfs[:]
        log.info("container %s: rootfs and %d volume(s) shared, bundle %s", cid, len(binds), guest_bundle)
        return forward

    def _share_volume(self, container_id: str, bind: ShareBind) -> str:
        """The name of the pod's share of `bind`'s source, bound now if no container had it."""
        key = (bind.source, bind.readonly)
        volume = self.volumes.get(key)
        if volume is None:
            name = str(next(self._names))
            hostfs.bind(bind.source, self.share / POD_VOLUMES / name, bind.readonly,
                        make_at=self.source / POD_VOLUMES / name)
            volume = self.volumes[key] = _PodVolume(name, set())
        volume.users.add(container_id)
        return volume.name

    def record(self, container_id: str, namespace: str) -> None:
        """That the container is this pod's, made in `namespace`: the sandboxer forwards the guest's
        events of this pod's containers only (see vmm/sandboxer.py, _pods_event)."""
        self.known.mkdir(mode=0o700, exist_ok=True)
        write_atomic(self.known / validate_id(container_id, "container id"), namespace.encode(), durable=False)

    def cleanup(self, container_id: str) -> None:
        (self.known / validate_id(container_id, "container id")).unlink(missing_ok=True)
        try:
            hostfs.remove_tree(self.source_dir(container_id), mounted_at=self.host_dir(container_id))
        except KuasarError as err:
            log.error("container %s: %s", container_id, err.message)
        for key, volume in list(self.volumes.items()):
            volume.users.discard(container_id)
            if volume.users:
                continue
            del self.volumes[key]  # (a later user gets a fresh bind, never a half-removed one)
            try:
                hostfs.remove_tree(self.source / POD_VOLUMES / volume.name,
                                   mounted_at=self.share / POD_VOLUMES / volume.name)
            except KuasarError as err:  # left for Shutdown, which removes the whole shared directory
                log.error("pod volume %s (%s): %s", volume.name, key[0], err.message)


def _frame(stream_id: int, ftype: int, payload: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(len(payload), stream_id, ftype, flags) + payload


def error_response(stream_id: int, err: KuasarError) -> bytes:
    response = request_pb2.Response(status=request_pb2.Status(code=int(err.code), message=err.message))
    return _frame(stream_id, RESPONSE, response.SerializeToString())


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, int, int, bytes] | None:
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError:
        return None
    length, stream_id, ftype, flags = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise RuntimeFailure(f"frame of {length} bytes")
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        return None
    return stream_id, ftype, flags, payload


class TaskProxy:
    def __init__(self, uds: str, prep: HostPrep, port: int = 1024, kill_timeout: float = 0.0,
                 on_wedged: Callable[[], None] | None = None) -> None:
        self.uds = uds
        self.prep = prep
        self.port = port
        self.kill_timeout = kill_timeout  # 0: a SIGKILL waits for the guest however long it takes
        self.on_wedged = on_wedged  # called once a SIGKILL went unanswered (and was answered here)
        self.wedged = False

    def intercept(self, stream_id: int, payload: bytes, pending: dict[int, tuple[str, str]]) -> bytes | None:
        """The (possibly rewritten) request payload to forward; raises KuasarError to refuse it."""
        req = request_pb2.Request.FromString(payload)
        if req.service not in TASK_SERVICES:
            return payload
        if req.method == "Create":
            create = task.CreateTaskRequest.FromString(req.payload)
            refuse_restore(create)  # before the host prepares anything for it
            self.check_stdio(create)
            forward = self.prep.prepare(create)
            pending[stream_id] = ("create", create.id)
            self.prep.record(create.id, next((kv.value for kv in req.metadata if kv.key == NAMESPACE_KEY), ""))
            req.payload = forward.SerializeToString()
            return req.SerializeToString()
        if req.method == "Kill" and self.kill_timeout:
            kill = task.KillRequest.FromString(req.payload)
            if kill.signal == signal.SIGKILL and not kill.exec_id:
                pending[stream_id] = ("kill", kill.id)
            return payload
        if req.method == "Delete":
            delete = task.DeleteRequest.FromString(req.payload)
            if not delete.exec_id:
                # Checked here, refused on its stream: a bad id reached cleanup after the guest's answer,
                # whose error ended the whole connection (every call on it) and lost that answer.
                pending[stream_id] = ("delete", validate_id(delete.id, "container id"))
            return payload
        if req.method in JSON_REWRITES:
            message_type, field, rewrite = JSON_REWRITES[req.method]
            message = message_type.FromString(req.payload)
            if req.method == "Exec":
                self.check_stdio(message)
            carried = getattr(message, field)  # an Any whose value is JSON
            try:
                value = json.loads(carried.value or b"{}")
            except ValueError:
                return payload  # the agent reports it
            rewritten = rewrite(value)
            if rewritten != value:
                carried.value = json.dumps(rewritten).encode()
                req.payload = message.SerializeToString()
                return req.SerializeToString()
        return payload

    def check_stdio(self, req: task.CreateTaskRequest | task.ExecProcessRequest) -> None:
        """containerd's default `io_type = "fifo"` names FIFOs on the host, which the guest cannot open:
        refused here with what to change, not as the guest's "No such file" from deep inside Create."""
        guest_share = self.prep.guest_share + "/"
        for name in ("stdin", "stdout", "stderr"):
            url = getattr(req, name)
            # (containerd's own rule: with "://" a URL, streaming IO; else a path)
            if url and "://" not in url and url != os.devnull and not url.startswith(guest_share):
                raise FailedPrecondition(
                    f"{name} {url!r} is a host path the VM cannot open: set io_type = \"streaming\" for this "
                    "runtime handler in containerd's CRI config")

    def responded(self, payload: bytes, what: tuple[str, str]) -> None:
        kind, cid = what
        try:
            code = request_pb2.Response.FromString(payload).status.code
        except Exception:  # noqa: BLE001 - an undecodable reply is containerd's problem, not ours
            return
        if (kind == "create" and code != Code.OK) or (kind == "delete" and code in (Code.OK, Code.NOT_FOUND)):
            try:
                self.prep.cleanup(cid)
            except Exception:  # the guest's answer still goes to containerd, and the connection serves on
                log.exception("container %s: cleaning up after its %s", cid, kind)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        guest_writer: asyncio.StreamWriter | None = None
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), HANDSHAKE_TIMEOUT)
            except (TimeoutError, ValueError):  # ValueError: a line past the reader's 64 KiB limit
                return
            match = _CONNECT_RE.fullmatch(line)
            if match is None or int(match.group(1)) != self.port:
                log.warning("refusing handshake %r", line[:64])
                return
            try:
                guest_reader, guest_writer = await hvsock.connect(self.uds, self.port,
                                                                  timeout=GUEST_CONNECT_TIMEOUT)
            except KuasarError as err:
                log.warning("guest unreachable: %s", err.message)
                # A refusal, not EOF: containerd's hybrid vsock dialer takes EOF for "not ready yet" and
                # retries for 100 s, one container after another while it reloads its tasks at start-up.
                writer.write(GUEST_UNREACHABLE)
                await writer.drain()
                return
            writer.write(f"OK {self.port}\n".encode())
            await writer.drain()
            pending: dict[int, tuple[str, str]] = {}
            kills: dict[int, asyncio.TimerHandle] = {}  # unanswered SIGKILLs' deadlines, by stream
            up = asyncio.create_task(self._upstream(reader, writer, guest_writer, pending, kills))
            down = asyncio.create_task(self._downstream(guest_reader, writer, pending, kills))
            try:
                done, rest = await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (up, down):
                    t.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
                for timer in kills.values():
                    timer.cancel()
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    log.warning("connection ended: %r", t.exception())
        except asyncio.CancelledError:
            pass  # the proxy is exiting; containerd sees the connection close
        finally:
            for w in (writer, guest_writer):
                if w is not None:
                    w.close()

    async def _upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        guest: asyncio.StreamWriter, pending: dict[int, tuple[str, str]],
                        kills: dict[int, asyncio.TimerHandle]) -> None:
        while (frame := await read_frame(reader)) is not None:
            stream_id, ftype, flags, payload = frame
            if ftype == REQUEST:
                try:
                    forward = self.intercept(stream_id, payload, pending)
                except KuasarError as err:
                    log.warning("request on stream %d refused: %s", stream_id, err.message)
                    writer.write(error_response(stream_id, err))
                    await writer.drain()
                    continue
                except Exception as err:  # noqa: BLE001 - reported to containerd, the relay goes on
                    log.exception("request on stream %d failed", stream_id)
                    writer.write(error_response(stream_id, RuntimeFailure(f"vmm task proxy: {err}")))
                    await writer.drain()
                    continue
                payload = forward
                if pending.get(stream_id, ("",))[0] == "kill":
                    kills[stream_id] = asyncio.get_running_loop().call_later(
                        self.kill_timeout, self._kill_unanswered, writer, stream_id, pending.pop(stream_id)[1])
            guest.write(_frame(stream_id, ftype, payload, flags))
            await guest.drain()

    def _kill_unanswered(self, writer: asyncio.StreamWriter, stream_id: int, container_id: str) -> None:
        """The guest did not answer a container's SIGKILL within kill_timeout: answer it here (the VM,
        and the container with it, is ended once this proxy exits) and exit."""
        if self.wedged:
            return
        self.wedged = True
        log.error("the guest did not answer the SIGKILL of container %s within %gs; exiting, so that the "
                  "sandboxer ends the VM", container_id, self.kill_timeout)
        writer.write(_frame(stream_id, RESPONSE, request_pb2.Response(status=request_pb2.Status()).SerializeToString()))
        asyncio.ensure_future(self._exit_after(writer))

    async def _exit_after(self, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):  # the answer is a courtesy: the exit is what ends the VM
            await asyncio.wait_for(writer.drain(), KILL_ANSWER_FLUSH)
        if self.on_wedged is not None:
            self.on_wedged()

    async def _downstream(self, guest: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          pending: dict[int, tuple[str, str]], kills: dict[int, asyncio.TimerHandle]) -> None:
        while (frame := await read_frame(guest)) is not None:
            stream_id, ftype, flags, payload = frame
            if ftype == RESPONSE and stream_id in kills:
                kills.pop(stream_id).cancel()
                if self.wedged:  # answered already, here
                    continue
            if ftype == RESPONSE and stream_id in pending:
                self.responded(payload, pending.pop(stream_id))
            writer.write(_frame(stream_id, ftype, payload, flags))
            await writer.drain()


async def serve(args: argparse.Namespace) -> bool:
    prep = HostPrep(Path(args.share), args.guest_share, args.sandbox_pid,
                    Path(args.share_source) if args.share_source else None)
    stop = asyncio.Event()
    proxy = TaskProxy(args.uds, prep, args.port, args.kill_timeout, on_wedged=stop.set)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.listen)
    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(proxy.handle, path=args.listen)
    finally:
        os.umask(old)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("relaying %s to guest port %d through %s", args.listen, args.port, args.uds)
    bounding = None
    if args.log_dir and args.log_limit > 0:
        bounding = asyncio.create_task(vm_logs.keep_bounded(Path(args.log_dir), args.log_limit), name="VM logs")
    forwarding = None
    if args.netns:  # after the task socket is up: containerd's first task call need not wait for this
        try:
            forwarding = await PortForwarder(args.uds, args.forward_port).serve(args.netns)
        except KuasarError as err:
            log.warning("port forwarding to the guest unavailable: %s", err.message)
    async with server:
        await stop.wait()
    if forwarding is not None:
        forwarding.close()
    if bounding is not None:
        bounding.cancel()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.listen)
    return not proxy.wedged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kuasar.vmm.proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--uds", required=True, help="vhost-device-vsock's hybrid-vsock socket")
    parser.add_argument("--share", required=True, help="the VM's shared directory on the host")
    parser.add_argument("--share-source", default="",
                        help="the directory the shared directory is a read-only view of (entries are made there)")
    parser.add_argument("--guest-share", default="/run/kuasar/state", help="where the guest mounts it")
    parser.add_argument("--port", type=int, default=1024)
    parser.add_argument("--netns", default="", help="the pod's network namespace, for port forwarding")
    parser.add_argument("--forward-port", type=int, default=guest_forward.DEFAULT_PORT,
                        help="the guest agent's vsock port for forwarded connections")
    parser.add_argument("--sandbox", default="", help="sandbox id (for ps and logs)")
    parser.add_argument("--sandbox-pid", type=int, default=0, help="the pod's pid containerd knows (QEMU's)")
    parser.add_argument("--log-dir", default="", help="the VM's directory, whose *.log files it bounds")
    parser.add_argument("--log-limit", type=int, default=0, help="rotate each log past this many bytes (0: never)")
    parser.add_argument("--kill-timeout", type=float, default=0.0,
                        help="seconds the guest has to answer a container's SIGKILL before the proxy answers it "
                             "and exits, which ends the VM (0: no limit)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, force=True,
                        format=f"%(asctime)s %(levelname)s proxy[{args.sandbox[:12]}]: %(message)s")
    return 0 if asyncio.run(serve(args)) else 1


if __name__ == "__main__":
    sys.exit(main())
