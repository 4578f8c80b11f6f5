"""wasm-sandboxer under a real containerd 2.x, driven through CRI like kubelet drives it."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import struct
import termios
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from kuasar.common import cgroup_attach, cgroups
from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient, container_config, pod_config
from tests.support import images
from tests.support.http_echo import http_echo_server
from tests.support.procs import thread_names

from .conftest import Stack, start_sandboxer
from .cri_helpers import (
    ERROR,
    RESIZE,
    STDIN,
    cgroups_named,
    channel_messages,
    check_user_namespace_refused,
    children_of,
    exec_over_websocket,
    hierarchy_of,
    mounts_containing,
    pod_processes,
    streaming_session,
    task_server_pid,
    wait_ended_with_task_server,
    wait_leftovers_recorded,
    wait_log,
    wait_state,
    while_unavailable,
)
from .wasm_stack import FIXTURES, GREETING, WASM_HANDLER, WASM_IMAGE, assemble_modules, stack_fixture

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_fixture(tmp_path_factory, "kuasar-wa0", "10.253.0.0/17")


async def run_pod(client: CriClient, name: str, log_root: Path, **kwargs) -> tuple[str, cri.PodSandboxConfig]:
    uid = uuid.uuid4().hex[:12]
    config = pod_config(name, uid=uid, log_directory=str(log_root / f"{name}-{uid}"), **kwargs)
    response = await client.run_pod_sandbox(config, runtime_handler=WASM_HANDLER)
    return response.pod_sandbox_id, config


async def create(client: CriClient, pod_id: str, pod: cri.PodSandboxConfig, name: str, command: list[str],
                 annotations: dict[str, str] | None = None, mounts: list[cri.Mount] | None = None,
                 stdin_once: bool = False, readonly_rootfs: bool = False, **kwargs) -> str:
    config = container_config(name, WASM_IMAGE, command, log_path=f"{name}.log", **kwargs)
    config.linux.security_context.readonly_rootfs = readonly_rootfs
    config.annotations.update(annotations or {})
    config.mounts.extend(mounts or [])
    config.stdin_once = stdin_once
    return (await client.create_container(pod_id, config, pod)).container_id


async def start(client: CriClient, pod_id: str, pod: cri.PodSandboxConfig, name: str, command: list[str],
                **kwargs) -> str:
    """CreateContainer + StartContainer. containerd 2.x's CRI calls Task.Create (where a bad module is
    refused) from StartContainer, so that is where task errors surface."""
    cid = await create(client, pod_id, pod, name, command, **kwargs)
    await client.start_container(cid)
    return cid


async def remove_pod(client: CriClient, pod_id: str) -> None:
    await client.stop_pod_sandbox(pod_id)
    await client.remove_pod_sandbox(pod_id)


async def runtime_info(client: CriClient, cid: str) -> dict:
    status = await client.container_status(cid, verbose=True)
    return json.loads(status.info["info"])


async def send_stdin_and_close(url: str, data: bytes) -> None:
    """Write `data` to an attach session's stdin channel (Kubernetes' v4 WebSocket protocol), then end it."""
    async with streaming_session(url) as ws:
        await ws.send(bytes([STDIN]) + data)
        await asyncio.sleep(0.2)  # let containerd copy it into the FIFO before the session ends


def container_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name", "status"])
            if (p.info["name"] or "").startswith("wasm-") and p.info["status"] != psutil.STATUS_ZOMBIE]


def test_module_output_reaches_cri_log_without_pause_or_shim(stack: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "hello", stack.log_dir)
            assert (await client.pod_sandbox_status(pod_id)).status.state == cri.SANDBOX_READY
            cid = await start(client, pod_id, pod, "hello", ["/hello.wasm"])
            exited = await wait_state(client, cid, cri.CONTAINER_EXITED)
            assert exited.exit_code == 0
            text = await wait_log(pod, "hello", "hello on stderr")
            assert "hello from wasm" in text
            # 1:N: the pod is one process of the task server; no shim, no pause container.
            server = task_server_pid(stack.sandboxer_dir)
            ours = [p for p in pod_processes() if p.ppid() == server]
            assert [p.pid for p in ours] == children_of(server)
            # Container processes are forked from the task server: no thread but its loop's and the
            # attach-lock warmer's (which holds nothing a child could inherit).
            assert set(thread_names(server, but_main=True)) <= {cgroup_attach.THREAD_NAME}
            # The compiled module is now cached under the sandboxer's dir.
            assert list((stack.sandboxer_dir / "wasm-cache").glob("*.cwasm"))
            await client.remove_container(cid)
            await remove_pod(client, pod_id)

    asyncio.run(scenario())


def test_exit_codes_including_those_wasmtime_refuses_and_traps(stack: Stack) -> None:
    expected = {"0": 0, "3": 3, "125": 125, "126": 126, "200": 200, "255": 255, "300": 255}

    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "codes", stack.log_dir)
            cids = {code: await start(client, pod_id, pod, f"exit{code}", ["/exitcode.wasm", code])
                    for code in expected}
            trapped = await start(client, pod_id, pod, "trap", ["/trap.wasm"])
            for code, cid in cids.items():
                status = await wait_state(client, cid, cri.CONTAINER_EXITED)
                assert status.exit_code == expected[code], (code, status)
            assert (await wait_state(client, trapped, cri.CONTAINER_EXITED)).exit_code == 134
            text = await wait_log(pod, "trap", "wasm trap")
            assert "about to trap" in text and "unreachable" in text
            await remove_pod(client, pod_id)

    asyncio.run(scenario())


def test_args_env_preopened_rootfs_and_bind_mount(stack: Stack, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "input.txt").write_text("from a host volume\n")

    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "args", stack.log_dir)
            cid = await start(client, pod_id, pod, "args",
                              ["/argsenv.wasm", "one", "two words", "--write", "/data/out.txt",
                               "--read", "/etc/greeting.txt"],
                              env={"GREETING": "hi there"},
                              mounts=[cri.Mount(container_path="/data", host_path=str(volume))])
            assert (await wait_state(client, cid, cri.CONTAINER_EXITED)).exit_code == 0
            text = await wait_log(pod, "args", GREETING.decode().strip())
            lines = text.splitlines()
            assert lines[:3] == ["arg: /argsenv.wasm", "arg: one", "arg: two words"]
            assert "env: GREETING=hi there" in lines
            assert "preopen: /" in lines and "preopen: /data" in lines
            # The write went through the bind mount's preopen, onto the host directory.
            assert (volume / "out.txt").read_text() == "written by wasm\n"
            # A relative module name is looked up from the working directory; symlinks stay in the rootfs.
            rel = await start(client, pod_id, pod, "relative", ["main.wasm"], working_dir="/opt/app")
            assert (await wait_state(client, rel, cri.CONTAINER_EXITED)).exit_code == 0
            assert "hello from wasm" in await wait_log(pod, "relative", "hello from wasm")
            # runwasi's `module.wasm#function` runs that export instead of _start.
            export = await start(client, pod_id, pod, "export", ["/hello.wasm#greet"])
            assert (await wait_state(client, export, cri.CONTAINER_EXITED)).exit_code == 0
            assert "hello from an export" in await wait_log(pod, "export", "hello from an export")
            await remove_pod(client, pod_id)

    asyncio.run(scenario())


def test_file_bind_mounts_are_seen_by_the_module_and_leave_no_mount(stack: Stack, tmp_path: Path) -> None:
    # WASI preopens only directories: a ConfigMap subPath or a single-file hostPath was invisible.
    config_file = tmp_path / "app.conf"
    config_file.write_text("setting = 42\n")
    out = tmp_path / "out.txt"
    out.write_text("")

    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "files", stack.log_dir)
            mounts = [cri.Mount(container_path="/etc/app.conf", host_path=str(config_file), readonly=True),
                      # not in the image: the mount point is made, as runc makes one
                      cri.Mount(container_path="/var/out/out.txt", host_path=str(out))]
            cid = await start(client, pod_id, pod, "files",
                              ["/argsenv.wasm", "--read", "/etc/app.conf", "--write", "/var/out/out.txt"],
                              mounts=mounts)
            assert (await wait_state(client, cid, cri.CONTAINER_EXITED)).exit_code == 0
            assert "setting = 42" in await wait_log(pod, "files", "setting = 42")
            assert out.read_text() == "written by wasm\n"  # through the writable file bind
            # The binds were made in the container process's own mount namespace: none on the host.
            assert mounts_containing("/etc/app.conf") == [] and mounts_containing("/var/out/out.txt") == []
            # kubelet's termination log (under /dev, where nothing else reaches a module) can be written.
            termination_log = tmp_path / "termination-log"
            termination_log.write_text("")
            log_mount = cri.Mount(container_path="/dev/termination-log", host_path=str(termination_log))
            term = await start(client, pod_id, pod, "term", ["/argsenv.wasm", "--write", "/dev/termination-log"],
                               mounts=[log_mount])
            assert (await wait_state(client, term, cri.CONTAINER_EXITED)).exit_code == 0
            assert termination_log.read_text() == "written by wasm\n"
            # A read-only file bind stays read-only for the module.
            ro = await start(client, pod_id, pod, "ro", ["/argsenv.wasm", "--write", "/etc/app.conf"], mounts=mounts)
            assert (await wait_state(client, ro, cri.CONTAINER_EXITED)).exit_code == 2
            assert config_file.read_text() == "setting = 42\n"
            # With readOnlyRootFilesystem the termination log is still written, and the root is not.
            termination_log.write_text("")
            term_ro = await start(client, pod_id, pod, "term-ro", ["/argsenv.wasm", "--write", "/dev/termination-log"],
                                  mounts=[log_mount], readonly_rootfs=True)
            assert (await wait_state(client, term_ro, cri.CONTAINER_EXITED)).exit_code == 0
            assert termination_log.read_text() == "written by wasm\n"
            root_ro = await start(client, pod_id, pod, "root-ro", ["/argsenv.wasm", "--write", "/tmp/x.txt"],
                                  mounts=[log_mount], readonly_rootfs=True)
            assert (await wait_state(client, root_ro, cri.CONTAINER_EXITED)).exit_code == 2
            # A subPath file under a volume's mount point is reached through that volume.
            volume = tmp_path / "volume"
            volume.mkdir()
            sub = await start(client, pod_id, pod, "sub", ["/argsenv.wasm", "--read", "/data/app.conf"],
                              mounts=[cri.Mount(container_path="/data", host_path=str(volume)),
                                      cri.Mount(container_path="/data/app.conf", host_path=str(config_file),
                                                readonly=True)])
            assert (await wait_state(client, sub, cri.CONTAINER_EXITED)).exit_code == 0
            assert "setting = 42" in await wait_log(pod, "sub", "setting = 42")
            await remove_pod(client, pod_id)

    asyncio.run(scenario())


def test_a_missing_module_is_a_clear_create_error(stack: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "errors", stack.log_dir)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await start(client, pod_id, pod, "missing", ["/nope.wasm"])
            assert "wasm module '/nope.wasm' not found" in missing.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as notwasm:
                await start(client, pod_id, pod, "notwasm", ["/etc/greeting.txt"])
            # (then run as a Linux container: test_wasm_linux_containers.py)
            assert "not a WebAssembly module" in notwasm.value.details()
            await remove_pod(client, pod_id)

    asyncio.run(scenario())


def test_a_component_runs_through_cri_with_its_args_and_exit_code(stack: Stack) -> None:
    """A WASI preview 2 command (tests/fixtures/wasm/component.wat) in the image's rootfs."""
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "components", stack.log_dir)
            ok = await start(client, pod_id, pod, "ok", ["/component.wasm"])
            failing = await start(client, pod_id, pod, "failing", ["/component.wasm", "two words"])
            assert (await wait_state(client, ok, cri.CONTAINER_EXITED)).exit_code == 0
            assert (await wait_state(client, failing, cri.CONTAINER_EXITED)).exit_code == 1
            assert "hello from a component" in await wait_log(pod, "ok", "/component.wasm")
            assert "two words" in await wait_log(pod, "failing", "two words")
            with pytest.raises(grpc.aio.AioRpcError) as hashed:
                await start(client, pod_id, pod, "hashed", ["/component.wasm#run"])
            assert "a component runs its wasi:cli/run export" in hashed.value.details()
            # Outgoing HTTP through wasi:http, from the pod's network (the host's here) to a server of ours.
            with http_echo_server() as authority:
                fetch = await start(client, pod_id, pod, "fetch", ["/http_get.wasm", authority, "/from-a-pod"])
                assert (await wait_state(client, fetch, cri.CONTAINER_EXITED)).exit_code == 0
            assert "status 200\nyou asked for /from-a-pod" in await wait_log(pod, "fetch", "/from-a-pod")
            await remove_pod(client, pod_id)

    asyncio.run(scenario())


