"""Locating a container's module inside its rootfs, bind-mount preopens, spec helpers, engine choice."""

from __future__ import annotations

import asyncio
import json
import os
import resource
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.errors import FailedPrecondition, InvalidArgument, Unimplemented
from kuasar.common.fifo_stdio import ProcessIO
from kuasar.wasm.launch import FileBind
from kuasar.wasm.module import is_component, locate_module, resolve_in_root
from kuasar.wasm.runner import Preopen, RunSpec, proc_exit_status, split_env, wasmedge_argv
from kuasar.wasm.sandboxer import task_server_options
from kuasar.wasm.tasks import (
    Container,
    Process,
    WasmSettings,
    WasmTasks,
    bind_preopens,
    file_binds,
    memory_limit_of,
    runnable_module,
)

MODULE = b"\0asm\x01\x00\x00\x00"


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "app" / "bin").mkdir(parents=True)
    (root / "hello.wasm").write_bytes(MODULE)
    (root / "app" / "bin" / "tool.wasm").write_bytes(MODULE)
    (root / "app" / "link.wasm").symlink_to("/hello.wasm")  # absolute: means the rootfs's /hello.wasm
    (root / "app" / "rel.wasm").symlink_to("bin/tool.wasm")
    (root / "escape.wasm").symlink_to("../../../../../../etc/passwd")
    (root / "loop.wasm").symlink_to("loop.wasm")
    (root / "text.txt").write_text("not a module")
    (root / "component.wasm").write_bytes(b"\0asm\x0d\x00\x01\x00")
    return root


def test_resolve_in_root_keeps_dotdot_and_symlinks_inside(rootfs: Path) -> None:
    assert resolve_in_root(rootfs, "/hello.wasm") == rootfs / "hello.wasm"
    assert resolve_in_root(rootfs, "../../hello.wasm") == rootfs / "hello.wasm"
    assert resolve_in_root(rootfs, "bin/tool.wasm", cwd="/app") == rootfs / "app/bin/tool.wasm"
    assert resolve_in_root(rootfs, "/app/link.wasm") == rootfs / "hello.wasm"
    assert resolve_in_root(rootfs, "/app/rel.wasm") == rootfs / "app/bin/tool.wasm"
    # `..` in a symlink target stops at the rootfs root: never the host's /etc/passwd.
    assert resolve_in_root(rootfs, "/escape.wasm") == rootfs / "etc/passwd"
    with pytest.raises(InvalidArgument, match="too many levels"):
        resolve_in_root(rootfs, "/loop.wasm")


def test_locate_module_absolute_relative_and_fallback_to_root(rootfs: Path) -> None:
    assert locate_module(rootfs, ["/hello.wasm", "x"]) == rootfs / "hello.wasm"
    assert locate_module(rootfs, ["hello.wasm"]) == rootfs / "hello.wasm"
    assert locate_module(rootfs, ["bin/tool.wasm"], cwd="/app") == rootfs / "app/bin/tool.wasm"
    assert locate_module(rootfs, ["hello.wasm"], cwd="/app") == rootfs / "hello.wasm"  # from the root then
    assert locate_module(rootfs, ["link.wasm"], cwd="/app") == rootfs / "hello.wasm"


def test_locate_module_errors_say_what_is_wrong(rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match="process.args is empty"):
        locate_module(rootfs, [])
    # INVALID_ARGUMENT, not NOT_FOUND: containerd hands the code to CRI, where it reads as an unknown container.
    with pytest.raises(InvalidArgument,
                       match=r"wasm module 'nope.wasm' not found .*looked for /app/nope.wasm, /nope.wasm"):
        locate_module(rootfs, ["nope.wasm"], cwd="/app")
    with pytest.raises(InvalidArgument, match="not found"):
        locate_module(rootfs, ["/escape.wasm"])  # resolves to <rootfs>/etc/passwd, which does not exist
    with pytest.raises(InvalidArgument, match="not found"):
        locate_module(rootfs, ["/app"])  # a directory is not a module
    with pytest.raises(InvalidArgument, match="not a WebAssembly module"):
        locate_module(rootfs, ["/text.txt"])
    component = locate_module(rootfs, ["/component.wasm"])  # WASI preview 2: runs too (runner.py)
    assert is_component(component) and not is_component(locate_module(rootfs, ["/hello.wasm"]))
    (rootfs / "future.wasm").write_bytes(b"\0asm\x0e\x00\x01\x00")
    with pytest.raises(InvalidArgument, match="unknown version"):
        locate_module(rootfs, ["/future.wasm"])


