"""Container processes without containerd: fork, prepare, go, exit codes, signals, limits, cache.

The task server forks container processes from a process that runs Python on one thread (besides the
attach-lock warmer, which holds no lock a child needs) and never compiles. The
pytest process is neither once other tests have run (gRPC and ttrpc tests leave threads behind, and a
child forked from a multi-threaded process may die before it reports), so each launch here runs in a
worker interpreter of its own, started with `spawn`, that is in the task server's condition: one thread,
compiling forbidden (`forbid_compiling_here`). Its forked children compile, as they do in production.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from kuasar.common.errors import InvalidArgument
from kuasar.common.reaper import Reaper
from kuasar.wasm import runner
from kuasar.wasm.cache import ModuleCache, engine_fingerprint, module_digest
from kuasar.wasm.launch import LaunchPlan, Stdio, launch
from kuasar.wasm.runner import Preopen, RunSpec
from kuasar.wasm.tasks import Container, Process, WasmSettings, WasmTasks, split_entrypoint
from tests.support.http_echo import http_echo_server

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wasm"
_worker: ProcessPoolExecutor | None = None


@pytest.fixture(scope="module", autouse=True)
def launcher_process() -> Iterator[None]:
    global _worker
    _worker = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    yield
    _worker.shutdown()
    _worker = None


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import wasmtime

    root = tmp_path_factory.mktemp("rootfs")
    for source in FIXTURES.glob("*.wat"):
        (root / f"{source.stem}.wasm").write_bytes(wasmtime.wat2wasm(source.read_text()))
    (root / "nostart.wasm").write_bytes(wasmtime.wat2wasm('(module (memory (export "memory") 1))'))
    bad_import = '(module (import "env" "nope" (func)) (func (export "_start")))'
    (root / "badimport.wasm").write_bytes(wasmtime.wat2wasm(bad_import))
    (root / "etc").mkdir()
    (root / "etc" / "greeting.txt").write_text("hi from the rootfs\n")
    return root


class Result:
    def __init__(self, status: int, out: bytes, err: bytes, seconds: float) -> None:
        self.status, self.out, self.err, self.seconds = status, out, err, seconds


def _drain(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def run(rootfs: Path, args: list[str], **options) -> Result:
    """Launch `args` (module in `rootfs`) from the worker, which plays the task server."""
    assert _worker is not None
    return _worker.submit(_run_in_worker, rootfs, args, **options).result(timeout=60)


def _run_in_worker(rootfs: Path, args: list[str], *, stdin: bytes | None = None, memory_limit: int = 0,
                   cache_dir: Path | None = None, env: list[str] | None = None, go: bool = True,
                   signal_after: tuple[float, int] | None = None, keep_stdin_open: bool = False,
                   wasmedge: str = "", rlimits: list[tuple[int, int, int]] | None = None) -> Result:
    """Launch `args`, optionally feed stdin / signal it, and collect its output (in the worker)."""
    runner.forbid_compiling_here()  # as in the task server: only the forked children compile

    async def scenario() -> Result:
        reaper = Reaper()
        reaper.install()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if stdin is not None or keep_stdin_open else (-1, -1)
        module, entry = split_entrypoint(args[0])
        spec = RunSpec(str(rootfs / module.lstrip("/")), args, env or ["A=1"], [Preopen(str(rootfs), "/")],
                       memory_limit, str(cache_dir or ""), 1 << 30, entry)
        started = time.monotonic()
        plan = LaunchPlan("unit", "wasmedge" if wasmedge else "wasmtime", spec, wasmedge=wasmedge,
                          rlimits=rlimits or [])
        child = launch(plan, Stdio(in_r, out_w, err_w), reaper, wait_for_go=True)
        for fd in (in_r, out_w, err_w):
            if fd >= 0:
                os.close(fd)
        try:
            await child.ready()
            if go:
                child.go()
            else:
                child.close_go()
            if stdin:
                os.write(in_w, stdin)
            if in_w >= 0 and not keep_stdin_open:
                os.close(in_w)
            if signal_after is not None:
                await asyncio.sleep(signal_after[0])
                os.kill(child.pid, signal_after[1])
            exited = await asyncio.wait_for(child.exited, 30)
        finally:
            if keep_stdin_open:
                os.close(in_w)
        return Result(exited.status, _drain(out_r), _drain(err_r), time.monotonic() - started)

    return asyncio.run(scenario())


def test_hello_writes_both_streams_and_exits_zero(rootfs: Path) -> None:
    result = run(rootfs, ["/hello.wasm"])
    assert (result.status, result.out, result.err) == (0, b"hello from wasm\n", b"hello on stderr\n")


@pytest.mark.parametrize(("code", "status"), [("0", 0), ("7", 7), ("125", 125), ("126", 126), ("200", 200),
                                              ("255", 255), ("4096", 255)])
def test_proc_exit_codes_are_reported_faithfully(rootfs: Path, code: str, status: int) -> None:
    assert run(rootfs, ["/exitcode.wasm", code]).status == status


def test_trap_exits_134_with_the_reason_on_stderr(rootfs: Path) -> None:
    result = run(rootfs, ["/trap.wasm"])
    assert result.status == 134
    assert result.out == b"about to trap\n"
    assert b"wasm trap" in result.err and b"unreachable" in result.err


def test_args_env_and_preopened_rootfs(rootfs: Path) -> None:
    result = run(rootfs, ["/argsenv.wasm", "one", "two words", "--read", "/etc/greeting.txt"],
                 env=["GREETING=hi", "EMPTY="])
    assert result.status == 0, result.err
    assert result.out.decode().splitlines() == [
        "arg: /argsenv.wasm", "arg: one", "arg: two words", "arg: --read", "arg: /etc/greeting.txt",
        "env: GREETING=hi", "env: EMPTY=", "preopen: /", "hi from the rootfs"]
    missing = run(rootfs, ["/argsenv.wasm", "--read", "/etc/nope"])
    assert missing.status == 2 and b"error: cannot open /etc/nope errno 44" in missing.err


def test_modules_that_cannot_run_fail_before_start_with_the_reason(rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match="exports no _start"):
        run(rootfs, ["/nostart.wasm"])
    with pytest.raises(InvalidArgument, match="unknown import: `env::nope`"):
        run(rootfs, ["/badimport.wasm"])
    with pytest.raises(InvalidArgument, match="exports no function 'nope'"):
        run(rootfs, ["/hello.wasm#nope"])
    with pytest.raises(InvalidArgument, match="'add' takes parameters"):
        run(rootfs, ["/hello.wasm#add"])


def test_an_entrypoint_named_after_a_hash_runs_that_export(rootfs: Path) -> None:
    # runwasi's `module.wasm#function`: the export runs instead of _start.
    result = run(rootfs, ["/hello.wasm#greet"])
    assert (result.status, result.out, result.err) == (0, b"hello from an export\n", b"")


def test_stdin_is_read_until_end_of_input(rootfs: Path) -> None:
    result = run(rootfs, ["/cat.wasm"], stdin=b"some input\n" * 1000)
    assert (result.status, result.out, result.err) == (0, b"some input\n" * 1000, b"EOF\n")


def test_signals_kill_a_module_blocked_in_a_host_call_or_spinning(rootfs: Path) -> None:
    blocked = run(rootfs, ["/cat.wasm"], keep_stdin_open=True, signal_after=(0.2, signal.SIGTERM))
    assert blocked.status == 143 and blocked.seconds < 5
    spinning = run(rootfs, ["/loop.wasm"], signal_after=(0.2, signal.SIGKILL))
    assert spinning.status == 137 and spinning.out == b"looping\n"


def test_a_process_deleted_before_start_never_runs_its_module(rootfs: Path) -> None:
    result = run(rootfs, ["/hello.wasm"], go=False)
    assert (result.status, result.out) == (0, b"")


def test_memory_limit_caps_linear_memory_and_refuses_too_large_minimums(rootfs: Path) -> None:
    assert run(rootfs, ["/memhog.wasm"]).status == 100  # the module's own cap
    limited = run(rootfs, ["/memhog.wasm"], memory_limit=16 << 20)
    assert 0 < limited.status <= 16 and limited.out == f"memhog: got {limited.status} MiB\n".encode()
    touched = run(rootfs, ["/memhog.wasm", "touch"], memory_limit=16 << 20)
    assert touched.status == limited.status
    with pytest.raises(InvalidArgument, match="memory minimum size of 1024 pages exceeds memory limits"):
        run(rootfs, ["/bigmem.wasm"], memory_limit=16 << 20)


@pytest.mark.parametrize(("args", "status"), [
    (["/component.wasm"], 0),  # run returns ok
    (["/component.wasm", "two words"], 1),  # run returns err
    (["/component.wasm", "a", "b"], 0),  # wasi:cli/exit(ok), and a trap after it that must not run
    (["/component.wasm", "a", "b", "c"], 1),  # wasi:cli/exit(err)
    (["/component.wasm", "a", "b", "c", "d"], 134),  # a trap
])
def test_a_component_runs_as_a_wasi_command_with_its_args_env_and_preopens(rootfs: Path, args: list[str],
                                                                          status: int) -> None:
    result = run(rootfs, args, env=["GREETING=hi there", "EMPTY="])
    assert result.status == status, result.err
    # The last write has no newline and is not flushed: it is there all the same.
    assert result.out.decode().split("\n") == ["hello from a component", *args, "env: GREETING=hi there",
                                               "env: EMPTY=", "preopen: /", "bye"]
    assert (b"wasm trap" in result.err) is (status == 134)


def test_a_component_reads_its_stdin_until_it_is_closed(rootfs: Path) -> None:
    data = bytes(range(256)) * 200  # many of the component's 4 KiB reads, every byte value
    result = run(rootfs, ["/component_cat.wasm"], stdin=data)
    assert (result.status, result.out, result.err) == (0, data + b"EOF\n", b"")
    assert run(rootfs, ["/component_cat.wasm"], stdin=b"").out == b"EOF\n"


def test_a_component_exiting_with_a_code_reports_that_code(rootfs: Path) -> None:
    # wasi:cli/exit's exit-with-code (unstable, linked by wasmtime): any code, not only ok / err.
    assert run(rootfs, ["/component_exit.wasm"]).status == 42


def test_a_component_makes_an_outgoing_http_request_through_wasi_http(rootfs: Path) -> None:
    with http_echo_server() as authority:
        result = run(rootfs, ["/http_get.wasm", authority, "/hello?x=1"])
    assert (result.status, result.out, result.err) == (0, b"status 200\nyou asked for /hello?x=1\n", b"")
    # A port nobody listens on: wasi:http's error-code connection-refused (case 6), and run returns err.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    refused = run(rootfs, ["/http_get.wasm", closed, "/"])
    assert (refused.status, refused.out) == (1, b"http error 6\n")


def test_a_signal_ends_a_component_blocked_on_its_stdin(rootfs: Path) -> None:
    blocked = run(rootfs, ["/component_cat.wasm"], keep_stdin_open=True, signal_after=(0.2, signal.SIGTERM))
    assert blocked.status == 143 and blocked.seconds < 5 and blocked.out == b""


def test_components_are_cached_and_what_cannot_run_fails_before_start(rootfs: Path, tmp_path: Path) -> None:
    import wasmtime

    cache = ModuleCache(tmp_path / "cache")
    artifact = cache.path(module_digest((rootfs / "component.wasm").read_bytes()),
                          engine_fingerprint(runner.ENGINE_SETTINGS))
    assert run(rootfs, ["/component.wasm"], cache_dir=cache.directory).status == 0
    inode = artifact.stat().st_ino
    cached = run(rootfs, ["/component.wasm"], cache_dir=cache.directory)
    assert cached.out == b"hello from a component\n/component.wasm\nenv: A=1\npreopen: /\nbye"
    assert artifact.stat().st_ino == inode  # deserialized as a component, not compiled again
    with pytest.raises(InvalidArgument, match="a component runs its wasi:cli/run export"):
        run(rootfs, ["/component.wasm#run"])
    # The store's memory limit holds for a component's memories too (it declares one page of 64 KiB).
    with pytest.raises(InvalidArgument, match="memory limit 32768 bytes"):
        run(rootfs, ["/component.wasm"], memory_limit=32768)
    assert run(rootfs, ["/component.wasm"], memory_limit=65536).status == 0
    (rootfs / "library.wasm").write_bytes(wasmtime.wat2wasm("(component)"))
    with pytest.raises(InvalidArgument, match="exports no wasi:cli/run@0.2"):
        run(rootfs, ["/library.wasm"])
    for run_type, core in (("(func (result u32))", "(func (export \"r\") (result i32) (i32.const 7))"),
                           ("(func (param \"x\" u32) (result (result)))",
                            "(func (export \"r\") (param i32) (result i32) (i32.const 0))")):
        (rootfs / "badrun.wasm").write_bytes(wasmtime.wat2wasm(
            f'(component (core module $m {core}) (core instance $i (instantiate $m)) '
            f'(func $run {run_type[6:-1]} (canon lift (core func $i "r"))) '
            '(instance $r (export "run" (func $run))) (export "wasi:cli/run@0.2.0" (instance $r)))'))
        with pytest.raises(InvalidArgument, match="run function is not `func\\(\\) -> result`"):
            run(rootfs, ["/badrun.wasm"])
    (rootfs / "norun.wasm").write_bytes(wasmtime.wat2wasm(
        '(component (instance $i) (export "wasi:cli/run@0.2.0" (instance $i)))'))
    with pytest.raises(InvalidArgument, match="wasi:cli/run@0.2.0 export has no run function"):
        run(rootfs, ["/norun.wasm"])
    (rootfs / "unknown.wasm").write_bytes(wasmtime.wat2wasm(
        '(component (import "example:missing/api" (instance (export "f" (func)))) '
        '(instance $i) (export "wasi:cli/run@0.2.0" (instance $i)))'))
    with pytest.raises(InvalidArgument, match="instantiating /unknown.wasm: .*implementation is missing"):
        run(rootfs, ["/unknown.wasm"])


def test_compiled_module_is_cached_and_a_bad_artifact_is_replaced(rootfs: Path, tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path / "cache")
    digest = module_digest((rootfs / "hello.wasm").read_bytes())
    artifact = cache.path(digest, engine_fingerprint(runner.ENGINE_SETTINGS))
    assert run(rootfs, ["/hello.wasm"], cache_dir=cache.directory).status == 0
    assert artifact.is_file()
    inode = artifact.stat().st_ino
    os.utime(artifact, (1, 1))
    assert run(rootfs, ["/hello.wasm"], cache_dir=cache.directory).out == b"hello from wasm\n"
    assert artifact.stat().st_ino == inode  # deserialized, not compiled and rewritten
    assert artifact.stat().st_mtime > 1  # marked as used for the LRU
    artifact.write_bytes(b"garbage")
    assert run(rootfs, ["/hello.wasm"], cache_dir=cache.directory).out == b"hello from wasm\n"
    assert artifact.read_bytes() != b"garbage"


def test_the_task_server_refuses_to_compile(rootfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "_NO_COMPILE_PID", 0)
    runner.forbid_compiling_here()
    with pytest.raises(RuntimeError, match="refusing to compile"):
        runner.WasmtimeModule(RunSpec(str(rootfs / "hello.wasm"), ["/hello.wasm"], []))
    # ... while a forked child of that process may.
    assert run(rootfs, ["/hello.wasm"]).status == 0


def test_wasmedge_runtime_execs_the_binary_with_its_own_flags(rootfs: Path, tmp_path: Path) -> None:
    """A stand-in `wasmedge` (a Python script, no shell) that prints the command line it was given."""
    fake = tmp_path / "wasmedge"
    fake.write_text(f"#!{sys.executable}\nimport os, sys\nprint(sys.argv[1:])\nprint(os.environ['A'])\n"
                    "sys.exit(9)\n")
    fake.chmod(0o755)
    result = run(rootfs, ["/hello.wasm", "x"], wasmedge=str(fake), memory_limit=1 << 20)
    assert result.status == 9
    assert result.out.decode().splitlines() == [
        str(["--dir", f"/:{rootfs}", "--env", "A=1", "--memory-page-limit", "16", str(rootfs / "hello.wasm"),
             "x"]), "1"]


def _stand_in_wasmedge(tmp_path: Path, command: str) -> str:
    """A `wasmedge` that runs a shell command instead: it shows what the container process inherited."""
    fake = tmp_path / "wasmedge"
    fake.write_text(f"#!/bin/sh\nexec {command}\n")
    fake.chmod(0o755)
    return str(fake)


def test_a_container_process_gets_sigpipe_and_sigxfsz_back_at_their_defaults(rootfs: Path, tmp_path: Path) -> None:
    # SIGXFSZ, which CPython ignores at start-up, used to stay ignored across the exec of WasmEdge: a
    # module past RLIMIT_FSIZE got EFBIG instead of being killed by SIGXFSZ as under runc.
    result = run(rootfs, ["/hello.wasm"], wasmedge=_stand_in_wasmedge(tmp_path, "grep SigIgn /proc/self/status"))
    ignored = int(result.out.split()[1], 16)
    assert result.status == 0
    assert not ignored & (1 << (signal.SIGXFSZ - 1))
    assert not ignored & (1 << (signal.SIGPIPE - 1))


def test_an_unlimited_oci_rlimit_is_set_as_unlimited(rootfs: Path, tmp_path: Path) -> None:
    # OCI's uint64 "unlimited" (2**64-1) used to reach the child's setrlimit as it was: OverflowError,
    # so the process reported a setup failure and Create failed.
    tasks = WasmTasks(reaper=None, events=None, directory=tmp_path / "dir",  # type: ignore[arg-type]
                      settings=WasmSettings(cache=False))
    container = Container("c1", tmp_path, "pod", "k8s.io", {}, rootfs, "wasmtime", "", Process("", spec={}))
    unlimited = 2**64 - 1
    planned = tasks.plan(container, {"args": ["/hello.wasm"], "rlimits": [
        {"type": "RLIMIT_CORE", "soft": unlimited, "hard": unlimited}]}, "c1").rlimits
    result = run(rootfs, ["/hello.wasm"], rlimits=planned,
                 wasmedge=_stand_in_wasmedge(tmp_path, "grep 'core file size' /proc/self/limits"))
    assert result.status == 0, result.err
    assert result.out.split()[-3:-1] == [b"unlimited", b"unlimited"]