# runwasi's layer media type for a module (or component) in a wasm OCI image.
WASM_LAYER = "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm"


def test_a_module_carried_as_an_image_layer_runs_as_with_runwasi(stack: Stack, tmp_path: Path) -> None:
    """A wasm OCI image (config architecture `wasm`, the module a layer of a wasm media type, no tar
    layer): containerd unpacks nothing, the task server reads the layer through containerd's API."""
    import wasmtime

    modules = assemble_modules()
    # hello with 3 MiB of data: containerd sends a layer in 1 MiB chunks, and the reply is many times
    # HTTP/2's initial 64 KiB flow-control window, which only our client's window updates reopen.
    padding = '(memory (export "memory") 64)\n  (data (i32.const 65536) "%s")' % ("k" * (3 << 20))
    hello = (FIXTURES / "hello.wat").read_text().replace('(memory (export "memory") 1)', padding)
    modules["big"] = bytes(wasmtime.wat2wasm(hello))
    assert len(modules["big"]) > 3 << 20
    # loop with an export beside its _start, for an exec of the layer's module (`probe#greet`).
    greet = ('(data (i32.const 96) "greetings from the layer\\n")\n'
             '  (func (export "greet")\n'
             '    (i32.store (i32.const 0) (i32.const 96))\n'
             '    (i32.store (i32.const 4) (i32.const 25))\n'
             '    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))\n'
             '  (func (export "_start")')
    modules["spin"] = bytes(wasmtime.wat2wasm((FIXTURES / "loop.wat").read_text().replace(
        '(func (export "_start")', greet)))
    wasm_ref, linux_ref = "localhost/kuasar/wasm-layer:latest", "localhost/kuasar/wasm-layer-linux:latest"
    spin_ref = "localhost/kuasar/wasm-layer-spin:latest"
    component_ref = "localhost/kuasar/wasm-layer-component:latest"
    for ref, module in ((wasm_ref, "big"), (spin_ref, "spin"), (component_ref, "component")):
        stack.containerd.import_image(images.build_oci_archive(
            tmp_path / f"{module}.tar", ref, [(WASM_LAYER, modules[module])], entrypoint=["_start"]),
            platform="wasip1/wasm")
    # The same layer in an image that is no wasm image: not run (runwasi goes by the architecture too).
    stack.containerd.import_image(images.build_oci_archive(
        tmp_path / "linux.tar", linux_ref, [(WASM_LAYER, modules["hello"])], architecture="amd64",
        os_name="linux", entrypoint=["_start"]), platform="linux/amd64")

    async def run(client: CriClient, pod_id: str, pod: cri.PodSandboxConfig, name: str, image: str,
                  command: list[str]) -> str:
        config = container_config(name, image, command, log_path=f"{name}.log")
        cid = (await client.create_container(pod_id, config, pod)).container_id
        await client.start_container(cid)
        return cid

    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "layers", stack.log_dir)
            cid = await run(client, pod_id, pod, "layer", wasm_ref, [])  # the image's entrypoint: _start
            assert (await wait_state(client, cid, cri.CONTAINER_EXITED)).exit_code == 0
            assert "hello from wasm" in await wait_log(pod, "layer", "hello on stderr")
            # args[0] names the export only: the module is the layer's, whatever file it names.
            export = await run(client, pod_id, pod, "export", wasm_ref, ["/anything.wasm#greet"])
            assert (await wait_state(client, export, cri.CONTAINER_EXITED)).exit_code == 0
            assert "hello from an export" in await wait_log(pod, "export", "hello from an export")
            # A component (WASI preview 2) as the layer, as the CNCF wasm artifact carries one.
            component = await run(client, pod_id, pod, "component", component_ref, ["_start", "x"])
            assert (await wait_state(client, component, cri.CONTAINER_EXITED)).exit_code == 1  # run: err
            assert "hello from a component\n_start\nx" in await wait_log(pod, "component", "_start\nx")
            with pytest.raises(grpc.aio.AioRpcError) as linux:
                await run(client, pod_id, pod, "linux", linux_ref, [])
            assert "wasm module '_start' not found in the container's rootfs" in linux.value.details()
            # The layer is written into the task's bundle, which containerd removes with the task.
            spinning = await run(client, pod_id, pod, "spin", spin_ref, [])
            await wait_state(client, spinning, cri.CONTAINER_RUNNING)
            written = list(stack.containerd.state_dir.rglob("image-layer.wasm"))
            assert [path.read_bytes() for path in written] == [modules["spin"]]
            # An exec whose args[0] names no file in the rootfs runs the container's layer, args[0]
            # choosing the export (the layer read at Create: containerd is not asked again).
            probe = await client.exec_sync(spinning, ["probe#greet"], timeout=20)
            assert (probe.exit_code, probe.stdout) == (0, b"greetings from the layer\n"), probe
            with pytest.raises(grpc.aio.AioRpcError) as no_export:
                await client.exec_sync(spinning, ["probe#absent"], timeout=20)
            assert "absent" in no_export.value.details()
            await client.stop_container(spinning, 0)
            await wait_state(client, spinning, cri.CONTAINER_EXITED)
            for container in (cid, export, spinning, component):
                await client.remove_container(container)
            await remove_pod(client, pod_id)
            assert list(stack.containerd.state_dir.rglob("image-layer.wasm")) == []

    asyncio.run(scenario())


