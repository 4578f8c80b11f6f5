"""vm-agent's Task backend (kuasar.vmagent.tasks) without a VM: what it refuses in a rootfs, and what a
failed Create leaves behind in the guest (files in its tmpfs, pipes in PID 1)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types import mount_pb2
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.errors import InvalidArgument, KuasarError
from kuasar.common.reaper import Reaper
from kuasar.common.runc_tasks import RuncContainer, RuncProcess
from kuasar.common.streaming_io import StreamHub
from kuasar.common.ttrpc import Context
from kuasar.vmagent.events import EventQueue
from kuasar.vmagent.tasks import GuestTasks
from tests.support.aio import run_bounded as run

# A runc whose create fails after writing its error to --log, as a real one does.
FAILING_RUNC = """#!/bin/sh
while [ $# -gt 0 ]; do
    if [ "$1" = --log ]; then
        echo '{"level":"error","msg":"runc create failed"}' >> "$2"
    fi
    shift
done
exit 1
"""






def guest_tasks(root: Path, runc: str = "/nonexistent/runc") -> GuestTasks:
    (root / "share" / "c1").mkdir(parents=True)
    (root / "share" / "c1" / "config.json").write_text("{}")
    return GuestTasks(Reaper(), StreamHub(), EventQueue(), root / "state", str(root / "share"), runc_binary=runc)


def create_context() -> Context:
    return Context("containerd.task.v3.Task", "Create", {}, None, None, 1)


@pytest.mark.parametrize("mount", [
    mount_pb2.Mount(type="bind", source="etc", options=["rbind"]),
    mount_pb2.Mount(type="none", source="etc", options=["bind", "ro"]),
])
def test_relative_bind_source_is_refused(tmp_path: Path, mount: mount_pb2.Mount) -> None:
    # Only sources starting with "/" were checked against the shared directory, while mount(2) takes a
    # relative one from the agent's working directory: "etc" bound the guest's /etc into the container.
    tasks = guest_tasks(tmp_path)
    with pytest.raises(InvalidArgument, match="absolute"):
        tasks._check_rootfs_paths([mount])


def test_overlay_source_is_a_label_not_a_path(tmp_path: Path) -> None:
    tasks = guest_tasks(tmp_path)
    lower = tmp_path / "share" / "c1" / "lower"
    tasks._check_rootfs_paths([mount_pb2.Mount(type="overlay", source="overlay", options=[f"lowerdir={lower}"])])


def test_failed_create_removes_the_containers_files(tmp_path: Path) -> None:
    # A failed Create left <state>/<id>/ and runc's log.json in it behind, in the guest's memory.
    runc = tmp_path / "runc"
    runc.write_text(FAILING_RUNC)
    runc.chmod(0o755)
    tasks = guest_tasks(tmp_path, str(runc))

    async def scenario() -> None:
        tasks.reaper.install()  # runc's exits
        with pytest.raises(KuasarError):
            await tasks.create(task.CreateTaskRequest(id="c1"), create_context())

    run(scenario())
    assert not (tmp_path / "state" / "c1").exists()
    assert "c1" not in tasks.containers


def test_create_refused_for_its_stdio_leaves_no_pipe_open(tmp_path: Path) -> None:
    # stdout named like an input stream is refused after stdin's pipe was made: that pipe stayed open.
    tasks = guest_tasks(tmp_path)

    async def scenario() -> None:
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(InvalidArgument):
            await tasks.create(task.CreateTaskRequest(
                id="c1", stdin="x://?streaming_id=c1-stdin", stdout="x://?streaming_id=c1-out-stdin"),
                create_context())
        assert set(os.listdir("/proc/self/fd")) == before

    run(scenario())
    assert not (tmp_path / "state" / "c1").exists()


def test_a_console_socket_path_does_not_grow_with_the_container_id(tmp_path: Path) -> None:
    # It was made under <state>/<id>/: in the guest (/run/vmagent/state) an id over 68 characters (76
    # are allowed) passed the 107 bytes of a unix socket path, and a terminal Create or exec Start
    # failed with UNKNOWN.
    tasks = guest_tasks(tmp_path)
    paths = [tasks._console_socket(SimpleNamespace(id=cid, files=tasks.state_dir / cid)) for cid in ("c", "c" * 76)]
    assert len(paths[0].name) == len(paths[1].name) and paths[0].parent == paths[1].parent == tasks.state_dir


def test_pids_of_a_stopped_container_name_its_dead_init(tmp_path: Path) -> None:
    # An empty list made containerd, reloading its tasks after a restart, delete the task as a leaked
    # shim (shim_load.go): an exit that happened while it was down became 255/Unknown.
    tasks = guest_tasks(tmp_path)
    io = SimpleNamespace(stdin="", stdout="", stderr="", terminal=False)
    init = RuncProcess("", io, pid=4321, status=types.STOPPED)
    tasks.containers["c1"] = RuncContainer("c1", tmp_path, files=tmp_path, namespace="k8s.io", init=init)
    pids = run(tasks.pids(task.PidsRequest(id="c1"), create_context()))
    assert [p.pid for p in pids.processes] == [4321]
