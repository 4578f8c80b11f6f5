"""A FAKE `quark` (Quark Containers' QVisor CLI) for testing quark-sandboxer's Quark backend.

This is not Quark and runs no VM. It keeps the command-line and socket contract Kuasar's quark-sandboxer
relies on (wasm-and-app-kernel-runtimes.md B1.2), so the sandboxer's side can be tested end to end:

    quark -r <sandbox bundle> sandbox --task-socket <path> --id <id> --pid-file <path>

1. cwd is the sandbox bundle, where `config.json` and `rootfs/dev` must already exist;
2. a detached daemon (double fork, setsid, stdio to `<base>/fake-quark.log`) joins the pod's netns from
   `config.json`, takes IPC and UTS namespaces of its own (CRI points every container at the daemon's
   `/proc/<pid>/ns/*`) and serves `containerd.task.v2.Task` (only: QVisor has no v3) over ttrpc on
   `--task-socket`, running the containers with runc under the hood (kuasar.runc's task backend; the
   daemon is their subreaper), each read from `/<id>` of the sandbox bundle as QVisor reads it;
3. the daemon's pid goes to `--pid-file` as bare decimal digits (no newline), and both the pid file and
   the listening socket exist before the foreground command exits 0;
4. SIGKILL kills the daemon like a VM: a guardian process it leaves behind kills its containers; SIGTERM
   stops them and exits.

`FAKE_QUARK_FAIL=<text>` makes the foreground command fail with that message (for error-path tests).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket as socketlib
import subprocess
import sys
from pathlib import Path

from kuasar.common import linux
from kuasar.common.events import EventPublisher
from kuasar.common.host_runc_tasks import RuncTasks
from kuasar.common.reaper import Reaper
from kuasar.common.task_api import register_task_service
from kuasar.common.ttrpc import TtrpcServer

USAGE = "usage: quark -r <bundle> sandbox --task-socket <path> --id <id> --pid-file <path>"
MARKER = "FAKE-QUARK"


def parse(argv: list[str]) -> dict[str, str]:
    args: dict[str, str] = {}
    i = 0
    command = ""
    while i < len(argv):
        arg = argv[i]
        if arg in ("-r", "--root", "--task-socket", "--id", "--pid-file") and i + 1 < len(argv):
            args[arg.lstrip("-")] = argv[i + 1]
            i += 2
        elif not arg.startswith("-") and not command:
            command = arg
            i += 1
        else:
            raise SystemExit(f"{MARKER}: unexpected argument {arg!r}\n{USAGE}")
    bundle = args.get("r") or args.get("root")
    if command != "sandbox" or not bundle or not all(k in args for k in ("task-socket", "id", "pid-file")):
        raise SystemExit(f"{MARKER}: {USAGE}")
    args["bundle"] = bundle
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if os.environ.get("FAKE_QUARK_FAIL"):
        print(f"{MARKER}: {os.environ['FAKE_QUARK_FAIL']}", file=sys.stderr)
        return 1
    bundle = Path(args["bundle"])
    if Path.cwd() != bundle.resolve():
        print(f"{MARKER}: cwd {Path.cwd()} is not the sandbox bundle {bundle}", file=sys.stderr)
        return 1
    if not (bundle / "config.json").is_file() or not (bundle / "rootfs" / "dev").is_dir():
        print(f"{MARKER}: {bundle} has no config.json or rootfs/dev", file=sys.stderr)
        return 1
    spec = json.loads((bundle / "config.json").read_text())
    ready_r, ready_w = os.pipe()
    if os.fork() == 0:  # intermediate: new session, then the daemon, then leave
        os.close(ready_r)
        os.setsid()
        if os.fork() == 0:
            daemon(args, spec, ready_w)
        os._exit(0)
    os.close(ready_w)
    os.wait()
    report = os.read(ready_r, 4096).decode(errors="replace")  # one atomic write: "ok" or the error
    os.close(ready_r)
    if report != "ok":
        print(f"{MARKER}: daemon failed: {report or 'no report'}", file=sys.stderr)
        return 1
    return 0


def daemon(args: dict[str, str], spec: dict, ready_fd: int) -> None:
    base = Path(args["bundle"]).resolve().parent
    try:
        log = os.open(base / "fake-quark.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        netns = next((n.get("path", "") for n in (spec.get("linux") or {}).get("namespaces") or []
                      if n.get("type") == "network"), "")
        if netns:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            linux.setns(fd, linux.CLONE_NEWNET)
            os.close(fd)
        linux.unshare(linux.CLONE_NEWIPC | linux.CLONE_NEWUTS)
        if spec.get("hostname") and netns:
            socketlib.sethostname(spec["hostname"])
        linux.set_child_subreaper()
        start_guardian(base, ready_fd)
        asyncio.run(serve(args, base, ready_fd))
    except BaseException as exc:  # report to the foreground command, which is waiting on the pipe
        try:
            os.write(ready_fd, f"{exc!r}".encode())
        finally:
            os._exit(1)
    os._exit(0)


def start_guardian(base: Path, ready_fd: int) -> None:
    """A child that outlives a SIGKILL of the daemon and then kills its containers, as a VM's death would."""
    if os.fork() != 0:
        return
    os.close(ready_fd)  # the foreground command must see the daemon's report, not wait for us
    os.setsid()
    linux._libc.prctl(linux.PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    signal.signal(signal.SIGTERM, lambda *_: None)
    if os.getppid() == 1:
        os._exit(0)
    signal.pause()
    kill_containers(base / "fake-quark" / "runc")
    os._exit(0)


def kill_containers(runc_root: Path) -> None:
    # runc creates its --root on every command; only call it for containers that exist, so a sandboxer
    # removing the sandbox directory meanwhile does not see it come back.
    try:
        containers = sorted(os.listdir(runc_root))
    except OSError:
        return
    for cid in containers:
        subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", cid], capture_output=True,
                       check=False)