def pty_size(pid: int) -> tuple[int, int]:
    """(width, height) of the terminal on `pid`'s stdin, read through /proc."""
    fd = os.open(f"/proc/{pid}/fd/0", os.O_RDWR | os.O_NOCTTY)
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    finally:
        os.close(fd)
    return cols, rows


def on_a_terminal(stack: Stack) -> list[int]:
    """The task server's wasm processes whose stdin is a pty."""
    found = []
    for proc in psutil.Process(task_server_pid(stack.sandboxer_dir)).children():
        try:
            if os.readlink(f"/proc/{proc.pid}/fd/0").startswith("/dev/pts/"):
                found.append(proc.pid)
        except OSError:  # gone meanwhile
            pass
    return found


async def interrupted_terminal_exec(stack: Stack, url: str, size: tuple[int, int]) -> str:
    """`kubectl exec -it`: resize the terminal, see the size arrive at the process's pty, then type ^C.
    Returns what the error channel said (the exit status)."""
    async with streaming_session(url, timeout=30) as ws:
        await ws.send(bytes([RESIZE]) + json.dumps({"Width": size[0], "Height": size[1]}).encode())
        for _ in range(400):  # the session's timeout bounds it too
            if [pid for pid in on_a_terminal(stack) if pty_size(pid) == size]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"no process with a {size} terminal: {on_a_terminal(stack)}")
        await ws.send(bytes([STDIN]) + b"\x03")
        return "".join([payload.decode(errors="replace") async for channel, payload in channel_messages(ws)
                        if channel == ERROR])


