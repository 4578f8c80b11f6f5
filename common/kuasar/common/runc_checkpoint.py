"""What `runc checkpoint` is asked for by a Task API Checkpoint: its command-line flags, from the request,
and the CRIU configuration the container's files need.

containerd's CRI (CheckpointContainer, Kubernetes' forensic checkpoints) pauses the container, calls
Checkpoint with a fresh directory as `path` and no options for a runtime other than its own runc, then
archives what was written there; `ctr task checkpoint` may pass runc's CheckpointOptions instead. As
containerd's runc shim does, no options mean the container is left running, and the options' own image
path, when set, wins over `path`. The checkpoint itself is CRIU's, which runc finds on its PATH.

Our containers hold containerd's stdio FIFOs themselves (no shim copies through pipes): files on a
mount of the host that the container's mount namespace does not have, which CRIU refuses to dump
("Can't lookup mount") unless told they are external. runc passes no such option; it has CRIU read a
configuration file named by the container's `org.criu.config` annotation, which Create sets to a file
in the container's directory (CRIU_CONFIG_NAME) and Checkpoint writes just before it runs runc.

A restore (CRI's restore of a checkpoint archive, `ctr container restore`) is the reverse: a Create that
names the checkpoint's directory, then a Start that runs `runc restore`. CRIU must be handed, for each
external file, what to use in its place; runc does so for stdio pipes only, so Checkpoint records which
of the init's standard fds were external files (EXTERNAL_STDIO_RECORD, among the images) and the
restore's configuration file maps each to the new container's fd (`inherit-fd`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import any_pb2

from .api.containerd.runc.options import oci_pb2 as runc_options
from .errors import FailedPrecondition, InvalidArgument, RuntimeFailure
from .state import write_atomic

# The type URL containerd's typeurl gives runc's CheckpointOptions (the message's full name).
CHECKPOINT_OPTIONS_TYPE_URL = "containerd.runc.v1.CheckpointOptions"
CRIU = "criu"
# CRIU's log of a dump, in its work directory; containerd removes that directory (its checkpoint's)
# when the checkpoint fails, so CRIU's errors go into our answer.
DUMP_LOG = "dump.log"
# The last of CRIU's error lines that a failure's message carries.
DUMP_LOG_ERRORS = 3
# The spec annotation runc reads for the CRIU configuration file of a container's checkpoints.
CRIU_CONFIG_ANNOTATION = "org.criu.config"
CRIU_CONFIG_NAME = "criu.conf"
# Which of a checkpointed init's fds 0-2 were external files: JSON {"<fd>": "file[...]"}, beside CRIU's
# images (containerd archives that directory whole and unpacks it whole for a restore).
EXTERNAL_STDIO_RECORD = "kuasar-external-stdio.json"
# CRIU's log of a restore, in its work directory.
RESTORE_LOG = "restore.log"
# An external file's CRIU id as external_files writes it (mount id and inode, hex).
EXTERNAL_FILE_ID = re.compile(r"file\[[0-9a-f]+:[0-9a-f]+\]")
# What a record may name: an init's standard fds.
STDIO_FDS = (0, 1, 2)
# Links in /proc/<pid>/fd of what CRIU dumps by kind, not as a file on a mount.
UNNAMED_FD_PREFIXES = ("pipe:", "socket:", "anon_inode:")
# What runc's --manage-cgroups-mode accepts.
CGROUPS_MODES = ("soft", "full", "strict", "ignore")


@dataclass
class CheckpointPlan:
    image_path: str
    work_path: str
    leave_running: bool = True
    flags: list[str] = field(default_factory=list)

    def runc_args(self, container_id: str) -> list[str]:
        args = ["checkpoint", "--image-path", self.image_path, "--work-path", self.work_path]
        if self.leave_running:
            args.append("--leave-running")
        return [*args, *self.flags, container_id]


@dataclass
class RestorePlan:
    image_path: str
    work_path: str
    # fd of the new init -> the external file it stands for (the checkpoint's record)
    inherit: dict[int, str]

    def runc_args(self) -> list[str]:
        return ["--image-path", self.image_path, "--work-path", self.work_path]


def criu_errors(plan: CheckpointPlan | RestorePlan) -> str:
    """The last errors CRIU logged for `plan`'s dump or restore ("" if none could be read)."""
    log_name = RESTORE_LOG if isinstance(plan, RestorePlan) else DUMP_LOG
    try:
        with open(os.path.join(plan.work_path, log_name), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line.strip() for line in lines if "Error" in line]
    return "; ".join(errors[-DUMP_LOG_ERRORS:])