def test_bind_preopens_takes_directory_binds_only(tmp_path: Path) -> None:
    volume = tmp_path / "vol"
    volume.mkdir()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    spec_mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/data", "type": "bind", "source": str(volume), "options": ["rbind", "rprivate", "rw"]},
        {"destination": "/ro/", "source": str(volume), "options": ["rbind", "ro"]},
        {"destination": "/etc/hosts", "type": "bind", "source": str(hosts), "options": ["rbind"]},
        {"destination": "/dev/shm", "type": "bind", "source": str(volume), "options": ["rbind"]},
        {"destination": "relative", "type": "bind", "source": str(volume), "options": ["rbind"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
    ]
    assert bind_preopens(spec_mounts) == [Preopen(str(volume), "/data", True), Preopen(str(volume), "/ro", False)]
    # The file binds go over their destination in the rootfs instead (WASI preopens directories only):
    # regular files only, and under /dev too (kubelet's termination log), but not under /proc or /sys.
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    log = tmp_path / "termination-log"
    log.write_text("")
    spec_mounts += [
        {"destination": "/dev/termination-log", "type": "bind", "source": str(log), "options": ["rbind"]},
        {"destination": "/etc/null", "type": "bind", "source": "/dev/null", "options": ["bind"]},
        {"destination": "/x/../proc/hosts", "type": "bind", "source": str(hosts), "options": ["bind"]},
        {"destination": "/sys/hosts", "type": "bind", "source": str(hosts), "options": ["bind"]},
    ]
    assert file_binds(spec_mounts, rootfs) == [FileBind(str(hosts), str(rootfs / "etc/hosts"), recursive=True),
                                               FileBind(str(log), str(rootfs / "dev/termination-log"),
                                                        recursive=True)]


def test_file_binds_follow_the_images_symlinks_inside_the_rootfs_only(tmp_path: Path) -> None:
    # /etc -> /host-etc would otherwise point the bind at the host's own file.
    conf = tmp_path / "app.conf"
    conf.write_text("x=1\n")
    rootfs = tmp_path / "rootfs"
    (rootfs / "real-etc").mkdir(parents=True)
    (rootfs / "etc").symlink_to("/real-etc")
    (rootfs / "escape").symlink_to("../../..")
    spec_mounts = [{"destination": "/etc/app.conf", "type": "bind", "source": str(conf), "options": ["bind", "ro"]},
                   {"destination": "/escape/tmp/app.conf", "type": "bind", "source": str(conf), "options": ["bind"]},
                   {"destination": "/missing/app.conf", "type": "bind", "source": str(tmp_path / "gone")}]
    assert file_binds(spec_mounts, rootfs) == [
        FileBind(str(conf), str(rootfs / "real-etc/app.conf"), readonly=True),
        FileBind(str(conf), str(rootfs / "tmp/app.conf"))]


def test_a_file_bind_under_a_volume_goes_where_the_volumes_preopen_reaches_it(tmp_path: Path) -> None:
    # Bound into the rootfs, a subPath file under a volume's mount point was invisible: the module opens
    # it through the volume's preopen (the longest match), which is the host's volume directory.
    conf = tmp_path / "extra.conf"
    conf.write_text("x=1\n")
    volume, inner = tmp_path / "vol", tmp_path / "inner"
    volume.mkdir()
    inner.mkdir()
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    spec_mounts = [{"destination": "/config", "type": "bind", "source": str(volume), "options": ["rbind"]},
                   {"destination": "/config/deep", "type": "bind", "source": str(inner), "options": ["rbind"]},
                   {"destination": "/config/extra.conf", "type": "bind", "source": str(conf), "options": ["rbind"]},
                   {"destination": "/config/deep/a/b.conf", "type": "bind", "source": str(conf), "options": ["rbind"]},
                   {"destination": "/configs/c.conf", "type": "bind", "source": str(conf), "options": ["rbind"]}]
    assert [bind.target for bind in file_binds(spec_mounts, rootfs)] == [
        str(volume / "extra.conf"), str(inner / "a/b.conf"), str(rootfs / "configs/c.conf")]


def test_a_writable_file_bind_in_a_read_only_root_is_left_to_the_kernel(rootfs: Path, tmp_path: Path) -> None:
    # WASI's read-only preopen of the root refused every write, to a writable file bind too (kubelet's
    # /dev/termination-log with readOnlyRootFilesystem): the kernel keeps the root read-only instead.
    log = tmp_path / "termination-log"
    log.write_text("")
    tasks = WasmTasks(reaper=None, events=None, directory=tmp_path / "dir",  # type: ignore[arg-type]
                      settings=WasmSettings(cache=False))

    def plan(mounts: list[dict]) -> tuple[bool, str]:
        spec = {"root": {"readonly": True}, "mounts": mounts}
        container = Container("c1", tmp_path, "pod", "k8s.io", spec, rootfs, "wasmtime", "",
                              Process("", io=ProcessIO()))
        made = tasks.plan(container, {"args": ["/hello.wasm"]}, "c1")
        return made.run.preopens[0].writable, made.readonly_rootfs

    rw = {"destination": "/dev/termination-log", "type": "bind", "source": str(log), "options": ["rbind"]}
    assert plan([rw]) == (True, str(rootfs))
    assert plan([{**rw, "options": ["rbind", "ro"]}]) == (False, "")  # WASI's read-only preopen will do
    assert plan([]) == (False, "")


def test_spec_helpers() -> None:
    assert memory_limit_of({"linux": {"resources": {"memory": {"limit": 64 << 20}}}}) == 64 << 20
    assert memory_limit_of({"linux": {"resources": {"memory": {"limit": -1}}}}) == 0
    assert memory_limit_of({}) == 0
    assert split_env(["A=1", "B==2", "C=", "junk", "=x"]) == [["A", "1"], ["B", "=2"], ["C", ""]]


def test_exit_status_mapping() -> None:
    assert [proc_exit_status(n) for n in (0, 3, 125, 126, 200, 255)] == [0, 3, 125, 126, 200, 255]
    assert proc_exit_status(256) == 255  # no Linux status carries it, and it must not read as success
    assert proc_exit_status(-1) == 255  # u32 0xffffffff as the i32 ctypes hands over


def test_wasmedge_argv_puts_guest_path_first() -> None:
    spec = RunSpec("/rootfs/app.wasm", ["/app.wasm", "a", "b c"], ["K=v"],
                   [Preopen("/rootfs", "/"), Preopen("/vol", "/data")], memory_limit=10 << 20)
    assert wasmedge_argv("/opt/wasmedge", spec) == [
        "/opt/wasmedge", "--dir", "/:/rootfs", "--dir", "/data:/vol", "--env", "K=v",
        "--memory-page-limit", "160", "/rootfs/app.wasm", "a", "b c"]


def test_a_path_wasmedge_would_split_is_refused(rootfs: Path, tmp_path: Path) -> None:
    # WasmEdge splits `--dir guest:host[:mode]` at the first two colons: a volume mounted at `/x:/:` got
    # the host's / preopened read-write (and `:readonly` was lost).
    volume = tmp_path / "vol"
    volume.mkdir()
    with pytest.raises(InvalidArgument, match="':'"):
        wasmedge_argv("/opt/wasmedge", RunSpec("/m.wasm", ["/m.wasm"], [], [Preopen(str(volume), "/x:/:")]))
    tasks = WasmTasks(reaper=None, events=None, directory=tmp_path / "dir",  # type: ignore[arg-type]
                      settings=WasmSettings(cache=False))
    spec = {"mounts": [{"destination": "/x:/:", "type": "bind", "source": str(volume), "options": ["rbind"]}]}
    container = Container("c1", tmp_path, "pod", "k8s.io", spec, rootfs, "wasmedge", "/opt/wasmedge",
                          Process("", io=ProcessIO()))
    with pytest.raises(InvalidArgument, match="use runtime wasmtime"):  # at Create, before a launch
        tasks.plan(container, {"args": ["/hello.wasm"]}, "c1")
    container.runtime = "wasmtime"  # its preopens are no strings to split
    assert tasks.plan(container, {"args": ["/hello.wasm"]}, "c1").run.preopens[1].guest == "/x:/:"


def test_wasmedge_argv_keeps_read_only_preopens_read_only() -> None:
    # WasmEdge used to get a bare `--dir guest:host` for a read-only rootfs or "ro" bind mount too,
    # which grants the module full write rights there (wasmtime honoured Preopen.writable).
    spec = RunSpec("/rootfs/app.wasm", ["/app.wasm"], [],
                   [Preopen("/rootfs", "/", writable=False), Preopen("/vol", "/data", writable=False),
                    Preopen("/scratch", "/tmp")])
    assert wasmedge_argv("/opt/wasmedge", spec) == [
        "/opt/wasmedge", "--dir", "/:/rootfs:readonly", "--dir", "/data:/vol:readonly", "--dir", "/tmp:/scratch",
        "/rootfs/app.wasm"]


def _plan_rlimits(rootfs: Path, tmp_path: Path, rlimits: list[dict]) -> list[tuple[int, int, int]]:
    tasks = WasmTasks(reaper=None, events=None, directory=tmp_path / "dir",  # type: ignore[arg-type]
                      settings=WasmSettings(cache=False))
    init = Process("", io=ProcessIO(), spec={})
    container = Container("c1", tmp_path, "pod", "k8s.io", {}, rootfs, "wasmtime", "", init)
    return tasks.plan(container, {"args": ["/hello.wasm"], "rlimits": rlimits}, "c1").rlimits


UNLIMITED = 2**64 - 1  # OCI's uint64 "unlimited", what containerd writes for -1


def test_unlimited_oci_rlimits_become_rlim_infinity(rootfs: Path, tmp_path: Path) -> None:
    # 2**64-1 used to go to the child's setrlimit as it was, which raised OverflowError (it takes a signed
    # C long), so Create failed with "container process setup failed: Python int too large ...".
    planned = _plan_rlimits(rootfs, tmp_path, [
        {"type": "RLIMIT_CORE", "soft": UNLIMITED, "hard": UNLIMITED},
        {"type": "RLIMIT_NOFILE", "soft": 1024, "hard": UNLIMITED},
        {"type": "RLIMIT_STACK", "soft": 2**63, "hard": 2**63},
    ])
    assert planned == [(resource.RLIMIT_CORE, resource.RLIM_INFINITY, resource.RLIM_INFINITY),
                       (resource.RLIMIT_NOFILE, 1024, resource.RLIM_INFINITY),
                       (resource.RLIMIT_STACK, resource.RLIM_INFINITY, resource.RLIM_INFINITY)]


@pytest.mark.parametrize(("soft", "hard"), [(2048, 1024), (UNLIMITED, 1024), (-1, 1024)])
def test_rlimits_setrlimit_would_refuse_are_invalid_argument(rootfs: Path, tmp_path: Path, soft: int,
                                                             hard: int) -> None:
    # A soft limit above its hard one used to fail only in the forked child, as a setup failure.
    with pytest.raises(InvalidArgument, match="RLIMIT_NOFILE"):
        _plan_rlimits(rootfs, tmp_path, [{"type": "RLIMIT_NOFILE", "soft": soft, "hard": hard}])


def test_runtime_selection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = WasmTasks.__new__(WasmTasks)
    tasks.settings = WasmSettings(wasmedge="wasmedge-not-installed")
    assert tasks.select_runtime({}) == ("wasmtime", "")
    annotated = {"annotations": {"io.kuasar.wasm.runtime": "wasmedge"}}
    with pytest.raises(FailedPrecondition, match="runtime wasmedge selected but no WasmEdge binary"):
        tasks.select_runtime(annotated)
    with pytest.raises(InvalidArgument, match="unknown wasm runtime 'wamr'"):
        tasks.select_runtime({"annotations": {"io.kuasar.wasm.runtime": "wamr"}})
    fake = tmp_path / "wasmedge"
    fake.write_text("")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ.get('PATH', '')}")
    tasks.settings = WasmSettings(runtime="wasmedge")
    assert tasks.select_runtime({}) == ("wasmedge", str(fake))
    assert tasks.select_runtime({"annotations": {"io.kuasar.wasm.runtime": "wasmtime"}}) == ("wasmtime", "")