def test_terminals_a_tty_container_and_interactive_execs_with_resize_and_interrupt(stack: Stack) -> None:
    """tty: true gives a module a pty (its line discipline shows: \r\n line ends, echo, ^D as end of
    input, ^C as SIGINT), resized through ResizePty, copied to and from containerd's FIFOs."""
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "tty", stack.log_dir)
            tty = await start(client, pod_id, pod, "tty", ["/hello.wasm"], tty=True)
            assert (await wait_state(client, tty, cri.CONTAINER_EXITED)).exit_code == 0
            await wait_log(pod, "tty", "hello on stderr")
            raw = (Path(pod.log_directory) / "tty.log").read_bytes()
            # Both lines came through the one pty (CRI strips its \r): the stderr line is logged as stdout.
            assert b" stdout F hello from wasm\n" in raw and b" stdout F hello on stderr\n" in raw, raw
            # An idle init (it reads a stdin nobody writes to), then `kubectl exec -it` twice.
            idle = await start(client, pod_id, pod, "idle", ["/cat.wasm"], stdin=True)
            await wait_state(client, idle, cri.CONTAINER_RUNNING)
            url = await client.exec(idle, ["/cat.wasm"], tty=True, stdin=True, stdout=True)
            out, error = await exec_over_websocket(url, stdin=b"typed\n\x04")
            # The terminal echoes the line, cat copies it, ^D ends its input, and its stderr arrives too.
            assert out.count(b"typed\r\n") == 2 and out.endswith(b"EOF\r\n"), (out, error)
            url = await client.exec(idle, ["/cat.wasm"], tty=True, stdin=True, stdout=True)
            error = await interrupted_terminal_exec(stack, url, (111, 33))
            assert "130" in error, error  # 128 + SIGINT: ^C signalled the module, its terminal's foreground
            assert on_a_terminal(stack) == []  # nothing left holding a pty
            await remove_pod(client, pod_id)

    asyncio.run(scenario())


