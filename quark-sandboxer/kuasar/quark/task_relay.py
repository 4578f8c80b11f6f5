"""The task relay of one Quark sandbox: containerd's task address, in front of Quark's own socket.

    python -m kuasar.quark.task_relay --listen <base>/task.sock --upstream <base>/quark-task.sock \
        --sandbox-bundle <base>/sandbox

Why it exists (from Kuasar's `quark/` and Quark's source): QVisor serves only `containerd.task.v2.Task`,
and in sandbox mode it reads a container from `/<id>` inside its sandbox bundle (the VM's root), which
Kuasar's forked containerd has laid out through `Controller.Update` before `Task.Create`. Upstream
containerd 2.1 dials a sandboxer's task address only at version 3, calls `containerd.task.v3.Task`
there, and sends no such Update. The relay serves v3 and forwards every call to QVisor as v2 (the
messages are the same); before `Create` it lays the container out as that Update would
(quark_containers: rootfs, binds, stdio FIFOs into `<sandbox bundle>/<id>`) and forwards `Create` with
the paths as QVisor sees them; `Exec` gets its FIFOs bound the same way. A successful `Delete` takes
them down again.

It is a process of its own per sandbox, so containerd's task connections survive a restart of the
sandboxer; it exits when QVisor's socket closes (QVisor died), which drops containerd's connections as
QVisor's own death would have.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.errors import AlreadyExists, DeadlineExceeded, InvalidArgument, KuasarError, NotFound, Unavailable
from kuasar.common.keyed_locks import KeyedLocks
from kuasar.common.task_api import TASK_METHODS, refuse_restore
from kuasar.common.ttrpc import NAMESPACE_KEY, Context, TtrpcClient, TtrpcServer

from .quark_containers import STDIO, QuarkContainers

log = logging.getLogger("kuasar.quark.relay")

SERVED_SERVICE = "containerd.task.v3.Task"
QUARK_SERVICE = "containerd.task.v2.Task"
# Errors after which QVisor may still have done the call (no answer came): the layout is kept for Delete.
UNANSWERED = (Unavailable, DeadlineExceeded)
# A forwarded call whose deadline has just passed still goes out this long, for QVisor to refuse it.
MIN_FORWARD_TIMEOUT = 0.001
# QVisor answers its first call once its VM runs: a boot takes seconds; this bounds a hung one.
PROBE_TIMEOUT = 30.0


class QuarkTaskRelay:
    def __init__(self, quark: TtrpcClient, sandbox_bundle: Path) -> None:
        self.quark = quark
        # In memory only: a relay that dies ends its sandbox, whose Shutdown unmounts all under it.
        self.containers = QuarkContainers(sandbox_bundle, {})
        # A container's Create and Delete one at a time, and with none of its Execs, which run side by
        # side (each lays out files of its own; two of one exec id: the second finds the first's record).
        self._locks = KeyedLocks()

    def register(self, server: TtrpcServer) -> None:
        for method, request_type in TASK_METHODS.items():
            handler = getattr(self, method.lower(), None) if method in ("Create", "Exec", "Delete") else None
            server.add_unary(SERVED_SERVICE, method, request_type, handler or self._forwarder(method))

    def _forwarder(self, method: str) -> Any:
        async def forward(req: Message, ctx: Context) -> bytes:
            return await self.forward(method, req, ctx)
        return forward

    async def forward(self, method: str, req: Message, ctx: Context) -> bytes:
        metadata = {NAMESPACE_KEY: ctx.namespace} if ctx.namespace else None
        # The time containerd has left, not what it allowed when the call came (a Create's layout took some).
        timeout = None if ctx.deadline is None else max(ctx.deadline - asyncio.get_running_loop().time(),
                                                         MIN_FORWARD_TIMEOUT)
        # QVisor's reply goes back as it came (the same message in v2 and v3).
        return await self.quark.call(QUARK_SERVICE, method, req, None, timeout=timeout, metadata=metadata)

    async def create(self, req: task.CreateTaskRequest, ctx: Context) -> bytes:
        refuse_restore(req)
        async with self._locks.hold(req.id):
            if req.id in self.containers.state:  # laid out and maybe running: a second layout would stack
                raise AlreadyExists(f"container {req.id} already exists")
            try:
                spec = json.loads((Path(req.bundle) / "config.json").read_bytes())
            except (OSError, ValueError) as exc:
                raise InvalidArgument(f"container {req.id}: bundle {req.bundle}: {exc}") from None
            entry = {"spec": spec, "stdin": req.stdin, "stdout": req.stdout, "stderr": req.stderr,
                     "rootfs": [{"type": m.type, "source": m.source, "options": list(m.options)}
                                for m in req.rootfs]}
            self.containers.append(req.id, entry)
            io = self.containers.state[req.id]["io"]
            forwarded = task.CreateTaskRequest()
            forwarded.CopyFrom(req)
            forwarded.bundle = f"/{req.id}"
            del forwarded.rootfs[:]
            for name in STDIO:
                setattr(forwarded, name, io.get(name, ""))
            try:
                return await self.forward("Create", forwarded, ctx)
            except KuasarError as exc:
                if not isinstance(exc, UNANSWERED):  # QVisor refused it: nothing runs from the layout
                    self._remove(req.id)
                raise
            # Cancelled, or no answer: QVisor may have created it and run from the layout, which the
            # Delete that follows takes down.

    async def exec(self, req: task.ExecProcessRequest, ctx: Context) -> bytes:
        async with self._locks.hold(req.id, shared=True):
            if req.id not in self.containers.state:
                return await self.forward("Exec", req, ctx)  # QVisor answers for a container it does not know
            if req.exec_id in self.containers.state[req.id]["execs"]:
                raise AlreadyExists(f"exec {req.exec_id} of container {req.id} already exists")
            process = {"exec_id": req.exec_id, **{name: getattr(req, name) for name in STDIO}}
            exec_id = self.containers.add_exec(req.id, process)
            forwarded = task.ExecProcessRequest()
            forwarded.CopyFrom(req)
            for name in STDIO:
                if getattr(req, name):
                    setattr(forwarded, name, f"/{req.id}/{exec_id}-{name}")
            try:
                return await self.forward("Exec", forwarded, ctx)
            except KuasarError as exc:
                if not isinstance(exc, UNANSWERED):
                    self._remove(req.id, exec_id)
                raise

    async def delete(self, req: task.DeleteRequest, ctx: Context) -> bytes:
        async with self._locks.hold(req.id):
            try:
                reply = await self.forward("Delete", req, ctx)
            except NotFound:
                self._remove(req.id, req.exec_id)  # QVisor never had it (or forgot it): its layout goes too
                raise
            self._remove(req.id, req.exec_id)
            return reply

    def _remove(self, container_id: str, exec_id: str = "") -> None:
        if container_id not in self.containers.state:
            return
        if exec_id:
            self.containers.remove_exec(container_id, exec_id)
        else:
            self.containers.remove(container_id)


async def wait_serving(quark: TtrpcClient, timeout: float) -> None:  # noqa: ASYNC109
    """Until QVisor answers a ttrpc call. `quark sandbox` returns once QVisor has bound its socket, before
    the VM runs (without KVM, say, it dies then): an answer, any status, is what shows the VM is up."""
    try:
        await quark.call(QUARK_SERVICE, "Connect", task.ConnectRequest(id=""), None, timeout=timeout)
    except UNANSWERED as exc:
        raise RuntimeError(f"QVisor does not answer on its task socket ({exc.message})") from None
    except KuasarError:
        pass  # answered (it has no such container): serving


async def serve(args: argparse.Namespace) -> None:
    quark = await TtrpcClient.connect_unix(args.upstream)
    await wait_serving(quark, args.probe_timeout)
    relay = QuarkTaskRelay(quark, Path(args.sandbox_bundle))
    server = TtrpcServer()
    relay.register(server)
    await server.start_unix(args.listen)
    log.info("relaying %s (v3) to QVisor at %s (v2)", args.listen, args.upstream)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gone = asyncio.ensure_future(quark.wait_closed())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({gone, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if gone.done():
        log.info("QVisor's task socket closed; ending containerd's connections with it")
    for waiter in (gone, stopped):
        waiter.cancel()
    await server.close()
    await quark.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quark-task-relay", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--listen", required=True, help="the task socket containerd dials (v3)")
    parser.add_argument("--upstream", required=True, help="QVisor's task socket (v2)")
    parser.add_argument("--sandbox-bundle", required=True, help="QVisor's root: <base>/sandbox")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--probe-timeout", type=float, default=PROBE_TIMEOUT,
                        help="seconds QVisor has to answer its first call (its VM boots meanwhile)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve(args))
    except Exception as exc:  # noqa: BLE001 - one line for the sandboxer's log, not a traceback
        log.error("task relay: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
