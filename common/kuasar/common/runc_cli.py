"""The `runc` command line, driven without a shell; every failure carries runc's own message.

Used by runc-sandboxer (logs in the bundle) and by the vm-agent inside the guest (logs in the guest's
tmpfs), so every command that logs takes its log path. `Stdio` and `last_error` also serve runsc,
which speaks the same JSON log format.

Starting a created container is the one step done without the command (see `release_exec_fifo`).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import FailedPrecondition, NotFound, RuntimeFailure
from .reaper import Reaper
from .request_timing import TIMING
from .spawn import Completed, run

# Only the tail of a log matters: the error that ended the command is its last entry.
LOG_TAIL = 8192
# The levels of a runc log entry that explain a failure.
ERROR_LEVELS = ("error", "fatal")
# A created container's init blocks writing one byte to this FIFO in its state directory
# (`<root>/<id>/`); `runc start` is reading that byte and removing the FIFO (runc 1.0 to 1.5 alike).
EXEC_FIFO = "exec.fifo"
# How every command names our root, runc's and runsc's alike: how a task server finds the commands a
# dead one left running (runtime_commands).
ROOT_FLAG = "--root"
# What runc says when the process to signal has ended (lower case), as containerd's shim reads it.
KILL_TARGET_GONE = ("container not running", "no such process", "process already finished")
# Newer runc runs poststart hooks in `runc start` itself; a spec naming one is started by the command.
POSTSTART_HOOKS = b'"poststart"'


@dataclass
class Stdio:
    """File descriptors handed to the runtime's process, and through it to the container (None: /dev/null)."""

    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None


def log_offset(log_path: Path | None) -> int:
    """Where the next command's entries will start in `log_path`."""
    return log_path.stat().st_size if log_path is not None and log_path.exists() else 0


def last_error(log_path: Path | None, offset: int = 0, levels: tuple[str, ...] = ERROR_LEVELS) -> str:
    """The error logged (JSON lines, `--log-format json`) after `offset`, i.e. by the command that just failed."""
    if log_path is None or not log_path.exists():
        return ""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(offset, os.path.getsize(log_path) - LOG_TAIL))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in levels:
            return str(entry.get("msg", ""))
    return ""


