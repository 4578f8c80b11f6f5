"""Small CRI steps shared by the integration tests (all through containerd's real CRI plugin)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psutil

from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2 as sb
from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2_grpc as sb_grpc
from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient, container_config, pod_config

BUSYBOX = "localhost/kuasar/busybox:latest"
HANDLER = "kuasar-runc"
T = TypeVar("T")


async def run_pod(client: CriClient, name: str, log_root: Path, handler: str = HANDLER,
                  **kwargs) -> tuple[str, cri.PodSandboxConfig]:
    uid = uuid.uuid4().hex[:12]
    config = pod_config(name, uid=uid, log_directory=str(log_root / f"{name}-{uid}"), **kwargs)
    response = await client.run_pod_sandbox(config, runtime_handler=handler)
    return response.pod_sandbox_id, config


async def start_container(client: CriClient, pod_id: str, pod: cri.PodSandboxConfig, name: str,
                          command: list[str], **kwargs) -> str:
    config = container_config(name, BUSYBOX, command, log_path=f"{name}.log", **kwargs)
    cid = (await client.create_container(pod_id, config, pod)).container_id
    await client.start_container(cid)
    return cid


async def wait_state(client: CriClient, cid: str, state: int, timeout: float = 30.0) -> cri.ContainerStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = (await client.container_status(cid)).status
        if status.state == state:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"container {cid} stayed {cri.ContainerState.Name(status.state)}")
        await asyncio.sleep(0.05)


async def wait_pod_not_ready(client: CriClient, pod_id: str, why: str, timeout: float = 30.0) -> None:
    """Until CRI reports the pod NOTREADY (its sandbox exited); `why` is the failure's message."""
    deadline = time.monotonic() + timeout
    while (await client.pod_sandbox_status(pod_id)).status.state != cri.SANDBOX_NOTREADY:
        assert time.monotonic() < deadline, why
        await asyncio.sleep(0.1)


async def wait_ended_with_task_server(client: CriClient, pod_id: str, cids: list[str]) -> None:
    """After a SIGKILL of the task server: until CRI reports the pod NOTREADY (the sandboxer's watch of it
    failed, and a task server started again said it is gone) and each container exited (containerd lost
    its task connection)."""
    await wait_pod_not_ready(client, pod_id, "the pod was never reported exited")
    for cid in cids:
        await wait_state(client, cid, cri.CONTAINER_EXITED)


def runc_containers(sandboxer_dir: Path) -> list[str]:
    """The ids in a task server's runc root (runc-sandboxer's, or wasm-sandboxer's Linux containers)."""
    listed = subprocess.run(["runc", "--root", str(sandboxer_dir / "runc"), "list", "-q"],
                            capture_output=True, text=True, check=True)
    return listed.stdout.split()


def wait_leftovers_recorded(sandboxer_dir: Path, pod_id: str, timeout: float = 10.0) -> None:
    """Until the task server wrote the pod's pod.json (just after its Create answered)."""
    deadline = time.monotonic() + timeout
    while not (sandboxer_dir / "pods" / pod_id / "pod.json").exists():
        assert time.monotonic() < deadline, "the pod's leftovers were never recorded"
        time.sleep(0.05)