def test_config_section_becomes_task_server_settings() -> None:
    assert WasmSettings(**task_server_options({})) == WasmSettings("wasmtime", "wasmedge", True, 512 << 20, True,
                                                                   "runc")
    options = task_server_options({"runtime": "WasmEdge", "wasmedge": "/opt/we", "cache": False, "cache_max_mb": 64,
                                   "linux_containers": False, "runc": "/opt/runc"})
    assert WasmSettings(**options) == WasmSettings("wasmedge", "/opt/we", False, 64 << 20, False, "/opt/runc")
    assert json.loads(json.dumps(options)) == options  # handed to the task server as JSON
    with pytest.raises(InvalidArgument):
        task_server_options({"runtime": "wamr"})
    with pytest.raises(InvalidArgument):
        task_server_options({"cache_max_mb": "lots"})
    with pytest.raises(InvalidArgument, match="linux_containers"):
        task_server_options({"linux_containers": "yes"})


def test_a_hash_in_args0_names_the_export_to_run(rootfs: Path, tmp_path: Path) -> None:
    tasks = WasmTasks(reaper=None, events=None, directory=tmp_path / "dir",  # type: ignore[arg-type]
                      settings=WasmSettings(cache=False))
    container = Container("c1", tmp_path, "pod", "k8s.io", {}, rootfs, "wasmtime", "", Process("", io=ProcessIO()))
    plan = tasks.plan(container, {"args": ["hello.wasm#greet", "x"], "cwd": "/"}, "c1")
    assert (plan.run.module, plan.run.entry, plan.run.argv) == (str(rootfs / "hello.wasm"), "greet",
                                                                ["hello.wasm#greet", "x"])
    assert tasks.plan(container, {"args": ["/hello.wasm"]}, "c1").run.entry == "_start"
    for bad in ("/hello.wasm#", "#greet"):
        with pytest.raises(InvalidArgument, match="is not module.wasm#function"):
            tasks.plan(container, {"args": [bad]}, "c1")
    container.runtime = "wasmedge"
    with pytest.raises(Unimplemented, match="wasmtime only"):
        tasks.plan(container, {"args": ["/hello.wasm#greet"]}, "c1")


