"""gVisor's `runsc` command line, driven without a shell.

runsc reads its global flags on every invocation and does not remember them per sandbox (a `create`
with `--network=none` followed by a plain `start` tries to set up the network again), so every command
on a sandbox repeats the same global flags; the per-sandbox part of them is the network mode.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kuasar.common.errors import DeadlineExceeded, NotFound, RuntimeFailure
from kuasar.common.reaper import Exit, Reaper
from kuasar.common.runc_cli import ERROR_LEVELS, ROOT_FLAG, Stdio, log_offset
from kuasar.common.runc_cli import last_error as _last_logged_error
from kuasar.common.spawn import Completed, resolve, run, start_program

from .config import CONTROL_TIMEOUT

# runsc exits 128 when it fails itself (bad spec, missing container, ...), before running anything.
RUNSC_FAILURE = 128
# Releases from this date on tell a pod's netns from the host's by /proc/sys/net/core/dev_weight;
# older ones look for rmem_default, which kernels >= 6.x also have in every other netns.
NETSTACK_FIXED_DATE = 20240801
# runsc logs some failures (a missing container, ...) as warnings.
RUNSC_ERROR_LEVELS = (*ERROR_LEVELS, "warning")

__all__ = ["NETSTACK_FIXED_DATE", "Leftover", "RUNSC_FAILURE", "Runsc", "SandboxUnresponsive", "Stdio", "last_error"]


# The --network flag for commands that touch no network (list, delete of what is left).
NO_NETWORK = "none"

class SandboxUnresponsive(DeadlineExceeded):
    """A runsc control command got no answer from the sandbox in time (and was killed)."""


@dataclass(frozen=True)
class Leftover:
    """A container in runsc's root that no task server of ours knows."""

    id: str
    bundle: str
    sandbox: str