def checkpoint_options(options: any_pb2.Any) -> runc_options.CheckpointOptions:
    """The request's options as runc's CheckpointOptions (empty when none were given)."""
    parsed = runc_options.CheckpointOptions()
    if not options.type_url and not options.value:
        return parsed
    if options.type_url.rpartition("/")[2] != CHECKPOINT_OPTIONS_TYPE_URL:
        raise InvalidArgument(f"checkpoint options of type {options.type_url!r} are not runc's "
                              f"{CHECKPOINT_OPTIONS_TYPE_URL}")
    try:
        parsed.ParseFromString(options.value)
    except Exception:  # noqa: BLE001 (protobuf raises DecodeError and others for bad bytes)
        raise InvalidArgument(f"undecodable {CHECKPOINT_OPTIONS_TYPE_URL}") from None
    return parsed


def plan_checkpoint(path: str, options: any_pb2.Any, terminal: bool) -> CheckpointPlan:
    """The checkpoint a request asks for; `terminal`: the container's init has a pty (CRIU must then
    treat it as a shell job, as the options' `terminal` says)."""
    opts = checkpoint_options(options)
    image_path = opts.image_path or path
    if not image_path:
        raise InvalidArgument("checkpoint: no path to write the checkpoint image to")
    for name, value in (("path", image_path), ("work path", opts.work_path)):
        if value and not os.path.isabs(value):
            raise InvalidArgument(f"checkpoint: the {name} {value!r} is not absolute")
    if opts.cgroups_mode and opts.cgroups_mode not in CGROUPS_MODES:
        raise InvalidArgument(f"checkpoint: cgroups mode {opts.cgroups_mode!r} is not one of "
                              f"{', '.join(CGROUPS_MODES)}")
    flags = [flag for flag, wanted in (("--tcp-established", opts.open_tcp),
                                      ("--ext-unix-sk", opts.external_unix_sockets),
                                      ("--shell-job", opts.terminal or terminal),
                                      ("--file-locks", opts.file_locks)) if wanted]
    for namespace in opts.empty_namespaces:
        flags += ["--empty-ns", namespace]
    if opts.cgroups_mode:
        flags += ["--manage-cgroups-mode", opts.cgroups_mode]
    # CRIU's log and statistics go with the images unless asked otherwise (runc's default would be its
    # state directory), so that containerd archives them, as it does for its own runc's checkpoints.
    return CheckpointPlan(image_path, opts.work_path or image_path, not opts.exit, flags)


def use_criu_config(spec: dict, directory: Path) -> bool:
    """At Create: name the container's CRIU configuration file in its spec (`directory`: the container's
    own), in place of any the spec names: a CRIU configuration can run scripts as root (`action-script`)
    and open files anywhere, and a pod's annotations may reach the spec (CRI's pod_annotations). True
    when `spec` changed."""
    annotations = spec.get("annotations")
    if not isinstance(annotations, dict):
        annotations = spec["annotations"] = {}
    ours = str(directory / CRIU_CONFIG_NAME)
    if annotations.get(CRIU_CONFIG_ANNOTATION) == ours:
        return False
    annotations[CRIU_CONFIG_ANNOTATION] = ours
    return True


def _mount_ids(pid: int) -> set[int]:
    with open(f"/proc/{pid}/mountinfo", "rb") as f:
        return {int(line.split(maxsplit=1)[0]) for line in f if line.strip()}


def _fd_mount_id(pid: int, fd: str) -> int | None:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _external_file(pid: int, fd: str, inside: set[int]) -> str | None:
    """CRIU's external id of `pid`'s `fd` if it is a file on a mount outside the `inside` mount ids."""
    try:
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(UNNAMED_FD_PREFIXES):
            return None
        info = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
        return None
    mount_id = _fd_mount_id(pid, fd)
    if mount_id is None or mount_id in inside:
        return None
    return f"file[{mount_id:x}:{info.st_ino:x}]"