def test_a_component_is_planned_for_wasmtime_without_a_hash_export(rootfs: Path, tmp_path: Path) -> None:
    tasks = WasmTasks(reaper=None, events=None, directory=tmp_path / "dir",  # type: ignore[arg-type]
                      settings=WasmSettings(cache=False))
    container = Container("c1", tmp_path, "pod", "k8s.io", {}, rootfs, "wasmtime", "", Process("", io=ProcessIO()))
    assert tasks.plan(container, {"args": ["/component.wasm", "x"]}, "c1").run.module == str(rootfs / "component.wasm")
    with pytest.raises(InvalidArgument, match="a component runs its wasi:cli/run export"):
        tasks.plan(container, {"args": ["/component.wasm#run"]}, "c1")
    container.runtime = "wasmedge"
    with pytest.raises(Unimplemented, match="components run with wasmtime only"):
        tasks.plan(container, {"args": ["/component.wasm"]}, "c1")
    assert tasks.plan(container, {"args": ["/hello.wasm"]}, "c1").runtime == "wasmedge"
    # Exec refuses the same at Exec, not only when its process starts.
    with pytest.raises(Unimplemented, match="components run with wasmtime only"):
        runnable_module(container, ["/component.wasm"], "/")
    container.runtime = "wasmtime"
    with pytest.raises(InvalidArgument, match="a component runs its wasi:cli/run export"):
        runnable_module(container, ["/component.wasm#run"], "/")