class Runsc:
    def __init__(self, reaper: Reaper, root: Path, binary: str = "runsc", platform: str = "systrap",
                 debug_dir: Path | None = None, control_timeout: float = CONTROL_TIMEOUT) -> None:
        self.reaper = reaper
        self.control_timeout = control_timeout
        self.root = root
        self.binary = binary
        self.platform = platform
        self.debug_dir = debug_dir
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def argv(self, network: str, log_path: Path | None, *args: str) -> list[str]:
        argv = [self.binary, ROOT_FLAG, str(self.root), f"--platform={self.platform}", f"--network={network}",
                "--log", str(log_path) if log_path is not None else os.devnull, "--log-format", "json"]
        if self.debug_dir is not None:
            argv += ["--debug", f"--debug-log={self.debug_dir}/"]
        return argv + list(args)

    async def _run(self, network: str, args: list[str], *, log_path: Path | None = None,
                   stdio: Stdio | None = None, capture: bool = True, control: bool = False,
                   timeout: float | None = None) -> Completed:
        """`control`: a command the sandbox must answer, bounded by `control_timeout` (or a shorter
        `timeout`)."""
        stdio = stdio or Stdio()
        offset = log_offset(log_path)
        bound = min(timeout or self.control_timeout, self.control_timeout) if control else None
        try:
            result = await run(self.reaper, self.argv(network, log_path, *args), stdin=stdio.stdin,
                               stdout=stdio.stdout, stderr=stdio.stderr, capture=capture, timeout=bound)
        except DeadlineExceeded:
            raise SandboxUnresponsive(f"runsc {' '.join(args)}: no answer from the sandbox within "
                                      f"{bound:g}s (killed)") from None
        if result.status != 0:
            message = last_error(log_path, offset) or _first_line(result.stderr)
            if "does not exist" in message or "not found" in message:
                raise NotFound(f"runsc {args[0]}: {message}")
            raise RuntimeFailure(f"runsc {args[0]} failed ({result.status}): {message or 'no message'}")
        return result

    async def version_date(self) -> int:
        """The release date of the binary (20240729 for Debian's 0.0~20240729.0), 0 if unknown."""
        result = await run(self.reaper, [self.binary, "--version"])
        text = result.stdout.decode(errors="replace")
        for marker in ("release-", "0.0~"):
            index = text.find(marker)
            digits = text[index + len(marker):index + len(marker) + 8] if index >= 0 else ""
            if digits.isdigit():
                return int(digits)
        return 0

    async def create(self, container_id: str, bundle: Path, pid_file: Path, network: str, stdio: Stdio,
                     console_socket: Path | None = None, control: bool = False) -> None:
        """With `console_socket`, runsc makes the container's pty and sends its master there (here, at
        create). `control` for a sub-container, whose create asks its sandbox; not for a sandbox's own
        (runsc starts its processes then, and a create killed half way would leave them unknown)."""
        console = ["--console-socket", str(console_socket)] if console_socket is not None else []
        await self._run(network, ["create", "--bundle", str(bundle), "--pid-file", str(pid_file), *console,
                                  container_id], log_path=bundle / "runsc.log", stdio=stdio, capture=False,
                        control=control)

    async def start(self, container_id: str, bundle: Path, network: str, stdio: Stdio | None = None) -> None:
        """Start a created container (the sandbox runs it: bounded as a control command). A sub-container
        takes its stdio from `runsc start` (not `create`)."""
        await self._run(network, ["start", container_id], log_path=bundle / "runsc.log", stdio=stdio,
                        capture=stdio is None, control=True)

    async def kill(self, container_id: str, signal: int, network: str, *, all_processes: bool = False,
                   pid: int = 0) -> None:
        args = ["kill"] + (["--all"] if all_processes else []) + ([f"--pid={pid}"] if pid else [])
        await self._run(network, [*args, container_id, str(signal)], control=True)

    async def delete(self, container_id: str, network: str) -> None:
        try:
            await self._run(network, ["delete", "--force", container_id], control=True)
        except NotFound:
            pass

    async def leftovers(self) -> list[Leftover]:
        """Every container (sandboxes too) runsc keeps in our root, with its bundle and sandbox."""
        result = await self._run(NO_NETWORK, ["list", "--format=json"])
        try:
            listed = json.loads(result.stdout or b"[]") or []
        except ValueError as exc:
            raise RuntimeFailure(f"runsc list: not JSON: {exc}") from None
        # A container whose state file is not found counts as a sandbox of its own.
        sandbox_of = dict(_state_files(self.root))
        found = []
        for entry in listed:
            container_id = str(entry.get("id", "")) if isinstance(entry, dict) else ""
            if container_id:
                found.append(Leftover(container_id, str(entry.get("bundle") or ""),
                                      sandbox_of.get(container_id, container_id)))
        return found

    def forget_unsaved(self, container_id: str) -> None:
        """Remove the lock file of a container whose create ended before runsc saved its state (runsc
        takes the lock first and writes the state last), and the control socket it made in our root
        if the container was a sandbox (only `runsc delete` of a saved one removes that)."""
        for lock in self.root.glob(f"{container_id}{_STATE_SEPARATOR}*{_LOCK_SUFFIX}"):
            lock.unlink(missing_ok=True)
        (self.root / f"{_CONTROL_SOCKET_PREFIX}{container_id}{_CONTROL_SOCKET_SUFFIX}").unlink(missing_ok=True)

    def forget_stray_locks(self, sandbox_id: str) -> None:
        """Remove the lock files of a deleted sandbox's containers that no state file goes with. runsc
        deletes a container's state and lock, but another runsc command on the same sandbox that had
        listed the container (two containers deleted at once) may take its lock again just after,
        making the file anew: seen as `<id>_sandbox:<sandbox>.lock` left after the pod was gone. Called
        once the sandbox itself is deleted, when none of its containers can be in the making."""
        for lock in self.root.glob(f"*{_STATE_SEPARATOR}{sandbox_id}{_LOCK_SUFFIX}"):
            if not lock.with_name(lock.name.removesuffix(_LOCK_SUFFIX) + _STATE_SUFFIX).exists():
                lock.unlink(missing_ok=True)

    def has(self, container_id: str) -> bool:
        """Whether our root holds runsc's state of a container (or sandbox) `container_id` (an id is
        letters, digits and `._-`: no glob)."""
        return any(_state_files(self.root, container_id))

    async def status(self, container_id: str, network: str) -> str:
        """The container's status as runsc keeps it (`created`, `running`, `stopped`, ...)."""
        result = await self._run(network, ["state", container_id], control=True)
        try:
            return str(json.loads(result.stdout)["status"]).lower()
        except (ValueError, KeyError, TypeError):
            raise RuntimeFailure(f"runsc state: unexpected output {result.stdout[:200]!r}") from None

    async def pause(self, container_id: str, network: str) -> None:
        await self._run(network, ["pause", container_id], control=True)

    async def resume(self, container_id: str, network: str) -> None:
        await self._run(network, ["resume", container_id], control=True)

    async def ps(self, container_id: str, network: str, timeout: float | None = None) -> list[int]:
        """`timeout`: shorter than the control timeout, for a caller that answers without the list."""
        result = await self._run(network, ["ps", "--format", "json", container_id], control=True, timeout=timeout)
        return [int(pid) for pid in json.loads(result.stdout or b"[]") or []]

    async def stats(self, container_id: str, network: str) -> dict:
        """`runsc events --stats`: the container's cpu, memory and pids as the sentry accounts them."""
        result = await self._run(network, ["events", "--stats", container_id], control=True)
        try:
            return json.loads(result.stdout).get("data") or {}
        except (ValueError, AttributeError):
            raise RuntimeFailure(f"runsc events: unexpected output {result.stdout[:200]!r}") from None

    async def wait(self, container_id: str, network: str) -> int:
        """Block until the container's init exits and return its status (`runsc wait`, one per container).

        The sandbox keeps a container's exit status until the container is deleted, so waiting after the
        exit still answers, any number of times.
        """
        result = await self._run(network, ["wait", container_id])
        try:
            return int(json.loads(result.stdout)["exitStatus"])
        except (ValueError, KeyError, TypeError):
            raise RuntimeFailure(f"runsc wait: unexpected output {result.stdout[:200]!r}") from None

    def spawn_exec(self, container_id: str, network: str, process_json: Path, internal_pid_file: Path,
                   log_path: Path, stdio: Stdio, terminal: bool = False) -> tuple[int, asyncio.Future[Exit]]:
        r"""Start a foreground `runsc exec` and return its pid and exit.

        `exec --detach` + `wait --pid` loses the status of a process that ends before the wait starts
        (the sandbox reaps it: "no such process"); a foreground `runsc exec` stays until the process
        exits and exits with its status (128 + signal for a signal). Killing the runner does not kill
        the process; signals go through `runsc kill --pid` with the pid from `internal_pid_file`.

        With a `terminal` (a pty replica as stdio), the runner gets a session of its own with that pty as
        its controlling terminal, as runsc's own detached exec gives its waiting child: then a resize
        (SIGWINCH) and ^C, ^Z, ^\ reach it as signals, which it forwards to the foreground process in
        the sandbox. `setsid -c` (util-linux's and busybox's spelling) does that in the same process (it
        forks only when already a process group leader, which the runner, in the task server's group,
        is not).
        """
        argv = self.argv(network, log_path, "exec", "--process", str(process_json),
                         "--internal-pid-file", str(internal_pid_file), container_id)
        if terminal:
            argv = [resolve("setsid"), "-c", *argv]
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            pid = start_program(resolve(argv[0]), argv, os.environ,
                                *(devnull if fd is None else fd for fd in (stdio.stdin, stdio.stdout, stdio.stderr)))
            return pid, self.reaper.watch(pid)  # same loop step as the spawn: the reaper cannot miss it
        finally:
            os.close(devnull)


def _first_line(data: bytes) -> str:
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


def last_error(log_path: Path | None, offset: int = 0) -> str:
    """The error runsc logged (JSON lines, `--log-format json`) after `offset`."""
    return _last_logged_error(log_path, offset, RUNSC_ERROR_LEVELS)


# runsc keeps each container's state in its root as `<container id>_sandbox:<sandbox id>.state`, and the
# lock it takes on it as `... .lock`.
_STATE_SEPARATOR, _STATE_SUFFIX, _LOCK_SUFFIX = "_sandbox:", ".state", ".lock"
# A sandbox's control socket, made in the root (runsc/sandbox: controlSocketName) early in its create.
_CONTROL_SOCKET_PREFIX, _CONTROL_SOCKET_SUFFIX = "runsc-", ".sock"


def _state_files(root: Path, container_id: str = "*") -> Iterator[tuple[str, str]]:
    """(container id, sandbox id) of every state file in `root`, or of `container_id`'s."""
    for state in root.glob(f"{container_id}{_STATE_SEPARATOR}*{_STATE_SUFFIX}"):
        container, _, sandbox = state.name.removesuffix(_STATE_SUFFIX).partition(_STATE_SEPARATOR)
        yield container, sandbox