@pytest.mark.parametrize("module", ["cat", "component_cat"])  # a core module and a component (preview 2)
def test_attach_to_a_tty_module_like_kubectl_run_it(stack: Stack, module: str) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "attach", stack.log_dir)
            cid = await start(client, pod_id, pod, module, [f"/{module}.wasm"], tty=True, stdin=True,
                              stdin_once=True)
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            out, error = await exec_over_websocket(await client.attach(cid, tty=True, stdin=True),
                                                   stdin=b"attached\n\x04", resize=(100, 30))
            assert out.count(b"attached\r\n") == 2 and out.endswith(b"EOF\r\n"), (out, error)
            assert (await wait_state(client, cid, cri.CONTAINER_EXITED)).exit_code == 0
            await remove_pod(client, pod_id)

    asyncio.run(scenario())


def test_wasmedge_selected_without_binary_is_a_clear_error(stack: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "wasmedge", stack.log_dir)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await start(client, pod_id, pod, "edge", ["/hello.wasm"],
                             annotations={"io.kuasar.wasm.runtime": "wasmedge"})
            assert "runtime wasmedge selected but no WasmEdge binary 'wasmedge' was found" in err.value.details()
            # ... and the wasmtime path is unaffected, in the same pod.
            cid = await start(client, pod_id, pod, "still-fine", ["/hello.wasm"])
            assert (await wait_state(client, cid, cri.CONTAINER_EXITED)).exit_code == 0
            await remove_pod(client, pod_id)

    asyncio.run(scenario())