def test_exec_accepts_what_its_launch_runs_and_refuses_the_rest(rootfs: Path, tmp_path: Path) -> None:
    # Exec checked args[0] whole, so `hello.wasm#greet` (which the launch splits) was refused at Exec.
    class Events:
        def publish(self, *args: object, **kwargs: object) -> None:
            pass

    tasks = WasmTasks(reaper=None, events=Events(), directory=tmp_path / "dir",  # type: ignore[arg-type]
                      settings=WasmSettings(cache=False))
    init = Process("", io=ProcessIO(), spec={}, pid=os.getpid(), status=types.RUNNING)
    tasks.containers["c1"] = Container("c1", tmp_path, "pod", "k8s.io", {}, rootfs, "wasmtime", "", init)

    def exec_of(exec_id: str, args: list[str]) -> task.ExecProcessRequest:
        return task.ExecProcessRequest(id="c1", exec_id=exec_id,
                                       spec=any_pb2.Any(value=json.dumps({"args": args, "cwd": "/"}).encode()))

    async def main() -> None:
        await tasks.exec(exec_of("e1", ["/hello.wasm#greet"]), None)  # type: ignore[arg-type]
        await tasks.exec(exec_of("e2", ["app/bin/tool.wasm"]), None)  # type: ignore[arg-type]
        for exec_id, args, error in (("e3", ["/hello.wasm#"], "is not module.wasm#function"),
                                     ("e4", ["/missing.wasm#greet"], "not found in the container's rootfs"),
                                     ("e5", ["/text.txt"], "is not a WebAssembly module")):
            with pytest.raises(InvalidArgument, match=error):
                await tasks.exec(exec_of(exec_id, args), None)  # type: ignore[arg-type]
        assert sorted(tasks.containers["c1"].execs) == ["e1", "e2"]

    asyncio.run(main())
