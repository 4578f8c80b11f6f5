"""Start time of a wasm container (cold and cached module) next to a runc busybox container.

One private containerd 2.x with both proxy sandboxers (`runc` and `wasm`), driven through CRI, in
one run; every sample is CreateContainer + StartContainer of a container that prints a line and
exits, in an already running pod of that sandboxer. "cold" empties wasm-sandboxer's compiled-module
cache before the sample, "cached" runs right after one, so the module is deserialized instead of
compiled. Three workloads: the tiny hello fixture, a generated 2000-function module (~165 KB) whose
compile time is that of a small real program, and the component fixture (a WASI preview 2 command).

    sudo .venv/bin/python benchmarks/wasm_start.py [--runs 7]

Needs root and `make setup` (containerd 2.1 in .prefix). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kuasar.common.api.runtime.v1 import api_pb2 as cri  # noqa: E402
from kuasar.common.cri_client import CriClient, container_config, pod_config  # noqa: E402
from tests.integration.conftest import kill_task_server, start_sandboxer, stop_process  # noqa: E402
from tests.support import containerd as cd  # noqa: E402
from tests.support import images  # noqa: E402

WASM_IMAGE = "localhost/kuasar/wasm-bench:latest"
BUSYBOX = images.BUSYBOX_REF
BRIDGE, SUBNET = "kuasar-wabench", "10.252.0.0/16"
BIG_FUNCTIONS = 2000


def big_module_wat(functions: int = BIG_FUNCTIONS) -> str:
    """A WASI command that prints one line, plus `functions` exported loops for the compiler to chew on."""
    funcs = ["(func $f0 (param $x i32) (result i32) (local.get $x))"]
    for i in range(1, functions):
        funcs.append(
            f'(func $f{i} (export "f{i}") (param $x i32) (result i32) (local $y i32)'
            f" (local.set $y (i32.mul (local.get $x) (i32.const {i + 3})))"
            f" (block $b (loop $l (br_if $b (i32.gt_u (local.get $y) (i32.const {1000 + i})))"
            f" (local.set $y (i32.add (i32.xor (local.get $y) (i32.const {i})) (i32.const 7))) (br $l)))"
            f" (i32.add (local.get $y) (call $f{i - 1} (i32.const 0))))")
    return ("""(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "hello from a big module\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64)) (i32.store (i32.const 4) (i32.const 24))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
""" + "\n".join(funcs) + ")")


def build_images(directory: Path) -> tuple[list[Path], dict[str, int]]:
    import wasmtime  # wat2wasm only assembles: no compile threads in this process

    modules = {
        "hello.wasm": bytes(wasmtime.wat2wasm((REPO / "tests/fixtures/wasm/hello.wat").read_text())),
        "loop.wasm": bytes(wasmtime.wat2wasm((REPO / "tests/fixtures/wasm/loop.wat").read_text())),
        "big.wasm": bytes(wasmtime.wat2wasm(big_module_wat())),
        "component.wasm": bytes(wasmtime.wat2wasm((REPO / "tests/fixtures/wasm/component.wat").read_text())),
    }
    layer = images.build_layer({}, {name: (data, 0o755) for name, data in modules.items()})
    wasm = images.build_image(directory / "wasm.tar", WASM_IMAGE, [layer], entrypoint=["/hello.wasm"])
    busybox = images.build_busybox_image(directory / "busybox.tar")
    pause = images.build_pause_image(directory / "pause.tar")
    return [wasm, busybox, pause], {name: len(data) for name, data in modules.items()}


@dataclass
class Series:
    label: str
    sandboxer: str
    cache: str
    start_ms: list[float] = field(default_factory=list)  # CreateContainer + StartContainer returned
    exit_ms: list[float] = field(default_factory=list)  # CreateContainer sent -> process exited


async def sample(client: CriClient, pod_id: str, pod: cri.PodSandboxConfig, image: str, command: list[str],
                 series: Series) -> None:
    name = f"s{uuid.uuid4().hex[:8]}"
    config = container_config(name, image, command, log_path=f"{name}.log")
    sent_ns = time.time_ns()
    started = time.perf_counter()
    cid = (await client.create_container(pod_id, config, pod)).container_id
    await client.start_container(cid)
    series.start_ms.append((time.perf_counter() - started) * 1000)
    deadline = time.monotonic() + 30
    while True:
        status = (await client.container_status(cid)).status
        if status.state == cri.CONTAINER_EXITED:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{series.label}: container did not exit")
        await asyncio.sleep(0.005)
    if status.exit_code != 0:
        raise RuntimeError(f"{series.label}: exit code {status.exit_code}")
    series.exit_ms.append((status.finished_at - sent_ns) / 1e6)
    await client.remove_container(cid)


async def working_set(client: CriClient, pod_id: str, pod: cri.PodSandboxConfig, image: str,
                      command: list[str]) -> int:
    config = container_config(f"m{uuid.uuid4().hex[:8]}", image, command)
    cid = (await client.create_container(pod_id, config, pod)).container_id
    await client.start_container(cid)
    await asyncio.sleep(1.0)
    stats = (await client.container_stats(cid)).stats
    await client.stop_container(cid, timeout=0)
    await client.remove_container(cid)
    return stats.memory.working_set_bytes.value


def wasm_rows(sizes: dict[str, int]) -> list[tuple[str, str]]:
    """(module, how the report names it) of each wasm row."""
    return [("hello.wasm", f"hello.wasm ({sizes['hello.wasm']} B)"),
            ("big.wasm", f"big.wasm ({sizes['big.wasm'] // 1000} KB, {BIG_FUNCTIONS} functions)"),
            ("component.wasm", f"component.wasm ({sizes['component.wasm']} B, a WASI preview 2 component)")]


def clear_cache(wasm_dir: Path) -> None:
    for artifact in (wasm_dir / "wasm-cache").glob("*.cwasm"):
        artifact.unlink()


async def measure(address: str, wasm_dir: Path, log_dir: Path, runs: int, sizes: dict[str, int],
                  with_memory: bool = True) -> tuple[list[Series], dict[str, int]]:
    runc = Series("busybox `echo` (runc)", "runc", "-")
    series = [runc]
    wasm: dict[tuple[str, str], Series] = {}
    for module, what in wasm_rows(sizes):
        for cache in ("cold", "cached"):
            wasm[(module, cache)] = Series(what, "wasm", cache)
            series.append(wasm[(module, cache)])
    memory = {}
    async with CriClient(address) as client:
        pods = {}
        for handler in ("kuasar-runc", "kuasar-wasm"):
            config = pod_config(f"bench-{handler}", log_directory=str(log_dir / handler))
            pods[handler] = ((await client.run_pod_sandbox(config, runtime_handler=handler)).pod_sandbox_id, config)
        runc_pod, wasm_pod = pods["kuasar-runc"], pods["kuasar-wasm"]
        # One warm-up each (image snapshot, page cache), not counted.
        await sample(client, *runc_pod, BUSYBOX, ["echo", "hi"], Series("warm-up", "runc", "-"))
        await sample(client, *wasm_pod, WASM_IMAGE, ["/hello.wasm"], Series("warm-up", "wasm", "-"))
        for _ in range(runs):
            await sample(client, *runc_pod, BUSYBOX, ["echo", "hi"], runc)
            for module, _ in wasm_rows(sizes):
                clear_cache(wasm_dir)
                await sample(client, *wasm_pod, WASM_IMAGE, [f"/{module}"], wasm[(module, "cold")])
                await sample(client, *wasm_pod, WASM_IMAGE, [f"/{module}"], wasm[(module, "cached")])
        if with_memory:
            memory["runc: busybox `sleep`"] = await working_set(client, *runc_pod, BUSYBOX, ["sleep", "3600"])
            memory["wasm: loop.wasm (spinning)"] = await working_set(client, *wasm_pod, WASM_IMAGE,
                                                                     ["/loop.wasm"])
        for pod_id, _ in pods.values():
            await client.stop_pod_sandbox(pod_id)
            await client.remove_pod_sandbox(pod_id)
    return series, memory


def table(series: list[Series], memory: dict[str, int], runs: int) -> str:
    lines = [f"Container start through CRI, containerd {cd.containerd_version()}, median of {runs} "
             "(min-max), milliseconds",
             "",
             "| workload | sandboxer | module cache | Create+Start returned | created -> exited |",
             "|---|---|---|---|---|"]
    for s in series:
        def cell(values: list[float]) -> str:
            return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"
        lines.append(f"| {s.label} | {s.sandboxer} | {s.cache} | {cell(s.start_ms)} | {cell(s.exit_ms)} |")
    lines += ["", "| running container | working set (cgroup) |", "|---|---|"]
    lines += [f"| {name} | {value / (1 << 20):.1f} MiB |" for name, value in memory.items()]
    return "\n".join(lines)


def skip_reason() -> str | None:
    """Why the wasm section cannot run here, or None."""
    import importlib.util

    for module, what in (("wasmtime", "the wasmtime Python package"), ("kuasar.wasm", "wasm-sandboxer")):
        if importlib.util.find_spec(module) is None:
            return f"{what} is not installed (`make setup`)"
    return cd.skip_reason()


def run_measurement(runs: int, *, bridge: str = BRIDGE, subnet: str = SUBNET, with_memory: bool = True,
                    keep_logs: Path | None = None) -> tuple[list[Series], dict[str, int], dict[str, int]]:
    """One private containerd with runc- and wasm-sandboxer; `runs` samples per row. Returns the
    series, the working sets (empty without `with_memory`) and the module sizes."""
    base = Path(tempfile.mkdtemp(prefix="kuasar-wasm-bench-"))
    short = Path(f"/run/kuasar-wb-{secrets.token_hex(2)}")  # unix socket paths must stay short
    short.mkdir(mode=0o700)
    sockets = {"runc": short / "runc.sock", "wasm": short / "wasm.sock"}
    dirs = {"runc": short / "runc", "wasm": short / "wasm"}
    tarballs, sizes = build_images(base / "images")
    instance = cd.ContainerdInstance(
        base / "containerd", sandboxers={k: str(v) for k, v in sockets.items()},
        runtimes={"kuasar-wasm": {"runtime_type": "io.containerd.kuasar-wasm.v1", "sandboxer": "wasm"}},
        bridge=bridge, subnet=subnet, log_level="warn")
    instance.sock_dir = short / "cd"
    instance.address = str(instance.sock_dir / "containerd.sock")
    instance.ttrpc_address = str(instance.sock_dir / "containerd.sock.ttrpc")
    daemons = []
    try:
        instance.start()
        for tarball in tarballs:
            instance.import_image(tarball)
        for name, module in (("runc", "kuasar.runc.cli"), ("wasm", "kuasar.wasm.cli")):
            daemons.append(start_sandboxer(sockets[name], dirs[name], base / f"{name}-sandboxer.log",
                                           instance.ttrpc_address, module=module))
        series, memory = asyncio.run(measure(instance.address, dirs["wasm"], base / "logs", runs, sizes,
                                             with_memory=with_memory))
    finally:
        instance.stop()
        for daemon in daemons:
            stop_process(daemon)
        for directory in dirs.values():
            kill_task_server(directory)
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for log in base.glob("*-sandboxer.log"):
                shutil.copy(log, keep_logs / f"wasm-bench-{log.name}")
        shutil.rmtree(short, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    return series, memory, sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--runs", type=int, default=7, help="samples per row (default 7)")
    args = parser.parse_args()
    reason = skip_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    series, memory, _ = run_measurement(args.runs)
    print(table(series, memory, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