@pytest.mark.parametrize("module", ["cat", "component_cat"])  # a core module and a component (preview 2)
def test_stdin_reaches_the_module(stack: Stack, module: str) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "stdin", stack.log_dir)
            cid = await start(client, pod_id, pod, module, [f"/{module}.wasm"], stdin=True, stdin_once=True)
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            url = (await client.runtime.Attach(cri.AttachRequest(container_id=cid, stdin=True, stdout=False,
                                                                 stderr=False), timeout=20)).url
            # With stdin_once, containerd closes the container's stdin when the attach session ends.
            await send_stdin_and_close(url, b"line one\nline two\n")
            assert (await wait_state(client, cid, cri.CONTAINER_EXITED)).exit_code == 0
            text = await wait_log(pod, module, "EOF")
            assert "line one\nline two" in text
            await remove_pod(client, pod_id)

    asyncio.run(scenario())


def test_stop_kills_a_spinning_module_and_one_blocked_on_stdin(stack: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "stop", stack.log_dir)
            spinning = await start(client, pod_id, pod, "loop", ["/loop.wasm"])
            blocked = await start(client, pod_id, pod, "blocked", ["/cat.wasm"], stdin=True)
            killed = await start(client, pod_id, pod, "killed", ["/loop.wasm"])
            for cid in (spinning, blocked, killed):
                await wait_state(client, cid, cri.CONTAINER_RUNNING)
            await wait_log(pod, "loop", "looping")
            started = time.monotonic()
            await client.stop_container(spinning, timeout=10)
            await client.stop_container(blocked, timeout=10)
            assert time.monotonic() - started < 5  # SIGTERM did it: no 10 s grace period ran out
            assert (await client.container_status(spinning)).status.exit_code == 143
            assert (await client.container_status(blocked)).status.exit_code == 143
            await client.stop_container(killed, timeout=0)  # SIGKILL straight away
            assert (await client.container_status(killed)).status.exit_code == 137
            await remove_pod(client, pod_id)

    asyncio.run(scenario())


def test_memory_limit_is_a_store_limit_and_a_cgroup_limit(stack: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "memory", stack.log_dir)
            limited = await start(client, pod_id, pod, "limited", ["/memhog.wasm"], memory_limit=32 * MiB)
            free = await start(client, pod_id, pod, "free", ["/memhog.wasm"])
            got = (await wait_state(client, limited, cri.CONTAINER_EXITED)).exit_code
            assert 0 < got <= 32, got  # the module asked for 100 MiB and got what the limit allows
            assert f"memhog: got {got} MiB" in await wait_log(pod, "limited", "memhog")
            assert (await wait_state(client, free, cri.CONTAINER_EXITED)).exit_code == 100
            # The cgroup limit covers the whole process (runtime and compiled code too): a module that
            # really uses all the linear memory the store allows goes over it and is OOM-killed.
            toucher = await start(client, pod_id, pod, "toucher", ["/memhog.wasm", "touch"],
                                  memory_limit=32 * MiB)
            oom = await wait_state(client, toucher, cri.CONTAINER_EXITED, timeout=60)
            assert (oom.exit_code, oom.reason) == (137, "OOMKilled"), oom
            # A module whose declared minimum memory exceeds the limit is refused when the task is created.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await start(client, pod_id, pod, "bigmem", ["/bigmem.wasm"], memory_limit=32 * MiB)
            assert "memory minimum size of 1024 pages exceeds memory limits" in refused.value.details()
            await remove_pod(client, pod_id)

    asyncio.run(scenario())


def test_exec_runs_modules_inside_the_container(stack: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "exec", stack.log_dir)
            cid = await start(client, pod_id, pod, "main", ["/loop.wasm"])
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            hello = await client.exec_sync(cid, ["/hello.wasm"], timeout=20)
            assert (hello.exit_code, hello.stdout, hello.stderr) == (0, b"hello from wasm\n", b"hello on stderr\n")
            code = await client.exec_sync(cid, ["/exitcode.wasm", "201"], timeout=20)
            assert code.exit_code == 201
            # Same rootfs as the container: an exec writes a file that another exec reads back.
            write = await client.exec_sync(cid, ["/argsenv.wasm", "--write", "/tmp/note.txt"], timeout=20)
            assert write.exit_code == 0, write
            read = await client.exec_sync(cid, ["argsenv.wasm", "--read", "/tmp/note.txt"], timeout=20)
            assert read.stdout.endswith(b"written by wasm\n"), read
            # An exec runs `module.wasm#function` as a container does (it was refused at Exec).
            export = await client.exec_sync(cid, ["/hello.wasm#greet"], timeout=20)
            assert (export.exit_code, export.stdout) == (0, b"hello from an export\n"), export
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await client.exec_sync(cid, ["/nope.wasm"], timeout=20)
            assert "not found" in missing.value.details()
            # The container process keeps running through all of it.
            assert (await client.container_status(cid)).status.state == cri.CONTAINER_RUNNING
            await remove_pod(client, pod_id)

    asyncio.run(scenario())


