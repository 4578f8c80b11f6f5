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
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import any_pb2

from .api.containerd.runc.options import oci_pb2 as runc_options
from .errors import FailedPrecondition, InvalidArgument
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


def criu_errors(plan: CheckpointPlan) -> str:
    """The last errors CRIU logged for `plan`'s dump ("" if none could be read)."""
    try:
        with open(os.path.join(plan.work_path, DUMP_LOG), "rb") as f:
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
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(UNNAMED_FD_PREFIXES):
                    continue
                info = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
                continue
            mount_id = _fd_mount_id(pid, fd)
            if mount_id is not None and mount_id not in inside:
                found.add(f"file[{mount_id:x}:{info.st_ino:x}]")
    return found


def write_criu_config(path: Path, externals: set[str]) -> None:
    """The CRIU configuration (one option per line, without dashes) for the next checkpoint."""
    write_atomic(path, "".join(f"external {ext}\n" for ext in sorted(externals)).encode(), mode=0o600,
                 durable=False)


def require_criu() -> None:
    """runc checkpoints with CRIU from its PATH (which it inherits from us): say so before runc does,
    in words that name what is missing."""
    if shutil.which(CRIU) is None:
        raise FailedPrecondition("checkpoint: criu is not on the task server's PATH (`make setup` builds one "
                                 "into .prefix/bin; `make install` installs it beside the sandboxers)")