def external_files(pids: list[int], init_pid: int) -> set[str]:
    """CRIU's `external` ids (`file[<mount id>:<inode>]`, hex) of the files `pids` hold open on mounts
    outside the mount namespace of `init_pid` (the container's): containerd's FIFOs, a file passed in."""
    inside = _mount_ids(init_pid)
    found = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone meanwhile: nothing of it to dump
            continue
        found.update(ext for fd in fds if (ext := _external_file(pid, fd, inside)) is not None)
    return found


def external_stdio(init_pid: int) -> dict[int, str]:
    """Which of `init_pid`'s standard fds are external files, and their ids (what a restore must replace)."""
    inside = _mount_ids(init_pid)
    return {fd: ext for fd in STDIO_FDS if (ext := _external_file(init_pid, str(fd), inside)) is not None}


def write_external_stdio(image_path: str, stdio: dict[int, str]) -> None:
    write_atomic(Path(image_path) / EXTERNAL_STDIO_RECORD,
                 json.dumps({str(fd): ext for fd, ext in sorted(stdio.items())}).encode(), mode=0o600, durable=False)


def read_external_stdio(image_path: Path) -> dict[int, str]:
    """A checkpoint's record of its init's external stdio; {} for a checkpoint without one (not ours: its
    stdio were pipes, which runc hands over itself). A record that is not ours to trust is refused."""
    try:
        raw = json.loads((image_path / EXTERNAL_STDIO_RECORD).read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"restore: unreadable {EXTERNAL_STDIO_RECORD} in the checkpoint: {exc}") from None
    # Each value becomes a line of CRIU's configuration: only an fd number and an id of our own making.
    if not isinstance(raw, dict) or not all(isinstance(k, str) and k.isdigit() and int(k) in STDIO_FDS
                                            and isinstance(v, str) and EXTERNAL_FILE_ID.fullmatch(v)
                                            for k, v in raw.items()):
        raise InvalidArgument(f"restore: {EXTERNAL_STDIO_RECORD} in the checkpoint is not a map of standard fds "
                              "to external file ids")
    return {int(fd): ext for fd, ext in raw.items()}


def plan_restore(checkpoint: str) -> RestorePlan:
    """The restore a Create's `checkpoint` (a directory of CRIU images) asks for."""
    if not os.path.isabs(checkpoint):
        raise InvalidArgument(f"restore: the checkpoint path {checkpoint!r} is not absolute")
    image_path = Path(checkpoint)
    if not (image_path / "inventory.img").is_file():
        raise InvalidArgument(f"restore: {checkpoint} holds no CRIU checkpoint (no inventory.img)")
    # CRIU's log goes with the images, as a dump's: containerd removes that directory after a restore.
    return RestorePlan(checkpoint, checkpoint, read_external_stdio(image_path))


def write_criu_config(path: Path, externals: set[str] = frozenset(), inherit: dict[int, str] | None = None) -> None:
    """The CRIU configuration (one option per line, without dashes) for the next checkpoint (`externals`)
    or restore (`inherit`: the fds of CRIU, which runc gives the new init's stdio, for external files)."""
    lines = [f"external {ext}\n" for ext in sorted(externals)]
    lines += [f"inherit-fd fd[{fd}]:{ext}\n" for fd, ext in sorted((inherit or {}).items())]
    write_atomic(path, "".join(lines).encode(), mode=0o600, durable=False)


@contextlib.contextmanager
def criu_configured(path: Path, plan: CheckpointPlan | RestorePlan, externals: set[str] = frozenset(),
                    inherit: dict[int, str] | None = None) -> Iterator[None]:
    """CRIU's configuration at `path` (write_criu_config) for the runc command run in the block, and
    removed after it; a failure of that command carries CRIU's last errors for `plan`: containerd
    removes a failed checkpoint's directory, CRIU's log with it."""
    write_criu_config(path, externals, inherit)
    try:
        yield
    except RuntimeFailure as exc:
        errors = criu_errors(plan)
        raise RuntimeFailure(f"{exc}; criu: {errors}" if errors else str(exc)) from None
    finally:
        path.unlink(missing_ok=True)


def require_criu() -> None:
    """runc checkpoints with CRIU from its PATH (which it inherits from us): say so before runc does,
    in words that name what is missing."""
    if shutil.which(CRIU) is None:
        raise FailedPrecondition("checkpoint and restore: criu is not on the task server's PATH (`make setup` "
                                 "builds one into .prefix/bin; `make install` installs it beside the sandboxers)")
