"""Task API Checkpoint's plan for `runc checkpoint`, and the CRIU configuration of a container's files."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from kuasar.common import runc_checkpoint as rc
from kuasar.common.api.containerd.runc.options import oci_pb2 as runc_options
from kuasar.common.errors import FailedPrecondition, InvalidArgument


def options(**fields) -> any_pb2.Any:
    return any_pb2.Any(type_url=rc.CHECKPOINT_OPTIONS_TYPE_URL,
                       value=runc_options.CheckpointOptions(**fields).SerializeToString())


def test_no_options_leave_the_container_running_with_criu_files_among_the_images() -> None:
    plan = rc.plan_checkpoint("/run/ctrd-checkpoint1", any_pb2.Any(), terminal=False)
    assert plan.runc_args("c1") == ["checkpoint", "--image-path", "/run/ctrd-checkpoint1",
                                    "--work-path", "/run/ctrd-checkpoint1", "--leave-running", "c1"]


def test_runc_options_are_followed_and_their_image_path_wins() -> None:
    plan = rc.plan_checkpoint("/given", options(exit=True, open_tcp=True, external_unix_sockets=True,
                                                file_locks=True, empty_namespaces=["network", "ipc"],
                                                cgroups_mode="soft", image_path="/img", work_path="/work"),
                              terminal=False)
    assert plan.runc_args("c1") == ["checkpoint", "--image-path", "/img", "--work-path", "/work",
                                    "--tcp-established", "--ext-unix-sk", "--file-locks", "--empty-ns", "network",
                                    "--empty-ns", "ipc", "--manage-cgroups-mode", "soft", "c1"]
    # A type URL with containerd's "types.containerd.io/" prefix names the same message.
    prefixed = options(exit=True)
    prefixed.type_url = "types.containerd.io/" + rc.CHECKPOINT_OPTIONS_TYPE_URL
    assert not rc.plan_checkpoint("/p", prefixed, terminal=False).leave_running


def test_a_terminal_container_is_a_shell_job() -> None:
    assert "--shell-job" in rc.plan_checkpoint("/p", any_pb2.Any(), terminal=True).flags
    assert "--shell-job" in rc.plan_checkpoint("/p", options(terminal=True), terminal=False).flags
    assert "--shell-job" not in rc.plan_checkpoint("/p", any_pb2.Any(), terminal=False).flags


@pytest.mark.parametrize(("path", "opts", "message"), [
    ("", any_pb2.Any(), "no path"),
    ("relative/dir", any_pb2.Any(), "not absolute"),
    ("/p", options(work_path="work"), "work path 'work' is not absolute"),
    ("/p", options(cgroups_mode="sometimes"), "cgroups mode 'sometimes'"),
    ("/p", any_pb2.Any(type_url="containerd.runc.v1.Options", value=b""), "not runc's"),
    ("/p", any_pb2.Any(type_url=rc.CHECKPOINT_OPTIONS_TYPE_URL, value=b"\xff\xff"), "undecodable"),
])
def test_bad_requests_are_invalid_arguments(path: str, opts: any_pb2.Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        rc.plan_checkpoint(path, opts, terminal=False)


def test_the_criu_config_named_in_the_spec_is_always_ours(tmp_path: Path) -> None:
    ours = str(tmp_path / rc.CRIU_CONFIG_NAME)
    spec: dict = {}
    assert rc.use_criu_config(spec, tmp_path) and spec["annotations"][rc.CRIU_CONFIG_ANNOTATION] == ours
    assert not rc.use_criu_config(spec, tmp_path)  # already there: nothing to write back
    # One the spec brings (a pod annotation let through) could run scripts as root: replaced, as is
    # runc's "" (no file at all), which would leave containerd's FIFOs undumpable.
    for given in ("/var/lib/somewhere/evil.conf", ""):
        theirs = {"annotations": {rc.CRIU_CONFIG_ANNOTATION: given, "other": "kept"}}
        assert rc.use_criu_config(theirs, tmp_path)
        assert theirs["annotations"] == {rc.CRIU_CONFIG_ANNOTATION: ours, "other": "kept"}
    broken: dict = {"annotations": None}
    assert rc.use_criu_config(broken, tmp_path) and broken["annotations"] == {rc.CRIU_CONFIG_ANNOTATION: ours}


def test_files_on_mounts_outside_the_containers_mount_namespace_are_external(tmp_path: Path) -> None:
    # A process in a mount namespace of its own sees copies of our mounts, under other mount ids: the
    # FIFO and the file we hold are, for it, on mounts it does not have (as containerd's FIFOs are for a
    # container); a pipe is not a file on a mount at all.
    init = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "60"])
    fifo, regular = tmp_path / "stdout", tmp_path / "file"
    os.mkfifo(fifo)
    regular.write_text("x")
    fds = [os.open(fifo, os.O_RDWR), os.open(regular, os.O_RDONLY), *os.pipe()]
    try:
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{init.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline, "unshare did not enter its mount namespace"
            time.sleep(0.01)
        found = rc.external_files([os.getpid()], init.pid)
        expected = {f"file[{rc._fd_mount_id(os.getpid(), str(fd)):x}:{os.fstat(fd).st_ino:x}]" for fd in fds[:2]}
        assert expected <= found
        pipe_inodes = {f":{os.fstat(fd).st_ino:x}]" for fd in fds[2:]}
        assert not [ext for ext in found if any(ext.endswith(inode) for inode in pipe_inodes)]
        # In its own mount namespace nothing of ours is external.
        assert rc.external_files([os.getpid()], os.getpid()) == set()
        config = tmp_path / rc.CRIU_CONFIG_NAME
        rc.write_criu_config(config, expected)
        assert config.read_text().splitlines() == [f"external {ext}" for ext in sorted(expected)]
        assert config.stat().st_mode & 0o777 == 0o600
    finally:
        for fd in fds:
            os.close(fd)
        init.kill()
        init.wait()


def test_criu_missing_from_the_path_is_a_failed_precondition(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FailedPrecondition, match="criu is not on the task server's PATH"):
        rc.require_criu()


def test_criu_errors_come_from_its_dump_log(tmp_path: Path) -> None:
    plan = rc.plan_checkpoint(str(tmp_path), any_pb2.Any(), terminal=False)
    assert rc.criu_errors(plan) == ""
    (tmp_path / rc.DUMP_LOG).write_text("(00.01) Warn ok\n(00.02) Error (a.c:1): first\n(00.03) Info\n"
                                        "(00.04) Error (b.c:2): second\n")
    assert rc.criu_errors(plan) == "(00.02) Error (a.c:1): first; (00.04) Error (b.c:2): second"


def test_a_restore_hands_criu_the_new_stdio_for_the_external_files_the_checkpoint_recorded(tmp_path: Path) -> None:
    # Checkpoint records which of the init's fds 0-2 were external files; the restore's CRIU
    # configuration maps each to the fd runc gives CRIU (the new container's stdio).
    (tmp_path / "inventory.img").write_bytes(b"")
    rc.write_external_stdio(str(tmp_path), {1: "file[1a:2b]", 2: "file[1a:2c]"})
    plan = rc.plan_restore(str(tmp_path))
    assert plan.inherit == {1: "file[1a:2b]", 2: "file[1a:2c]"}
    assert plan.runc_args() == ["--image-path", str(tmp_path), "--work-path", str(tmp_path)]
    config = tmp_path / rc.CRIU_CONFIG_NAME
    rc.write_criu_config(config, inherit=plan.inherit)
    assert config.read_text().splitlines() == ["inherit-fd fd[1]:file[1a:2b]", "inherit-fd fd[2]:file[1a:2c]"]
    # A checkpoint without the record (its stdio were pipes, which runc hands over itself): nothing to map.
    (tmp_path / rc.EXTERNAL_STDIO_RECORD).unlink()
    assert rc.plan_restore(str(tmp_path)).inherit == {}
    (tmp_path / rc.RESTORE_LOG).write_text("(00.01) Error (files.c:9): no file[1a:2b]\n")
    assert rc.criu_errors(plan) == "(00.01) Error (files.c:9): no file[1a:2b]"


def test_the_stdio_of_a_container_is_recorded_when_it_is_external(tmp_path: Path) -> None:
    # fd 1 of a process in a mount namespace of its own is a FIFO of ours: external; its fd 0 a pipe: not.
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    holder = os.open(fifo, os.O_RDWR)
    init = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "60"],
                            stdin=subprocess.PIPE, stdout=holder, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{init.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline, "unshare did not enter its mount namespace"
            time.sleep(0.01)
        stdio = rc.external_stdio(init.pid)
        assert list(stdio) == [1]
        assert stdio[1].endswith(f":{os.fstat(holder).st_ino:x}]") and rc.EXTERNAL_FILE_ID.fullmatch(stdio[1])
    finally:
        init.kill()
        init.wait()
        os.close(holder)


@pytest.mark.parametrize("record, message", [
    (b"not json", "unreadable"),
    (b'{"3": "file[1:2]"}', "not a map of standard fds"),
    (b'{"1": "file[1:2]\\naction-script /x"}', "not a map of standard fds"),
    (b'{"1": "file[1:2]\\n"}', "not a map of standard fds"),
    (b'["file[1:2]"]', "not a map of standard fds"),
])
def test_a_record_that_is_not_ours_is_refused(tmp_path: Path, record: bytes, message: str) -> None:
    # Its values become lines of CRIU's configuration, which could otherwise run a script as root.
    (tmp_path / "inventory.img").write_bytes(b"")
    (tmp_path / rc.EXTERNAL_STDIO_RECORD).write_bytes(record)
    with pytest.raises(InvalidArgument, match=message):
        rc.plan_restore(str(tmp_path))


@pytest.mark.parametrize("path, message", [("relative/dir", "not absolute"), ("/no/such/dir", "no CRIU checkpoint")])
def test_a_restore_from_what_is_no_checkpoint_is_an_invalid_argument(path: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        rc.plan_restore(path)