def test_two_containers_share_the_pod_namespaces_and_have_their_own_cgroups(stack: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "pair", stack.log_dir, host_network=False, hostname="pair")
            first = await start(client, pod_id, pod, "first", ["/loop.wasm"], memory_limit=48 * MiB)
            second = await start(client, pod_id, pod, "second", ["/loop.wasm"])
            seen = []
            for cid in (first, second):
                await wait_state(client, cid, cri.CONTAINER_RUNNING)
                info = await runtime_info(client, cid)
                pid = info["pid"]
                for ns in info["runtimeSpec"]["linux"]["namespaces"]:
                    if ns["type"] in ("network", "ipc", "uts"):
                        kind = {"network": "net"}.get(ns["type"], ns["type"])
                        assert os.readlink(f"/proc/{pid}/ns/{kind}") == os.readlink(ns["path"]), ns
                assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
                cgroup_path = info["runtimeSpec"]["linux"]["cgroupsPath"].lstrip("/")
                assert f"/{cgroup_path}" in Path(f"/proc/{pid}/cgroup").read_text()
                seen.append((pid, cgroup_path))
            assert seen[0][1] != seen[1][1]
            v2 = cgroups.is_unified()
            limit = hierarchy_of("memory") / seen[0][1] / ("memory.max" if v2 else "memory.limit_in_bytes")
            assert int(limit.read_text()) == 48 * MiB
            stats = (await client.container_stats(first)).stats
            assert stats.memory.working_set_bytes.value > 0 or stats.memory.usage_bytes.value > 0
            await client.update_container_resources(first, cri.LinuxContainerResources(
                memory_limit_in_bytes=96 * MiB, cpu_shares=512))
            assert int(limit.read_text()) == 96 * MiB
            shares = hierarchy_of("cpu") / seen[0][1] / ("cpu.weight" if v2 else "cpu.shares")
            assert shares.read_text().strip() == ("20" if v2 else "512")  # v2's weight as runc converts it
            await remove_pod(client, pod_id)
            for _, cgroup_path in seen:
                assert cgroups_named(cgroup_path) == []

    asyncio.run(scenario())


def test_pod_stop_kills_containers_and_remove_leaves_nothing(stack: Stack) -> None:
    cgroup_parent = f"kuasar-wasm-it-{os.getpid()}/pod-a"
    cgroup_paths: list[str] = []

    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "teardown", stack.log_dir, cgroup_parent=cgroup_parent)
            looping = await start(client, pod_id, pod, "loop", ["/loop.wasm"], memory_limit=64 * MiB)
            blocked = await start(client, pod_id, pod, "blocked", ["/cat.wasm"], stdin=True)
            for cid in (looping, blocked):
                await wait_state(client, cid, cri.CONTAINER_RUNNING)
                cgroup_paths.append((await runtime_info(client, cid))["runtimeSpec"]["linux"]["cgroupsPath"])
            assert len(container_processes()) == 2
            assert all(path.lstrip("/").startswith(f"{cgroup_parent}/") for path in cgroup_paths), cgroup_paths
            assert (hierarchy_of("memory") / cgroup_paths[0].lstrip("/")).is_dir()
            await client.stop_pod_sandbox(pod_id)
            for cid in (looping, blocked):
                assert (await client.container_status(cid)).status.state == cri.CONTAINER_EXITED
            assert (await client.pod_sandbox_status(pod_id)).status.state == cri.SANDBOX_NOTREADY
            await client.remove_pod_sandbox(pod_id)
            with pytest.raises(grpc.aio.AioRpcError):
                await client.pod_sandbox_status(pod_id)

    asyncio.run(scenario())
    assert cgroups_named(cgroup_parent.split("/")[0]) == [], "the parent is gone from every hierarchy"
    assert_nothing_left(stack)


