"""pod_leftovers: what a task server records of each pod, and the sweep a fresh task server makes; and
proc_stat, which tells the pod process it recorded from a later one given the same pid."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kuasar.common import cgroups, pod_leftovers, pod_service, state
from kuasar.common.api.kuasar.pods.v1 import pods_pb2 as pods_pb
from kuasar.common.pod_files import PODS_DIR
from kuasar.common.pod_leftovers import PodLeftovers, sweep
from kuasar.common.proc_stat import exited, start_time, stat_fields
from kuasar.common.reaper import Reaper
from tests.support.cgroupfs import cgroup, empty, stand_in_cgroupfs


def test_the_start_time_survives_a_command_name_with_spaces_and_parentheses(tmp_path: Path) -> None:
    odd = tmp_path / "a b) c"
    odd.symlink_to("/bin/sleep")
    child = subprocess.Popen([str(odd), "30"])
    try:
        stat = Path(f"/proc/{child.pid}/stat").read_text()
        assert "(a b) c)" in stat
        assert start_time(child.pid) == int(stat.rsplit(")", 1)[1].split()[19]) > 0
    finally:
        child.kill()
        child.wait()
    assert start_time(child.pid) == 0  # gone


def test_the_sweep_ends_recorded_pods_and_nothing_else(tmp_path: Path) -> None:
    recorded = subprocess.Popen(["sleep", "30"])
    stranger = subprocess.Popen(["sleep", "30"])  # a record whose start time is not this process's
    cgroup_dirs = [tmp_path / "cg" / "parent", tmp_path / "cg" / "parent" / "pod"]
    cgroup_dirs[1].mkdir(parents=True)
    try:
        PodLeftovers(recorded.pid, start_time(recorded.pid), [str(d) for d in cgroup_dirs]).write(
            tmp_path / PODS_DIR / "a")
        PodLeftovers(stranger.pid, start_time(stranger.pid) + 1).write(tmp_path / PODS_DIR / "b")
        (tmp_path / PODS_DIR / "c").mkdir()
        (tmp_path / PODS_DIR / "c" / pod_leftovers.RECORD_FILE).write_text('{"pid": 1')  # torn by a crash
        assert asyncio.run(sweep(tmp_path)) == 2
        assert recorded.wait(timeout=5) == -9
        assert stranger.poll() is None
        assert not (tmp_path / "cg" / "parent").exists()
        assert sorted(p.parent.name for p in (tmp_path / PODS_DIR).glob(f"*/{pod_leftovers.RECORD_FILE}")) == ["c"]
        assert asyncio.run(sweep(tmp_path)) == 0  # nothing twice
    finally:
        for child in (recorded, stranger):
            child.kill()
            child.wait()


def test_the_sweep_kills_every_recorded_pod_before_it_waits_for_any(tmp_path: Path, monkeypatch) -> None:
    # A dead task server may leave hundreds of pods: waiting for each one's exit in turn made the
    # sweep (which runs before its successor answers anything) as slow as the sum of those waits.
    children = [subprocess.Popen(["sleep", "30"]) for _ in range(3)]
    steps: list[tuple[str, int]] = []
    kill, wait_gone = pod_leftovers.strays.kill, pod_leftovers.strays.wait_gone

    async def recorded_wait(processes: list[tuple[int, int]]) -> None:
        steps.extend(("wait", pid) for pid, _ in processes)
        await wait_gone(processes)

    monkeypatch.setattr(pod_leftovers.strays, "kill",
                        lambda pid, start: (steps.append(("kill", pid)), kill(pid, start)))
    monkeypatch.setattr(pod_leftovers.strays, "wait_gone", recorded_wait)
    try:
        for index, child in enumerate(children):
            PodLeftovers(child.pid, start_time(child.pid)).write(tmp_path / PODS_DIR / f"pod{index}")
        assert asyncio.run(sweep(tmp_path)) == 3
        pids = [child.pid for child in children]
        assert steps == [("kill", pid) for pid in pids] + [("wait", pid) for pid in pids]
        assert [child.wait(timeout=5) for child in children] == [-9, -9, -9]
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_the_sweep_ends_pod_processes_whose_record_was_never_written(tmp_path: Path) -> None:
    # A task server killed between a pod's spawn and the write of its record: only the process's own
    # command line (kuasar-pause --owner <pod dir>) says whose it is.
    # The interpreter itself, not "python3": a pyenv shim execs three times on the way, and a command
    # line read in the middle of an exec is empty, so the sweep could miss it (1 run in 7 here).
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "--owner",
                             str(tmp_path / PODS_DIR / ("o" * 64))])
    theirs = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "--owner",
                               str(tmp_path / "elsewhere" / PODS_DIR / ("o" * 64))])
    try:
        for child in (ours, theirs):  # python has put its argv in place
            deadline = time.monotonic() + 5
            while b"--owner" not in Path(f"/proc/{child.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
                time.sleep(0.01)
        assert asyncio.run(sweep(tmp_path)) == 0  # no record
        assert ours.wait(timeout=5) == -9
        assert theirs.poll() is None
    finally:
        for child in (ours, theirs):
            child.kill()
            child.wait()


def test_a_process_whose_first_thread_exited_while_another_runs_has_not_exited() -> None:
    # Its first thread shows Z at once; its other threads (a killed QEMU's, still ending) keep its cgroups busy.
    child = subprocess.Popen([sys.executable, "-c", "import ctypes, threading, time; "
                              "threading.Thread(target=time.sleep, args=(30,)).start(); time.sleep(0.05); "
                              "ctypes.CDLL(None).syscall(60, 0)"])  # SYS_exit: this thread alone
    try:
        deadline = time.monotonic() + 5
        while stat_fields(child.pid)[0] != b"Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stat_fields(child.pid)[0] == b"Z"
        assert not exited(child.pid)
        child.kill()
        deadline = time.monotonic() + 5
        while not exited(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert exited(child.pid)  # a zombie with no thread left, not reaped yet
    finally:
        child.kill()
        child.wait()
    assert exited(child.pid)



@pytest.fixture
def cgroupfs(monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_cgroupfs(monkeypatch)


def test_the_sweep_empties_a_pods_own_cgroups_and_keeps_its_record_while_they_are_in_use(
        tmp_path: Path, cgroupfs: None) -> None:
    # The record was forgotten even when the pod's cgroups could not be removed (a process still in
    # one: an exec, a container process without its death signal yet), and nothing ever tried again.
    left_in_pod, others = subprocess.Popen(["sleep", "30"]), subprocess.Popen(["sleep", "30"])
    try:
        parent = cgroup(tmp_path / "cg" / "parent")  # made for the pod, and since shared with another's pod
        leaf = cgroup(parent / "pod1")
        below = cgroup(leaf / "c1", left_in_pod.pid)
        cgroup(parent / "another-pod", others.pid)
        PodLeftovers(0, 0, [str(parent), str(leaf)]).write(tmp_path / PODS_DIR / "pod1")
        assert asyncio.run(sweep(tmp_path)) == 1
        assert left_in_pod.wait(timeout=5) == -9  # killed, being below the pod's own cgroup
        assert others.poll() is None  # not ours: only in a parent made for the pod
        assert leaf.exists()
        assert (tmp_path / PODS_DIR / "pod1" / pod_leftovers.RECORD_FILE).exists(), "kept, for another try"

        empty(below)
        assert asyncio.run(sweep(tmp_path)) == 1
        assert not leaf.exists()
        assert parent.exists()  # in use by the other pod: left to it, and no reason to keep the record
        assert not (tmp_path / PODS_DIR / "pod1" / pod_leftovers.RECORD_FILE).exists()
    finally:
        for child in (left_in_pod, others):
            child.kill()
            child.wait()


def test_a_kept_record_is_tried_again_at_the_pods_delete(
        tmp_path: Path, cgroupfs: None, running: list[subprocess.Popen]) -> None:
    left_in_pod = subprocess.Popen(["sleep", "30"])
    running.append(left_in_pod)
    leaf = cgroup(tmp_path / "cg" / "parent" / "pod1", left_in_pod.pid)
    PodLeftovers(0, 0, [str(leaf)]).write(tmp_path / PODS_DIR / "pod1")
    assert asyncio.run(pod_leftovers.retry(tmp_path / PODS_DIR / "pod1")) is False
    assert left_in_pod.wait(timeout=5) == -9
    empty(leaf)
    assert asyncio.run(pod_leftovers.retry(tmp_path / PODS_DIR / "pod1")) is True
    assert not leaf.exists()
    assert not (tmp_path / PODS_DIR / "pod1" / pod_leftovers.RECORD_FILE).exists()
    assert asyncio.run(pod_leftovers.retry(tmp_path / PODS_DIR / "pod2")) is True  # no record: nothing left


def test_a_parent_made_for_a_pod_is_never_emptied_it_may_be_another_pods(
        tmp_path: Path, cgroupfs: None, running: list[subprocess.Popen]) -> None:
    # Under v1 a pod has no leaf: its process lives in CRI's cgroup_parent. One made for pod A is shared by
    # a pod made with the same parent, or made since a restart (it found the parent there and recorded
    # nothing): A's sweep or retried Delete SIGKILLed that live pod, and kept A's record while it lived.
    live_pod = subprocess.Popen(["sleep", "30"])
    running.append(live_pod)
    parent = cgroup(tmp_path / "cg" / "kuasar" / "pods", live_pod.pid)
    PodLeftovers(0, 0, [str(parent.parent), str(parent)]).write(tmp_path / PODS_DIR / "pod-a")
    assert asyncio.run(pod_leftovers.retry(tmp_path / PODS_DIR / "pod-a")) is True
    assert live_pod.poll() is None, "another pod's process in the shared parent was killed"
    assert parent.exists()  # left to the pod that uses it
    assert not (tmp_path / PODS_DIR / "pod-a" / pod_leftovers.RECORD_FILE).exists()


def test_killing_what_is_in_a_cgroup_thaws_it_first(tmp_path: Path) -> None:
    # A paused container's processes, left by a dead task server, do not act on SIGKILL while frozen:
    # their cgroups stayed busy for good.
    v1 = cgroup(tmp_path / "freezer" / "pod")
    (v1 / "freezer.state").write_text("FROZEN")
    v2 = cgroup(tmp_path / "unified" / "pod" / "c1")
    (v2 / "cgroup.freeze").write_text("1")
    cgroups.kill_members(v1 / "cgroup.procs")
    cgroups.kill_members(v2.parent / "cgroup.procs")
    assert (v1 / "freezer.state").read_text() == "THAWED" and (v2 / "cgroup.freeze").read_text() == "0"


class Crash(Exception):
    """Where the task server dies in these tests."""


def test_a_pods_cgroups_and_shm_are_recorded_before_they_are_made(tmp_path: Path, monkeypatch) -> None:
    # The cgroups were made before pod.json was first written, and /dev/shm mounted before it: a task
    # server that died in between left both to nobody (the sweep found no record, Delete got NotFound).
    root = tmp_path / "cgroupfs"
    root.mkdir()
    monkeypatch.setattr(cgroups, "hierarchy_roots", lambda: [root])
    monkeypatch.setattr(cgroups, "is_unified", lambda: True)
    monkeypatch.setattr(cgroups, "enable_controllers", lambda path: None)
    record = tmp_path / "dir" / PODS_DIR / "p1" / pod_leftovers.RECORD_FILE
    seen: dict[str, object] = {}

    def mkdir(directory: Path, *args: object, **kwargs: object) -> None:
        if directory.is_relative_to(root):
            seen.setdefault("at first mkdir", record.exists() and json.loads(record.read_text()))
        real_mkdir(directory, *args, **kwargs)

    real_mkdir = Path.mkdir
    monkeypatch.setattr(Path, "mkdir", mkdir)

    def mount_tmpfs(path: Path, size: int) -> None:
        seen["at mount"] = json.loads(record.read_text())
        raise Crash

    monkeypatch.setattr(pod_service.mounts, "mount_tmpfs", mount_tmpfs)

    async def holder(pod_id: str, namespaces: object, hostname: str = "", meanwhile=None, owner=None) -> int:
        meanwhile()
        raise AssertionError("not reached")

    monkeypatch.setattr(pod_service, "start_pod_holder", holder)
    service = pod_service.PodService(Reaper(), containers=None, directory=tmp_path / "dir")
    with pytest.raises(Crash):
        asyncio.run(service.create(pods_pb.CreatePodRequest(id="p1", cgroup_parent="/kubepods/podX",
                                                            shm_size=1 << 20), None))  # type: ignore[arg-type]
    made = [str(root / "kubepods"), str(root / "kubepods/podX"), str(root / "kubepods/podX/p1")]
    shm = str(tmp_path / "dir" / PODS_DIR / "p1" / "shm")
    assert seen["at first mkdir"] == {"pid": 0, "start": 0, "cgroups": made, "shm": shm}
    assert seen["at mount"]["cgroups"] == made and seen["at mount"]["shm"] == shm  # type: ignore[index]


def test_a_record_written_again_is_the_old_or_the_new_never_torn(tmp_path: Path, monkeypatch) -> None:
    # Written again in place (O_TRUNC, then write), a crash between the two left an empty pod.json: the
    # sweep skipped it as unreadable and what the old one listed was left for good.
    directory = tmp_path / PODS_DIR / "p1"
    PodLeftovers(0, 0, ["/sys/fs/cgroup/x/p1"], "/run/x/shm").write(directory)

    def dies_writing(fd: int, data: bytes) -> None:
        raise Crash

    monkeypatch.setattr(state, "_write_all", dies_writing)
    with pytest.raises(Crash):
        PodLeftovers(1234, 99, ["/sys/fs/cgroup/x/p1"], "/run/x/shm").write(directory)
    assert pod_leftovers.read_record(directory / pod_leftovers.RECORD_FILE, PodLeftovers) == PodLeftovers(
        0, 0, ["/sys/fs/cgroup/x/p1"], "/run/x/shm")
    assert sorted(p.name for p in directory.iterdir()) == [pod_leftovers.RECORD_FILE]