async def while_unavailable(call: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    """`call()`, retried while containerd answers UNAVAILABLE: its channel to a restarted sandboxer
    backs off for a while, and its own CRI is not served until it has come back up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


def log_text(pod: cri.PodSandboxConfig, name: str) -> str:
    """The CRI log's payload lines (`<time> <stream> <tag> <text>`), text only."""
    path = Path(pod.log_directory) / f"{name}.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return "\n".join(line.split(" ", 3)[3] for line in lines if line.count(" ") >= 3)


async def wait_log(pod: cri.PodSandboxConfig, name: str, needle: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while needle not in (text := log_text(pod, name)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in log of {name}: {text!r}")
        await asyncio.sleep(0.05)
    return text


async def check_user_namespace_refused(address: str, handler: str, log_dir: Path, sandbox_type: str) -> None:
    """A type whose containers cannot enter a pod's user namespace says so at RunPodSandbox."""
    async with CriClient(address) as client:
        try:
            pod_id, _ = await run_pod(client, "userns", log_dir, handler, host_network=False, userns_host_id=500000)
        except grpc.aio.AioRpcError as exc:
            assert f"not supported by the {sandbox_type} sandboxer" in (exc.details() or ""), exc.details()
            assert "hostUsers: false" in (exc.details() or "")
        else:
            await remove_pod(client, pod_id)
            raise AssertionError(f"{handler} ran a pod with its own user namespace")
        listed = await client.list_pod_sandbox()
        assert [p for p in listed.items if p.metadata.name == "userns"] == [], "no pod is left of it"


@contextlib.contextmanager
def traversable(path: Path) -> Iterator[None]:
    """Let every user through `path`'s ancestors (o+x) while the block runs, as containerd's own state
    directories are (/run/containerd is 0711): a user-namespaced container's root is an unprivileged
    host uid, and runc, entered in that namespace, must reach the rootfs under the bundle."""
    changed = []
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode & 0o7777
        if not mode & 0o001:
            directory.chmod(mode | 0o001)
            changed.append((directory, mode))
    try:
        yield
    finally:
        for directory, mode in changed:
            directory.chmod(mode)


async def stop_pod_while_stopped(client: CriClient, pod_id: str, pid: int) -> float:
    """StopPodSandbox of a pod whose `pid` (a gVisor sentry, QEMU) is stopped with SIGSTOP, so that it
    answers nothing: the seconds the stop took. The process is continued afterwards if it is still there."""
    import signal

    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        await client.stop_pod_sandbox(pod_id)
        return time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # (gone by now unless the stop failed)


async def remove_pod(client: CriClient, pod_id: str) -> None:
    await client.stop_pod_sandbox(pod_id)
    await client.remove_pod_sandbox(pod_id)


def pod_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "status"]):
        # Zombies only wait for this machine's PID 1 to reap them; they hold nothing.
        if (proc.info["name"] or "").startswith("pod-") and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def mounts_containing(fragment: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if fragment in line.split()[4]]


def children_of(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def sandbox_create_request(sandbox_id: str, sandboxer: str, hostname: str) -> sb.ControllerCreateRequest:
    """A Sandbox API Create of a pod with only a hostname, as containerd sends for RunPodSandbox."""
    request = sb.ControllerCreateRequest(sandbox_id=sandbox_id, sandboxer=sandboxer)
    request.options.value = cri.PodSandboxConfig(hostname=hostname).SerializeToString()
    return request


async def start_sandbox(controller: sb_grpc.ControllerStub, sandbox_id: str, sandboxer: str,
                        hostname: str) -> sb.ControllerStartResponse:
    """Create and Start a sandbox straight through the Sandbox API (no CRI)."""
    await controller.Create(sandbox_create_request(sandbox_id, sandboxer, hostname))
    return await controller.Start(sb.ControllerStartRequest(sandbox_id=sandbox_id))


def task_server_pid(directory: Path) -> int:
    return int((directory / "task-server.pid").read_text())


def exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


# Kubernetes' streaming protocol over WebSocket: one byte of channel, then the payload.
STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)


@contextlib.asynccontextmanager
async def streaming_session(url: str, timeout: float = 20.0) -> AsyncIterator[Any]:
    """A WebSocket session with containerd's streaming server at `url` (from Exec, Attach or
    PortForward), in Kubernetes' v4 channel protocol, bounded by `timeout` seconds."""
    import websockets

    async with asyncio.timeout(timeout), websockets.connect(url.replace("http://", "ws://", 1),
                                                            subprotocols=["v4.channel.k8s.io"],
                                                            max_size=None) as ws:
        yield ws


async def channel_messages(ws: Any) -> AsyncIterator[tuple[int, bytes]]:
    """(channel, payload) of every message the server sends, until it closes the session."""
    import websockets

    try:
        async for message in ws:
            data = message if isinstance(message, bytes) else message.encode()
            if data:
                yield data[0], data[1:]
    except websockets.ConnectionClosed:
        pass


async def exec_over_websocket(url: str, stdin: bytes = b"", resize: tuple[int, int] | None = None,
                              timeout: float = 20.0) -> tuple[bytes, str]:
    """Run a CRI Exec session at `url` (from Exec) and return (stdout, error channel text)."""
    out, error = b"", ""
    async with streaming_session(url, timeout) as ws:
        if resize is not None:
            width, height = resize
            await ws.send(bytes([RESIZE]) + json.dumps({"Width": width, "Height": height}).encode())
        if stdin:
            await ws.send(bytes([STDIN]) + stdin)
        async for channel, payload in channel_messages(ws):
            if channel in (STDOUT, STDERR):
                out += payload
            elif channel == ERROR:
                error += payload.decode(errors="replace")
    return out, error


async def check_pod_files(address: str, handler: str, log_dir: Path, pods_dir: Path) -> None:
    """Containers see /etc/hostname, /etc/hosts and /etc/resolv.conf as containerd's own pod sandbox
    provides them: the pod's hostname and DNS config in a networked pod, the node's in a host-network
    one; the files live in `pods_dir` while the pod does."""
    async def cat(client: CriClient, cid: str, path: str) -> str:
        result = await client.exec_sync(cid, ["cat", path], timeout=20)
        assert result.exit_code == 0, result.stderr
        return result.stdout.decode()

    async with CriClient(address) as client:
        config = pod_config("dns", uid=uuid.uuid4().hex[:12], log_directory=str(log_dir / "dns"),
                            host_network=False, hostname="web-1")
        config.dns_config.servers.extend(["10.96.0.10", "10.96.0.11"])
        config.dns_config.searches.extend(["default.svc.cluster.local", "svc.cluster.local"])
        config.dns_config.options.append("ndots:5")
        pod_id = (await client.run_pod_sandbox(config, runtime_handler=handler)).pod_sandbox_id
        cid = await start_container(client, pod_id, config, "sleeper", ["sleep", "3600"])
        await wait_state(client, cid, cri.CONTAINER_RUNNING)
        assert await cat(client, cid, "/etc/hostname") == "web-1\n"
        assert await cat(client, cid, "/etc/resolv.conf") == (
            "search default.svc.cluster.local svc.cluster.local\n"
            "nameserver 10.96.0.10\nnameserver 10.96.0.11\noptions ndots:5\n")
        assert await cat(client, cid, "/etc/hosts") == Path("/etc/hosts").read_text()
        host_id, host = await run_pod(client, "hostnet", log_dir, handler)
        host_cid = await start_container(client, host_id, host, "sleeper", ["sleep", "3600"])
        await wait_state(client, host_cid, cri.CONTAINER_RUNNING)
        assert await cat(client, host_cid, "/etc/hostname") == socket.gethostname() + "\n"
        assert await cat(client, host_cid, "/etc/resolv.conf") == Path("/etc/resolv.conf").read_text()
        assert {p.name for p in pods_dir.iterdir()} >= {pod_id, host_id}
        await remove_pod(client, pod_id)
        await remove_pod(client, host_id)
        assert not (pods_dir / pod_id).exists() and not (pods_dir / host_id).exists()


async def check_exit_codes(address: str, handler: str, log_dir: Path) -> None:
    """An exit status and a death by signal, as CRI reports them. The pod shares one PID namespace:
    its own process is PID 1 there, so a container's shell can die of a signal it sends itself. What
    a container's init left running dies with it, as under containerd's shim (the kernel would only
    do that for a PID namespace of the container's own); the pod's other containers live on."""
    async with CriClient(address) as client:
        pod_id, pod = await run_pod(client, "codes", log_dir, handler, share_pid=True)
        watcher = await start_container(client, pod_id, pod, "watcher", ["sleep", "3600"])
        await wait_state(client, watcher, cri.CONTAINER_RUNNING)
        # An orphan re-parents to the pod's PID 1, which reaps it as pause does: no zombie stays.
        listing = await client.exec_sync(watcher, ["sh", "-c", "(sleep 0.1 &); sleep 1; cat /proc/[0-9]*/stat"],
                                         timeout=20)
        states = [line.rsplit(")", 1)[1].split()[0] for line in listing.stdout.decode().splitlines() if ")" in line]
        assert states and "Z" not in states, listing.stdout
        seven = await start_container(client, pod_id, pod, "seven", ["sh", "-c", "sleep 4343 & sleep 0.2; exit 7"])
        killed = await start_container(client, pod_id, pod, "killed", ["sh", "-c", "kill -9 $$"])
        assert (await wait_state(client, seven, cri.CONTAINER_EXITED)).exit_code == 7
        assert (await wait_state(client, killed, cri.CONTAINER_EXITED)).exit_code == 137
        await wait_pod_processes_gone(client, watcher, "sleep4343")
        assert (await client.container_status(watcher)).status.state == cri.CONTAINER_RUNNING
        await remove_pod(client, pod_id)


async def start_shm_writer_and_reader(client: CriClient, pod_id: str,
                                      pod: cri.PodSandboxConfig) -> tuple[str, list[str]]:
    """Two containers of the pod: one writes /dev/shm/note, the other must read it (one /dev/shm per pod,
    as through a pause container's IPC). The reader's id and its /dev/shm line of /proc/mounts, split."""
    writer = await start_container(client, pod_id, pod, "writer",
                                   ["sh", "-c", "echo from-writer > /dev/shm/note; sleep 3600"])
    reader = await start_container(client, pod_id, pod, "reader", ["sleep", "3600"])
    await wait_state(client, writer, cri.CONTAINER_RUNNING)
    await wait_state(client, reader, cri.CONTAINER_RUNNING)
    read = await client.exec_sync(reader, ["sh", "-c", "for i in $(seq 50); do [ -s /dev/shm/note ] && break; "
                                                       "sleep 0.1; done; cat /dev/shm/note"], timeout=20)
    assert read.stdout == b"from-writer\n", read
    mount = await client.exec_sync(reader, ["sh", "-c", "grep ' /dev/shm ' /proc/mounts"], timeout=20)
    return reader, mount.stdout.decode().split()


async def check_failed_start_leaves_a_removable_container(address: str, handler: str, log_dir: Path) -> None:
    """A container whose entrypoint does not exist fails to start, is reported exited, and it and its
    pod can be removed (under gVisor a failed start left it created for ever: neither removable nor its
    pod). An exec of a missing program fails and the container goes on."""
    async with CriClient(address) as client:
        pod_id, pod = await run_pod(client, "badstart", log_dir, handler)
        sleeper = await start_container(client, pod_id, pod, "sleeper", ["sleep", "3600"])
        await wait_state(client, sleeper, cri.CONTAINER_RUNNING)
        try:  # runc's shell-less exec exits 127; gVisor's (as under its own shim) fails to start
            missing = await client.exec_sync(sleeper, ["/no/such/program"], timeout=20)
            assert missing.exit_code != 0, missing
        except grpc.aio.AioRpcError as exc:
            assert "no such file" in (exc.details() or "").lower(), exc.details()
        config = container_config("broken", BUSYBOX, ["/no/such/program"], log_path="broken.log")
        cid = (await client.create_container(pod_id, config, pod)).container_id
        try:
            await client.start_container(cid)
        except grpc.aio.AioRpcError as exc:
            assert "no such file" in (exc.details() or "").lower(), exc.details()
        else:
            raise AssertionError("a container without its entrypoint started")
        assert (await client.container_status(cid)).status.state == cri.CONTAINER_EXITED
        await client.remove_container(cid)
        assert (await client.container_status(sleeper)).status.state == cri.CONTAINER_RUNNING
        await remove_pod(client, pod_id)
        assert [p for p in (await client.list_pod_sandbox()).items if p.id == pod_id] == []


async def wait_pod_processes_gone(client: CriClient, cid: str, cmdline: str, timeout: float = 10.0) -> None:
    """Until no process whose command line (NULs dropped) is `cmdline` is seen from container `cid`."""
    deadline = time.monotonic() + timeout
    while True:
        listing = "for f in /proc/[0-9]*/cmdline; do tr -d '\\0' < $f; echo; done"
        seen = await client.exec_sync(cid, ["sh", "-c", listing], timeout=20)
        if cmdline not in seen.stdout.decode().split():
            return
        assert time.monotonic() < deadline, f"{cmdline} is still running: {seen.stdout!r}"
        await asyncio.sleep(0.1)


async def check_stop_sends_sigterm_then_sigkill(address: str, handler: str, log_dir: Path) -> None:
    """StopContainer: SIGTERM, and SIGKILL once the grace period is over for a container ignoring it."""
    async with CriClient(address) as client:
        pod_id, pod = await run_pod(client, "stop", log_dir, handler)
        polite = await start_container(client, pod_id, pod, "polite",
                                       ["sh", "-c", "trap 'echo got-term; exit 143' TERM; "
                                                    "while true; do sleep 0.1; done"])
        stubborn = await start_container(client, pod_id, pod, "stubborn",
                                         ["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"])
        await wait_state(client, polite, cri.CONTAINER_RUNNING)
        await wait_state(client, stubborn, cri.CONTAINER_RUNNING)
        await client.stop_container(polite, timeout=10)
        assert (await client.container_status(polite)).status.exit_code == 143
        assert "got-term" in log_text(pod, "polite")
        await client.stop_container(stubborn, timeout=1)
        assert (await client.container_status(stubborn)).status.exit_code == 137
        await client.remove_container(polite)
        await client.remove_container(stubborn)
        await remove_pod(client, pod_id)


async def check_port_forward(address: str, handler: str, log_dir: Path) -> None:
    """`kubectl port-forward`: containerd connects to the port inside the pod's network namespace (the
    one the pod's process holds), through its streaming server; a closed port is reported, not hung."""
    async with CriClient(address) as client:
        pod_id, pod = await run_pod(client, "web", log_dir, handler, host_network=False, hostname="web-pod")
        server = "mkdir -p /tmp/www && hostname > /tmp/www/name && exec httpd -f -p 8080 -h /tmp/www"
        cid = await start_container(client, pod_id, pod, "httpd", ["sh", "-c", server])
        await wait_state(client, cid, cri.CONTAINER_RUNNING)
        # httpd may not listen yet
        answer, error = await forward_until_answered(client, pod_id, 8080, b"GET /name HTTP/1.0\r\n\r\n", 10.0)
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\n\r\nweb-pod\n"), (answer, error)
        answer, error = await forward_once(await client.port_forward(pod_id, [8081]), 8081, b"x")
        assert not answer and "8081" in error, error
        await remove_pod(client, pod_id)


async def forward_until_answered(client: CriClient, pod_id: str, port: int, request: bytes,
                                 timeout: float = 30.0) -> tuple[bytes, str]:  # noqa: ASYNC109
    """forward_once through a new CRI PortForward session each time (a URL serves one), until the
    server in the pod answers or `timeout` has passed; the last (answer, error)."""
    deadline = time.monotonic() + timeout
    while True:
        answer, error = await forward_once(await client.port_forward(pod_id, [port]), port, request)
        if answer or time.monotonic() > deadline:
            return answer, error
        await asyncio.sleep(0.1)


async def forward_once(url: str, port: int, request: bytes, timeout: float = 20.0) -> tuple[bytes, str]:
    """One connection through a CRI PortForward session at `url` (kubectl port-forward's WebSocket
    protocol): send `request` to `port`, return (everything the pod answered, the error channel's text).

    Each port has a data channel (0) and an error channel (1); the server first writes the port number
    (16 bits, little-endian) on both, then the connection's bytes flow on the data channel."""
    import websockets

    answer, error, prefixes = b"", "", {0: b"", 1: b""}
    async with streaming_session(url + f"?port={port}", timeout) as ws:
        try:
            await ws.send(bytes([0]) + request)
        except websockets.ConnectionClosed:  # over already (a closed port): what it said is still read below
            pass
        async for channel, payload in channel_messages(ws):
            if channel not in prefixes:
                continue
            if len(prefixes[channel]) < 2:  # the port number comes first on each channel
                take = 2 - len(prefixes[channel])
                prefixes[channel] += payload[:take]
                payload = payload[take:]
                if len(prefixes[channel]) == 2:
                    assert struct.unpack("<H", prefixes[channel])[0] == port, prefixes
            if channel == 0:
                answer += payload
            else:
                error += payload.decode(errors="replace")
    return answer, error


async def terminal_exec(client: CriClient, cid: str) -> str:
    """`kubectl exec -it` into `cid`: a terminal with stdin; the shell reads a line typed into it and
    reports its terminal and the size CRI forwards (asynchronously: it polls until there is one).
    Returns the session's output, checked for all three."""
    script = ("read line; [ -t 0 ] && echo on-a-terminal=$(tty); for i in $(seq 100); do "
              "s=$(stty size 2>/dev/null); [ -n \"$s\" ] && [ \"$s\" != '0 0' ] && break; sleep 0.05; done; "
              "echo size=$s; echo got-$line")
    url = await client.exec(cid, ["sh", "-c", script], tty=True, stdin=True, stdout=True)
    out, error = await exec_over_websocket(url, stdin=b"typed\n", resize=(111, 33))
    text = out.decode(errors="replace")
    assert "on-a-terminal=" in text, (text, error)
    assert "size=33 111" in text, (text, error)
    assert "got-typed" in text, (text, error)
    return text


async def signalled_terminal_exec(client: CriClient, cid: str) -> None:
    """`kubectl exec -it` with a resize and a ^C while the process runs: the resize reaches it as SIGWINCH
    and ^C ends it as SIGINT (exit 130), as its terminal's foreground process."""
    script = "trap 'echo got-winch' WINCH; echo ready; while :; do sleep 0.1; done"
    url = await client.exec(cid, ["sh", "-c", script], tty=True, stdin=True, stdout=True)
    out, error = b"", ""
    async with streaming_session(url, timeout=30) as ws:
        messages = channel_messages(ws)

        async def read_until(marker: bytes) -> None:
            nonlocal out
            async for channel, payload in messages:
                out += payload if channel in (STDOUT, STDERR) else b""
                if marker in out:
                    return
            raise AssertionError(f"the session ended before {marker!r}: {out!r}")

        await read_until(b"ready")
        await ws.send(bytes([RESIZE]) + json.dumps({"Width": 101, "Height": 31}).encode())
        await read_until(b"got-winch")
        await ws.send(bytes([STDIN]) + b"\x03")
        async for channel, payload in messages:
            if channel == ERROR:
                error += payload.decode(errors="replace")
    assert "130" in error, (out, error)  # 128 + SIGINT


def cgroups_named(relative: str) -> list[Path]:
    """`relative` in every cgroup hierarchy that has it (all of them: runc and runsc make paths in the
    named and hybrid ones too, which a check of `memory` alone would miss)."""
    from kuasar.common import cgroups

    return [root / relative for root in cgroups.hierarchy_roots() if (root / relative).exists()]


def hierarchy_of(controller: str) -> Path:
    """Where `controller`'s cgroups are on the host: its own v1 hierarchy, or the one unified tree of v2."""
    from kuasar.common import cgroups

    return cgroups.CGROUP_ROOT if cgroups.is_unified() else cgroups.CGROUP_ROOT / controller


# A container's own memory limit as it reads it in its cgroup namespace (runc mounts its cgroup at
# /sys/fs/cgroup): memory.max under v2, memory.limit_in_bytes in v1's memory hierarchy.
def memory_limit_file_in_container() -> str:
    from kuasar.common import cgroups

    return "/sys/fs/cgroup/memory.max" if cgroups.is_unified() else "/sys/fs/cgroup/memory/memory.limit_in_bytes"