def assert_nothing_left(stack: Stack) -> None:
    """No process, mount, state file or container cgroup of this stack's pods is left."""
    server = task_server_pid(stack.sandboxer_dir)
    assert children_of(server) == []  # pod processes and container processes are its children
    assert container_processes() == []
    assert list((stack.sandboxer_dir / "sandboxes").iterdir()) == []
    assert mounts_containing(str(stack.containerd.state_dir)) == []
    assert list((stack.sandboxer_dir / "wasm-cache").glob(".*.tmp")) == []


def test_sandboxer_sigkill_and_restart_keeps_wasm_containers_running(stack: Stack) -> None:
    async def before() -> tuple[str, str]:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "survivor", stack.log_dir)
            cid = await start(client, pod_id, pod, "loop", ["/loop.wasm"])
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            return pod_id, cid

    pod_id, cid = asyncio.run(before())
    server = task_server_pid(stack.sandboxer_dir)
    stack.sandboxer.send_signal(signal.SIGKILL)
    stack.sandboxer.wait(10)
    stack.sandboxer = start_sandboxer(stack.sandboxer_socket, stack.sandboxer_dir, stack.sandboxer_log,
                                      stack.containerd.ttrpc_address, module="kuasar.wasm.cli")

    async def after() -> None:
        async with CriClient(stack.address) as client:
            status = await while_unavailable(lambda: client.pod_sandbox_status(pod_id))
            assert status.status.state == cri.SANDBOX_READY
            assert (await client.container_status(cid)).status.state == cri.CONTAINER_RUNNING
            hello = await client.exec_sync(cid, ["/hello.wasm"], timeout=20)
            assert hello.stdout == b"hello from wasm\n"
            await client.stop_container(cid, timeout=10)
            assert (await client.container_status(cid)).status.exit_code == 143
            await remove_pod(client, pod_id)

    asyncio.run(after())
    assert task_server_pid(stack.sandboxer_dir) == server, "a second task server was started"
    assert_nothing_left(stack)


@pytest.mark.parametrize("made_by_kubelet", [False, True], ids=["parent-made-for-the-pod", "parent-made-by-kubelet"])
def test_a_killed_task_server_takes_its_wasm_containers_along_and_leaves_nothing(stack: Stack,
                                                                                 made_by_kubelet: bool) -> None:
    # With a parent kubelet made (not in the pod's record), the container's cgroup <parent>/<id>, beside
    # the pod's process leaf, was left for good: only the wasm task server's own record of it says it is ours.
    cgroup_parent = f"kuasar-wasm-crash-{os.getpid()}/pod-a"
    kubelets = [root / cgroup_parent for root in cgroups.hierarchy_roots()] if made_by_kubelet else []
    if made_by_kubelet:  # as kubelet makes it: a v1 cpuset one with the CPUs and memory nodes of its parent
        cgroups.PodCgroup(cgroup_parent).create()

    async def before() -> tuple[str, str]:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "crash", stack.log_dir, cgroup_parent=cgroup_parent)
            cid = await start(client, pod_id, pod, "loop", ["/loop.wasm"])
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            return pod_id, cid

    pod_id, cid = asyncio.run(before())
    assert len(container_processes()) == 1
    wait_leftovers_recorded(stack.sandboxer_dir, pod_id)  # written just after Create
    pod_pid = json.loads((stack.sandboxer_dir / "sandboxes" / pod_id / "sandbox.json").read_text())["pid"]
    old_server = task_server_pid(stack.sandboxer_dir)
    os.kill(old_server, signal.SIGKILL)

    async def after() -> None:
        async with CriClient(stack.address) as client:
            await wait_ended_with_task_server(client, pod_id, [cid])
            assert container_processes() == []  # it died with its task server
            # The new task server swept the pod's cgroups and the container's (and the parent made for it).
            assert cgroups_named(f"{cgroup_parent}/{cid}") == []
            assert cgroups_named(cgroup_parent) == kubelets
            await remove_pod(client, pod_id)

    try:
        asyncio.run(after())
    finally:
        for directory in kubelets:  # kubelet's to remove
            for below in (directory, directory.parent):
                with contextlib.suppress(OSError):
                    below.rmdir()
    assert task_server_pid(stack.sandboxer_dir) != old_server
    assert cgroups_named(cgroup_parent.split("/")[0]) == []
    assert [p for p in pod_processes() if p.pid == pod_pid] == []
    assert_nothing_left(stack)


def test_a_pod_with_its_own_user_namespace_is_refused_at_run_pod_sandbox(stack: Stack) -> None:
    """Modules run in processes of the task server, which cannot enter a pod's user namespace."""
    asyncio.run(check_user_namespace_refused(stack.address, WASM_HANDLER, stack.log_dir, "wasm"))