class FakeQuarkTasks(RuncTasks):
    """runc containers in the daemon's namespaces; a pod-wide PID namespace is not faked.

    As QVisor in sandbox mode: a container is read from `/<id>` of the sandbox bundle (QVisor's root),
    whatever `bundle` the request names, with its rootfs already there; stdio paths are paths in that
    root. Only `containerd.task.v2.Task` is served (QVisor's shim crate has no v3)."""

    sandbox_bundle = Path("/")

    def _in_sandbox(self, path: str) -> str:
        return str(self.sandbox_bundle / path.lstrip("/")) if path else ""

    async def exec(self, req, ctx):  # type: ignore[no-untyped-def]
        for name in ("stdin", "stdout", "stderr"):
            setattr(req, name, self._in_sandbox(getattr(req, name)))
        return await super().exec(req, ctx)

    async def create(self, req, ctx):  # type: ignore[no-untyped-def]
        req.bundle = str(self.sandbox_bundle / req.id)
        if req.rootfs:
            raise ValueError("QVisor takes no rootfs mounts: the container's rootfs is laid out in its bundle")
        for name in ("stdin", "stdout", "stderr"):
            setattr(req, name, self._in_sandbox(getattr(req, name)))
        # CRI names the daemon's PID namespace for a pod sharing one, which is the host's here: give such
        # a container a PID namespace of its own instead of joining the host's.
        path = Path(req.bundle) / "config.json"
        spec = json.loads(path.read_text())
        for ns in (spec.get("linux") or {}).get("namespaces") or []:
            if ns.get("type") == "pid":
                ns.pop("path", None)
        path.write_text(json.dumps(spec))
        return await super().create(req, ctx)


async def serve(args: dict[str, str], base: Path, ready_fd: int) -> None:
    reaper = Reaper()
    reaper.install()
    tasks = FakeQuarkTasks(reaper, EventPublisher(""), base / "fake-quark")
    tasks.sandbox_bundle = Path(args["bundle"]).resolve()
    server = TtrpcServer()
    register_task_service(server, tasks, services=("containerd.task.v2.Task",))
    await server.start_unix(args["task-socket"], mode=0o600)
    Path(args["pid-file"]).write_text(str(os.getpid()))  # bare digits: Kuasar parses without trimming
    os.write(ready_fd, b"ok")
    os.close(ready_fd)
    print(f"{MARKER}: sandbox {args['id']} pid {os.getpid()} serving {args['task-socket']}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for pod_id in {c.pod_id for c in tasks.containers.values()}:
        await tasks.remove_pod_containers(pod_id)
    await server.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
