"""quark-sandboxer pieces that need neither containerd nor gVisor: config, specs, network choice, stats,
the Kuasar-style container layout, and the Quark backend driven directly against the FAKE `quark`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kuasar.common.api.containerd.cgroups.v1 import metrics_pb2 as v1
from kuasar.common.api.containerd.cgroups.v2 import metrics_pb2 as v2
from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.config import DaemonConfig
from kuasar.common.controller import new_record
from kuasar.common.errors import FailedPrecondition, InvalidArgument, RuntimeFailure
from kuasar.common.pod_holder import pause_program
from kuasar.quark import gvisor_net, gvisor_pod, gvisor_stats, quark_containers
from kuasar.quark.config import QuarkConfig
from kuasar.quark.quark_sandboxer import QuarkSandboxer
from kuasar.quark.quark_spec import sandbox_spec
from kuasar.quark.runsc import last_error

REPO = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, namespaces)")


# -- config ------------------------------------------------------------------------------------------
def test_config_defaults_and_validation() -> None:
    assert QuarkConfig.from_section({}) == QuarkConfig()
    assert QuarkConfig.from_section({"backend": "runsc", "platform": "ptrace"}).platform == "ptrace"
    assert QuarkConfig.from_section({"control_timeout": 5}).control_timeout == 5
    for bad in ({"backend": "kata"}, {"network": "bridge"}, {"host_network": "sandbox"}, {"nope": 1},
                {"runsc": ""}, {"debug": "yes"}, {"control_timeout": 0}, {"control_timeout": -1},
                {"control_timeout": "30"}, {"control_timeout": True}, {"control_timeout": float("inf")}):
        with pytest.raises(InvalidArgument):
            QuarkConfig.from_section(bad)


# -- Quark's sandbox spec ------------------------------------------------------------------------------
def test_sandbox_spec_follows_kuasar() -> None:
    config = cri.PodSandboxConfig(hostname="web")
    r = config.linux.resources
    r.memory_limit_in_bytes, r.cpu_shares, r.cpu_quota, r.cpu_period = 64 << 20, 512, 50000, 100000
    r.cpuset_cpus = "0-1"
    r.hugepage_limits.add(page_size="2MB", limit=1 << 21)
    spec = sandbox_spec(config, "/var/run/netns/cni-1")
    assert spec["root"] == {"path": "rootfs"}
    assert spec["linux"]["namespaces"] == [{"type": "network", "path": "/var/run/netns/cni-1"}]
    assert spec["linux"]["resources"]["memory"] == {"limit": 64 << 20}
    assert spec["linux"]["resources"]["cpu"] == {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1"}
    assert spec["linux"]["resources"]["hugepageLimits"] == [{"pageSize": "2MB", "limit": 1 << 21}]
    bare = sandbox_spec(cri.PodSandboxConfig(), "")
    assert "namespaces" not in bare["linux"] and "resources" not in bare["linux"]


# -- gVisor -----------------------------------------------------------------------------------------
def test_network_mode_choice() -> None:
    assert gvisor_net.network_mode(False, "auto", "none", True) == "none"
    assert gvisor_net.network_mode(False, "sandbox", "host", True) == "host"
    assert gvisor_net.network_mode(True, "auto", "none", True) == "sandbox"
    assert gvisor_net.network_mode(True, "auto", "none", False) == "host"
    assert gvisor_net.network_mode(True, "sandbox", "none", False) == "sandbox"
    assert gvisor_net.netstack_usable(20250101, 20240801)


def test_root_spec_and_pause_rootfs(tmp_path: Path) -> None:
    spec = gvisor_pod.root_spec("pod1", tmp_path, netns_path="/proc/1/ns/net", hostname="h",
                                cgroups_path="/kubepods/pod1")
    assert spec["annotations"] == {gvisor_pod.CONTAINER_TYPE: "sandbox", gvisor_pod.SANDBOX_ID: "pod1"}
    assert {"type": "network", "path": "/proc/1/ns/net"} in spec["linux"]["namespaces"]
    assert spec["root"] == {"path": str(tmp_path), "readonly": True}
    assert spec["linux"]["cgroupsPath"] == "/kubepods/pod1"
    assert not any(ns["type"] == "network" for ns in gvisor_pod.root_spec("p", tmp_path)["linux"]["namespaces"])
    assert not gvisor_pod.is_static_elf(tmp_path)
    if gvisor_pod.is_static_elf(Path(gvisor_pod.DEFAULT_BUSYBOX)):
        rootfs = gvisor_pod.ensure_pause_rootfs(tmp_path)
        assert (rootfs / "bin" / "busybox").is_file() and os.readlink(rootfs / "bin" / "sleep") == "busybox"
        assert gvisor_pod.ensure_pause_rootfs(tmp_path) == rootfs
    not_static = tmp_path / "sh"
    not_static.write_bytes(b"#!/bin/sh\n")
    with pytest.raises(FailedPrecondition):
        gvisor_pod.ensure_pause_rootfs(tmp_path / "other", str(not_static))


def test_the_pods_root_runs_kuasar_pause_to_reap_orphans_where_it_is_installed(tmp_path: Path) -> None:
    # busybox `sleep` as the sandbox's PID 1 reaped nothing: in a pod sharing its PID namespace every
    # orphan stayed a zombie until the pod went.
    pause = pause_program()
    if pause is None or not gvisor_pod.is_static_elf(Path(gvisor_pod.DEFAULT_BUSYBOX)):
        pytest.skip("kuasar-pause (make setup) or a static busybox is missing")
    plain = gvisor_pod.ensure_pause_rootfs(tmp_path)
    assert gvisor_pod.root_spec("p", plain)["process"]["args"] == ["/bin/sleep", gvisor_pod.SLEEP_SECONDS]
    rootfs = gvisor_pod.ensure_pause_rootfs(tmp_path, pause=pause)  # made again, with it
    assert rootfs == plain and (rootfs / gvisor_pod.PAUSE_IN_ROOTFS).read_bytes() == Path(pause).read_bytes()
    assert gvisor_pod.root_spec("p", rootfs)["process"]["args"] == ["/bin/kuasar-pause"]
    (rootfs / gvisor_pod.PAUSE_IN_ROOTFS).write_bytes(b"an older build")  # an upgrade brings a new one
    assert gvisor_pod.ensure_pause_rootfs(tmp_path, pause=pause) == rootfs
    assert (rootfs / gvisor_pod.PAUSE_IN_ROOTFS).read_bytes() == Path(pause).read_bytes()


def test_runsc_stats_become_cgroup_metrics() -> None:
    data = {"cpu": {"usage": {"total": 2_000_000, "user": 1_000_000, "percpu": [1, 2]}},
            "memory": {"usage": {"usage": 4096, "limit": 8192}}, "pids": {"current": 3}}
    packed = gvisor_stats.to_metrics(data)
    if packed.type_url.endswith("v2.Metrics"):
        m2 = v2.Metrics.FromString(packed.value)
        assert (m2.cpu.usage_usec, m2.memory.usage, m2.pids.current) == (2000, 4096, 3)
    else:
        m1 = v1.Metrics.FromString(packed.value)
        assert (m1.cpu.usage.total, m1.memory.usage.usage, m1.pids.current) == (2_000_000, 4096, 3)
        assert list(m1.cpu.usage.per_cpu) == [1, 2]
    assert gvisor_stats.to_metrics({}).type_url == packed.type_url  # nothing known: zeros, same shape


def test_runsc_log_error_is_the_last_error_line(tmp_path: Path) -> None:
    log = tmp_path / "runsc.log"
    log.write_text('{"msg":"old","level":"error"}\nnot json\n{"msg":"reading spec: boom","level":"error"}\n'
                   '{"msg":"info","level":"info"}\n')
    assert last_error(log) == "reading spec: boom"
    assert last_error(log, offset=log.stat().st_size) == ""
    assert last_error(tmp_path / "missing") == ""


# -- Kuasar-style container layout (Controller.Update + extensions.tasks) -------------------------------
def test_parse_tasks_validates() -> None:
    assert quark_containers.parse_tasks(None) == {}
    assert list(quark_containers.parse_tasks('{"tasks": [{"task_id": "c1"}]}')) == ["c1"]
    for bad in ("nope", '{"tasks": 3}', '{"tasks": [{"task_id": "../x"}]}', '{"tasks": [1]}'):
        with pytest.raises(InvalidArgument):
            quark_containers.parse_tasks(bad)


@needs_root
def test_container_layout_binds_rootfs_mounts_and_fifos(tmp_path: Path) -> None:
    image = tmp_path / "image"
    (image / "etc").mkdir(parents=True)
    (image / "etc" / "motd").write_text("from-image")
    data = tmp_path / "data"
    data.mkdir()
    (data / "file").write_text("volume")
    fifos = {name: tmp_path / f"c1-{name}" for name in ("stdout", "stderr")}
    for fifo in fifos.values():
        os.mkfifo(fifo)
    bundle = tmp_path / "sandbox"
    state: dict = {}
    layout = quark_containers.QuarkContainers(bundle, state)
    task = {"task_id": "c1", "rootfs": [{"type": "bind", "source": str(image), "options": ["rbind"]}],
            "spec": {"mounts": [{"destination": "/data", "type": "bind", "source": str(data), "options": ["rbind"]},
                                {"destination": "/proc", "type": "proc", "source": "proc"}]},
            "stdout": str(fifos["stdout"]), "stderr": str(fifos["stderr"]), "processes": []}
    try:
        layout.apply({"c1": task})
        cbundle = bundle / "c1"
        assert (cbundle / "rootfs" / "etc" / "motd").read_text() == "from-image"
        assert (cbundle / "rootfs" / "data" / "file").read_text() == "volume"
        assert (cbundle / "stdout").is_fifo() and (cbundle / "stderr").is_fifo()
        assert state["c1"]["io"] == {"stdout": "/c1/stdout", "stderr": "/c1/stderr"}
        written = json.loads((cbundle / "config.json").read_text())
        assert [m["destination"] for m in written["mounts"]] == ["/proc"]  # binds left the spec
        # an exec appears, then goes: its FIFO mounts go with it (Kuasar keeps them until removal)
        exec_fifo = tmp_path / "e1-stdout"
        os.mkfifo(exec_fifo)
        layout.apply({"c1": {**task, "processes": [{"exec_id": "e1", "stdout": str(exec_fifo)}]}})
        assert (cbundle / "e1-stdout").is_fifo()
        layout.apply({"c1": task})
        assert not (cbundle / "e1-stdout").exists()
        layout.apply({})
        assert not cbundle.exists() and state == {}
        assert (data / "file").read_text() == "volume" and (image / "etc" / "motd").exists()
    finally:
        quark_containers.unmount_all_under(bundle)
    assert quark_containers.mounts_under(tmp_path) == []


# -- the Quark backend against the FAKE quark ----------------------------------------------------------
def fake_quark(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "quark"
    path.parent.mkdir()
    path.write_text(f"#!{sys.executable}\nimport runpy, sys\nsys.path.insert(0, {str(REPO)!r})\n"
                    "runpy.run_module('tests.fakes.fake_quark', run_name='__main__')\n")
    path.chmod(0o755)
    return path


def quark_sandboxer(tmp_path: Path, binary: str) -> QuarkSandboxer:
    config = DaemonConfig(listen=tmp_path / "q.sock", dir=tmp_path / "q")
    config.dir.mkdir()
    return quark_sandboxer_at(config, binary)


def quark_sandboxer_at(config: DaemonConfig, binary: str = "/bin/true") -> QuarkSandboxer:
    return QuarkSandboxer(config, QuarkConfig(quark=binary))


def record(sandbox_id: str = "pod1"):
    return new_record(sandbox_id, "quark", "", cri.PodSandboxConfig(hostname="p").SerializeToString(), {}, {}, {})


def test_missing_quark_binary_is_a_clear_error(tmp_path: Path) -> None:
    sandboxer = quark_sandboxer(tmp_path, str(tmp_path / "no-quark"))
    with pytest.raises(FailedPrecondition, match="Quark binary .* not found"):
        asyncio.run(sandboxer.open())


def test_cli_says_which_runtime_binary_is_missing(tmp_path: Path) -> None:
    for backend, key, what in (("runsc", "runsc", "gVisor runsc"), ("quark", "quark", "Quark")):
        config = tmp_path / f"{backend}.toml"
        config.write_text(f'[quark]\nbackend = "{backend}"\n{key} = "{tmp_path}/missing-{key}"\n')
        result = subprocess.run([sys.executable, "-m", "kuasar.quark.cli", "--listen", str(tmp_path / "s.sock"),
                                 "--dir", str(tmp_path / backend), "--config", str(config)],
                                capture_output=True, text=True, timeout=60, cwd=REPO)
        assert result.returncode == 1, result.stderr
        assert f"{what} binary" in result.stderr and "not found" in result.stderr


@needs_root
def test_quark_backend_lifecycle_against_the_fake(tmp_path: Path) -> None:
    from kuasar.quark import quark_sandboxer as module

    sandboxer = quark_sandboxer(tmp_path, str(fake_quark(tmp_path)))

    async def scenario() -> None:
        await sandboxer.open()
        rec = record()
        await sandboxer.create(rec)
        base = sandboxer.base(rec)
        assert json.loads((base / "sandbox" / "config.json").read_text())["hostname"] == "p"
        result = await sandboxer.start(rec)
        # containerd's address is the task relay's, in front of QVisor's own (v2-only) socket
        assert result.address == f"ttrpc+unix://{base}/task.sock" and result.version == 3
        rec.pid = result.pid
        waiter = asyncio.create_task(sandboxer.wait(rec))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        relay = rec.extra["quark"]["relay_pid"]
        # a restarted sandboxer re-attaches to the live daemon (same pid, same start time) and its relay
        for watcher in sandboxer._relay_watchers.values():  # the old sandboxer is gone
            watcher.cancel()
        restarted = QuarkSandboxer(sandboxer.config, sandboxer.quark)
        await restarted.recover([_ready(rec)])
        assert rec.state != "stopped" and rec.extra["quark"]["relay_pid"] == relay
        await asyncio.sleep(0.2)
        assert not waiter.done()
        for watcher in restarted._relay_watchers.values():
            watcher.cancel()
        await sandboxer.stop(rec, 0)
        exit_info = await asyncio.wait_for(waiter, 10)
        assert exit_info.exit_status == 137
        for _ in range(200):  # the relay ends with QVisor's socket
            if not module.is_alive(relay, rec.extra["quark"]["relay_start_time"]):
                break
            await asyncio.sleep(0.05)
        assert not module.is_alive(relay, rec.extra["quark"]["relay_start_time"])
        rec.exited_at_ns = 0
        found_at = time.time_ns()
        await sandboxer.recover([_ready(rec)])
        assert rec.state == "stopped" and rec.exit_status == 255  # dead at recovery: lost
        assert rec.exited_at_ns >= found_at  # when it was found gone, not when it was created
        await sandboxer.shutdown(rec)
        assert not base.exists()

    asyncio.run(scenario())


@needs_root
@pytest.mark.parametrize("while_down", [False, True], ids=["running", "while-the-sandboxer-was-down"])
def test_a_task_relay_that_dies_ends_qvisor(tmp_path: Path, while_down: bool) -> None:
    # containerd takes every container behind a dropped task connection for exited and deletes it; a
    # relay started again left them running in QVisor beside the copies kubelet then started.
    sandboxer = quark_sandboxer(tmp_path, str(fake_quark(tmp_path)))

    async def scenario() -> None:
        await sandboxer.open()
        rec = record()
        await sandboxer.create(rec)
        rec.pid = (await sandboxer.start(rec)).pid
        relay = rec.extra["quark"]["relay_pid"]
        owner = sandboxer
        if while_down:
            for watcher in sandboxer._relay_watchers.values():
                watcher.cancel()
            os.kill(relay, signal.SIGKILL)
            await asyncio.sleep(0.2)
            owner = QuarkSandboxer(sandboxer.config, sandboxer.quark)
            await owner.recover([_ready(rec)])
        else:
            os.kill(relay, signal.SIGKILL)
        exit_info = await asyncio.wait_for(owner.wait(rec), 10)
        assert exit_info.exit_status == 255  # lost, not stopped
        assert rec.extra["quark"]["relay_pid"] == relay  # none started again
        await owner.shutdown(rec)
        assert not sandboxer.base(rec).exists()

    asyncio.run(scenario())


def _ready(rec):
    rec.state = "ready"
    return rec


@needs_root
def test_quark_failure_is_reported_with_its_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sandboxer = quark_sandboxer(tmp_path, str(fake_quark(tmp_path)))
    monkeypatch.setenv("FAKE_QUARK_FAIL", "no KVM here")

    async def scenario() -> None:
        await sandboxer.open()
        rec = record("pod2")
        await sandboxer.create(rec)
        with pytest.raises(RuntimeFailure, match="no KVM here"):
            await sandboxer.start(rec)
        await sandboxer.shutdown(rec)

    asyncio.run(scenario())


@needs_root
def test_quark_a_start_cut_short_by_a_restart_leaves_no_qvisor(tmp_path: Path) -> None:
    # The sandboxer died after `quark sandbox` had started QVisor but before Start was saved: the record on
    # disk is the created one, without QVisor's pid. Removing it at the restart left QVisor running.
    from kuasar.common.controller import SandboxController
    from kuasar.quark.quark_sandboxer import is_alive, process_start_time

    binary = str(fake_quark(tmp_path))

    async def main() -> None:
        first = quark_sandboxer(tmp_path, binary)
        await first.open()
        rec = record("pod3")
        await SandboxController(first, tmp_path / "state").create(rec)
        pid = (await first.start(rec)).pid  # not through the controller: nothing saved of it
        start_time = process_start_time(pid)
        try:
            second = QuarkSandboxer(first.config, first.quark)
            await second.open()
            restarted = SandboxController(second, tmp_path / "state")
            await restarted.recover()
            assert restarted.records == {} and not first.base(rec).exists()
            assert not is_alive(pid, start_time)
        finally:
            if is_alive(pid, start_time):
                os.kill(pid, 9)

    asyncio.run(main())


def test_a_pods_dev_shm_is_one_tmpfs_runsc_shares_by_its_source(tmp_path: Path) -> None:
    root = gvisor_pod.root_spec("p", tmp_path, shm_source="/x/pods/p/shm")
    hint = {k.rsplit(".", 1)[1]: v for k, v in root["annotations"].items() if k.startswith(gvisor_pod.SHM_HINT)}
    assert hint == {"source": "/x/pods/p/shm", "type": "tmpfs", "share": "pod", "options": "rw"}
    assert not any(k.startswith(gvisor_pod.SHM_HINT) for k in gvisor_pod.root_spec("p", tmp_path)["annotations"])
    private = {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "size=65536k"]}
    spec = {"mounts": [dict(private), dict(private, source="dup")]}  # containerd's private tmpfs, and a duplicate
    assert gvisor_pod.use_pod_shm(spec, "/x/pods/p/shm")
    assert spec["mounts"] == [dict(private, source="/x/pods/p/shm")]
    host_ipc = {"mounts": [{"destination": "/dev/shm", "type": "bind", "source": "/dev/shm", "options": ["rbind"]}]}
    assert not gvisor_pod.use_pod_shm(host_ipc, "/x") and host_ipc["mounts"][0]["source"] == "/dev/shm"
    assert not gvisor_pod.use_pod_shm({"mounts": []}, "/x")


def test_stop_kills_qvisor_at_once_whatever_the_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # QVisor forwards every signal but SIGKILL into its guest: a SIGTERM first only cost the whole timeout.
    from kuasar.quark import quark_sandboxer as module

    sent: list[int] = []
    monkeypatch.setattr(module, "_kill", lambda pid, sig=signal.SIGKILL: sent.append(sig))
    monkeypatch.setattr(module, "is_alive", lambda pid, start_time: True)
    sandboxer, rec = quark_sandboxer(tmp_path, "/bin/true"), record()
    rec.extra["quark"] = {"pid": 4242, "start_time": 1}
    started = time.monotonic()
    asyncio.run(sandboxer.stop(rec, 30))
    assert sent == [signal.SIGKILL] and time.monotonic() - started < 5


def test_an_update_naming_tasks_without_the_extension_is_refused(tmp_path: Path) -> None:
    # It read as "no containers" and unmounted every container the sandbox had.
    sandboxer, rec = quark_sandboxer(tmp_path, "/bin/true"), record()
    with pytest.raises(InvalidArgument, match="carries no tasks extension"):
        asyncio.run(sandboxer.update(rec, ["extensions.tasks"]))


@needs_root
def test_qvisor_and_its_relay_run_in_the_pods_cgroup(tmp_path: Path) -> None:
    # Quark ignores the sandbox spec's cgroupsPath: QVisor (the VM, its guest's memory) ran outside the pod's
    # limits, and the pod's metrics were the sandboxer's own cgroup's.
    from kuasar.common import cgroups

    parent = f"kuasar-it-{os.getpid()}-qk"
    sandboxer = quark_sandboxer(tmp_path, str(fake_quark(tmp_path)))
    config = cri.PodSandboxConfig(hostname="p")
    config.linux.cgroup_parent = parent
    rec = new_record("pod1", "quark", "", config.SerializeToString(), {}, {}, {})

    def in_pod_cgroup(pid: int) -> bool:
        return any(path.lstrip("/").startswith(parent) for path in cgroups.proc_cgroups(pid).values())

    async def scenario() -> None:
        await sandboxer.open()
        await sandboxer.create(rec)
        await sandboxer.start(rec)
        state = rec.extra["quark"]
        assert in_pod_cgroup(state["pid"]) and in_pod_cgroup(state["relay_pid"])
        await sandboxer.stop(rec, 0)
        await sandboxer.shutdown(rec)
        assert not any((root / parent).exists() for root in cgroups.hierarchy_roots())

    asyncio.run(scenario())


# -- what a Create leaves when no record of it is saved --------------------------------------------------
def test_a_quark_create_whose_record_was_never_saved_is_removed_at_the_restart(tmp_path: Path) -> None:
    # Create makes <dir>/<id>/sandbox/{config.json,rootfs/dev} before the controller saves the record; a
    # sandboxer killed in between left the directory for good (no type's remove_unrecorded looked at it).
    from kuasar.common.controller import SandboxController

    sandboxer = quark_sandboxer(tmp_path, "/bin/true")
    other_types = [sandboxer.config.dir / "pods" / "p1" / "sandbox", sandboxer.config.dir / "runsc"]
    for path in other_types:  # a gVisor task server's, sharing the directory: not Quark sandboxes
        path.mkdir(parents=True)

    async def scenario() -> None:
        kept = SandboxController(sandboxer, sandboxer.config.dir / "sandboxes")
        await kept.create(record("kept"))
        kept.records["kept"].state = "stopped"  # (a created one is removed at a restart)
        kept.save(kept.records["kept"])
        await sandboxer.create(record("pod1"))  # ... and the sandboxer is killed before the controller saves it
        assert sandboxer.base(record("pod1")).is_dir()
        restarted = SandboxController(quark_sandboxer_at(sandboxer.config), sandboxer.config.dir / "sandboxes")
        await restarted.recover()
        assert list(restarted.records) == ["kept"]

    asyncio.run(scenario())
    assert not sandboxer.base(record("pod1")).exists(), "the sandbox bundle of an unrecorded Create is left"
    assert sandboxer.base(record("kept")).is_dir()
    assert all(path.is_dir() for path in other_types)


def test_a_quark_create_that_fails_leaves_no_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kuasar.quark import quark_sandboxer as module

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "write_atomic", disk_full)
    sandboxer = quark_sandboxer(tmp_path, "/bin/true")
    with pytest.raises(OSError, match="No space left"):
        asyncio.run(sandboxer.create(record()))
    assert list(sandboxer.config.dir.iterdir()) == []


def test_qvisors_cgroup_is_recorded_before_it_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # It was recorded only by Start's own save, after it was made: a sandboxer that died in between left it.
    from kuasar.common import cgroups

    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("")  # a cgroup v2 root
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", root)
    config = cri.PodSandboxConfig(hostname="p")
    config.linux.cgroup_parent = "P"
    rec = new_record("pod1", "quark", "", config.SerializeToString(), {}, {}, {})
    sandboxer = quark_sandboxer(tmp_path, "/bin/true")
    persisted: list[tuple[dict, list[bool]]] = []

    def persist(saved) -> None:
        cgroup = saved.extra["quark"]["cgroup"]
        persisted.append((dict(cgroup, created=list(cgroup["created"])),
                          [Path(directory).exists() for directory in cgroup["created"]]))

    async def no_relay(record, quark_socket: Path) -> Path:
        sandboxer._state(record).update(relay_pid=os.getpid())  # stands for the relay: a live process
        return tmp_path / "relay.sock"

    async def scenario() -> None:
        sandboxer.persist = persist  # type: ignore[method-assign]
        sandboxer._start_relay = no_relay  # type: ignore[method-assign]
        await sandboxer.create(rec)
        base = sandboxer.base(rec)
        (base / "pid").write_text(str(os.getpid()))  # QVisor's, as `quark sandbox` leaves it: a live pid
        listening = socket.socket(socket.AF_UNIX)
        listening.bind(str(base / "quark-task.sock"))
        try:
            quark = await asyncio.create_subprocess_exec("true")
            await sandboxer._started(rec, quark, base / "quark-task.sock", base / "pid", base / "quark.log")
        finally:
            listening.close()

    asyncio.run(scenario())
    made = [str(root / "P"), str(root / "P" / "pod1")]
    assert persisted == [({"path": "P", "created": made}, [False, False])]
    assert rec.extra["quark"]["cgroup"] == {"path": "P", "created": made} and all(map(os.path.isdir, made))