class Runc:
    def __init__(self, reaper: Reaper, root: Path, binary: str = "runc", no_pivot: bool = False) -> None:
        self.reaper = reaper
        self.root = root
        self.binary = binary
        self.no_pivot = no_pivot
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _argv(self, log_path: Path | None, *args: str) -> list[str]:
        argv = [self.binary, ROOT_FLAG, str(self.root)]
        if log_path is not None:
            argv += ["--log", str(log_path), "--log-format", "json"]
        return argv + list(args)

    async def _run(self, args: list[str], *, log_path: Path | None = None, stdio: Stdio | None = None,
                   capture: bool = True) -> Completed:
        stdio = stdio or Stdio()
        offset = log_offset(log_path)
        started = TIMING.start()
        result = await run(self.reaper, self._argv(log_path, *args), stdin=stdio.stdin,
                           stdout=stdio.stdout, stderr=stdio.stderr, capture=capture)
        TIMING.done("runc", args[0], started)
        if result.status != 0:
            message = last_error(log_path, offset) or result.stderr.decode(errors="replace").strip()
            if "does not exist" in message or "not exist" in message:
                raise NotFound(f"runc {args[0]}: {message}")
            raise RuntimeFailure(f"runc {args[0]} failed ({result.status}): {message or 'no message'}")
        return result

    async def create(self, container_id: str, bundle: Path, pid_file: Path, log_path: Path, stdio: Stdio,
                     console_socket: Path | None = None) -> None:
        args = ["create", "--bundle", str(bundle), "--pid-file", str(pid_file)]
        if self.no_pivot:
            args.append("--no-pivot")
        if console_socket is not None:
            args += ["--console-socket", str(console_socket)]
        await self._run([*args, container_id], log_path=log_path, stdio=stdio, capture=False)

    async def start(self, container_id: str, bundle: Path, log_path: Path, init_exited: asyncio.Event) -> None:
        """Let a created container's init exec the container's process.

        `runc start` is a Go program that starts up (~5 ms here) to read one byte from the exec FIFO;
        we read it ourselves. The command stays for what it does beyond that: poststart hooks, and any
        runc that keeps no exec FIFO where runc 1.x does.
        """
        fifo = self.root / container_id / EXEC_FIFO
        try:
            is_fifo = stat.S_ISFIFO(fifo.lstat().st_mode)
        except FileNotFoundError:
            is_fifo = False
        if not is_fifo or POSTSTART_HOOKS in (bundle / "config.json").read_bytes():
            await self._run(["start", container_id], log_path=log_path)
            return
        await release_exec_fifo(fifo, init_exited)

    async def exec(self, container_id: str, process_json: Path, pid_file: Path, log_path: Path, stdio: Stdio,
                   console_socket: Path | None = None) -> None:
        args = ["exec", "--detach", "--process", str(process_json), "--pid-file", str(pid_file)]
        if console_socket is not None:
            args += ["--console-socket", str(console_socket)]
        await self._run([*args, container_id], log_path=log_path, stdio=stdio, capture=False)

    async def kill(self, container_id: str, signal: int, all_processes: bool = False) -> None:
        try:
            await self._run(["kill"] + (["--all"] if all_processes else []) + [container_id, str(signal)])
        except RuntimeFailure as exc:
            # As containerd's shim reads runc's answer (checkKillError): a process that ended meanwhile
            # is NotFound, which CRI's StopContainer takes for "stopped" rather than a failure.
            if any(gone in exc.message.lower() for gone in KILL_TARGET_GONE):
                raise NotFound(exc.message) from None
            raise

    async def delete(self, container_id: str) -> None:
        try:
            await self._run(["delete", "--force", container_id])
        except NotFound:
            pass

    async def checkpoint(self, args: list[str], log_path: Path) -> None:
        """`runc checkpoint` with `args` (kuasar.common.runc_checkpoint.CheckpointPlan.runc_args)."""
        await self._run(args, log_path=log_path)

    async def restore(self, container_id: str, bundle: Path, pid_file: Path, log_path: Path, stdio: Stdio,
                      criu_args: list[str]) -> None:
        """`runc restore` of a checkpoint into a container that runs when this returns (`criu_args`:
        kuasar.common.runc_checkpoint.RestorePlan.runc_args). No subreaper of runc's own: the restored
        init must re-parent to us, the task server, as a created one does."""
        args = ["restore", "--detach", "--no-subreaper", "--bundle", str(bundle), "--pid-file", str(pid_file),
                *criu_args]
        if self.no_pivot:
            args.append("--no-pivot")
        await self._run([*args, container_id], log_path=log_path, stdio=stdio, capture=False)

    async def pause(self, container_id: str) -> None:
        await self._run(["pause", container_id])

    async def resume(self, container_id: str) -> None:
        await self._run(["resume", container_id])

    async def update(self, container_id: str, resources_json: Path) -> None:
        await self._run(["update", "--resources", str(resources_json), container_id])

    async def ps(self, container_id: str) -> list[int]:
        result = await self._run(["ps", "--format", "json", container_id])
        return [int(pid) for pid in json.loads(result.stdout or b"[]") or []]

    async def state(self, container_id: str) -> dict:
        result = await self._run(["state", container_id])
        return json.loads(result.stdout)


async def release_exec_fifo(fifo: Path, init_exited: asyncio.Event) -> None:
    """Read the byte a created init writes to its exec FIFO (which lets it exec), then remove the FIFO,
    which is how runc tells a running container from a created one.

    Opened non-blocking so that an init that died before writing cannot hang us: we wait for the
    byte or for the init's exit, whichever comes first. A FIFO whose writer never came reports no
    hang-up, so readiness means the byte is there or the init has closed its end.
    """
    loop = asyncio.get_running_loop()
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        while True:
            readable = loop.create_future()
            loop.add_reader(fd, _resolve, readable)
            exited = asyncio.ensure_future(init_exited.wait())
            try:
                await asyncio.wait([readable, exited], return_when=asyncio.FIRST_COMPLETED)
            finally:
                loop.remove_reader(fd)
                exited.cancel()
            try:
                data: bytes | None = os.read(fd, 1)
            except BlockingIOError:
                data = None  # nothing written yet
            if data:
                break
            if data == b"":  # init closed its end without writing: it is dying
                await init_exited.wait()
            if init_exited.is_set():
                raise FailedPrecondition("container init exited before it was started")
    finally:
        os.close(fd)
    fifo.unlink(missing_ok=True)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
