"""runc-sandboxer under a real containerd 2.x, driven through CRI like kubelet drives it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from pathlib import Path

import grpc
import psutil
import pytest

from kuasar.common import cgroups, linux
from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient, container_config, pod_config
from kuasar.common.pod_sysctls import sysctl_path

from .conftest import Stack
from .cri_helpers import (
    BUSYBOX,
    HANDLER,
    cgroups_named,
    check_exit_codes,
    check_failed_start_leaves_a_removable_container,
    check_pod_files,
    check_port_forward,
    check_stop_sends_sigterm_then_sigkill,
    children_of,
    exec_over_websocket,
    hierarchy_of,
    memory_limit_file_in_container,
    mounts_containing,
    pod_processes,
    remove_pod,
    run_pod,
    signalled_terminal_exec,
    start_container,
    start_shm_writer_and_reader,
    task_server_pid,
    terminal_exec,
    traversable,
    wait_log,
    wait_state,
)

pytestmark = pytest.mark.integration


def runc_supports_idmap_mounts() -> bool:
    features = json.loads(subprocess.run(["runc", "features"], capture_output=True, check=True).stdout)
    return bool(((features.get("linux") or {}).get("mountExtensions") or {}).get("idmap", {}).get("enabled"))


def test_container_output_reaches_cri_log_and_pod_is_served_without_pause(stack: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "hello", stack.log_dir)
            status = (await client.pod_sandbox_status(pod_id)).status
            assert status.state == cri.SANDBOX_READY
            cid = await start_container(client, pod_id, pod, "hello",
                                        ["sh", "-c", "echo hello-from-kuasar; echo to-stderr >&2"])
            exited = await wait_state(client, cid, cri.CONTAINER_EXITED)
            assert exited.exit_code == 0
            text = await wait_log(pod, "hello", "to-stderr")
            assert "hello-from-kuasar" in text
            # 1:N: no shim and no pause container for this pod, only the task server's children.
            server = task_server_pid(stack.sandboxer_dir)
            assert any(p.info["name"].startswith("pod-") for p in pod_processes())
            assert all(p.ppid() == server for p in pod_processes())
            await client.remove_container(cid)
            await remove_pod(client, pod_id)

    stack.run(scenario())


def test_containers_see_the_pods_hostname_hosts_and_dns_config(stack: Stack) -> None:
    stack.run(check_pod_files(stack.address, HANDLER, stack.log_dir, stack.sandboxer_dir / "pods"))


def test_containers_of_a_pod_share_its_dev_shm_and_a_host_ipc_pod_uses_the_hosts(stack: Stack) -> None:
    """One tmpfs per pod at /dev/shm, as through a pause container's IPC: what one container writes
    there the other reads; it is unmounted with the pod. A host-IPC pod gets CRI's host /dev/shm."""
    async def run(client: CriClient, cid: str, command: str) -> str:
        result = await client.exec_sync(cid, ["sh", "-c", command], timeout=20)
        assert result.exit_code == 0, result.stderr
        return result.stdout.decode()

    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "shm", stack.log_dir)
            _, mount = await start_shm_writer_and_reader(client, pod_id, pod)
            assert mount[2] == "tmpfs" and "size=65536k" in mount[3]
            shm = stack.sandboxer_dir / "pods" / pod_id / "shm"
            assert os.path.ismount(shm) and (shm / "note").read_text() == "from-writer\n"

            host_config = pod_config("hostipc", uid=uuid.uuid4().hex[:12],
                                     log_directory=str(stack.log_dir / "hostipc"), host_network=True)
            host_config.linux.security_context.namespace_options.ipc = cri.NODE
            host_id = (await client.run_pod_sandbox(host_config, runtime_handler=HANDLER)).pod_sandbox_id
            host_cid = await start_container(client, host_id, host_config, "sleeper", ["sleep", "3600"])
            await wait_state(client, host_cid, cri.CONTAINER_RUNNING)
            assert not (stack.sandboxer_dir / "pods" / host_id / "shm").exists()
            marker = f"kuasar-shm-{uuid.uuid4().hex[:8]}"
            Path("/dev/shm", marker).write_text("host\n")
            try:
                assert await run(client, host_cid, f"cat /dev/shm/{marker}") == "host\n"
            finally:
                Path("/dev/shm", marker).unlink()

            # A /dev/shm its task server no longer knows (as after a restart of the task server) is
            # unmounted by the sandboxer's Shutdown before the pod's directory goes.
            stray = stack.sandboxer_dir / "pods" / host_id / "shm"
            stray.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "stray", str(stray)], check=True)

            # A stopped pod's /dev/shm is unmounted (its memory freed) at once, as containerd's own
            # sandbox Stop does; its other files stay until the pod is removed.
            await client.stop_pod_sandbox(pod_id)
            for _ in range(100):
                if not os.path.ismount(shm):
                    break
                await asyncio.sleep(0.05)
            assert not os.path.ismount(shm) and (shm.parent / "hostname").exists()
            await remove_pod(client, pod_id)
            await remove_pod(client, host_id)
            assert not os.path.ismount(shm) and not shm.parent.exists()
            assert not os.path.ismount(stray) and not stray.parent.exists()
            assert not mounts_containing(str(stack.sandboxer_dir / "pods"))

    stack.run(scenario())


def test_containers_and_execs_do_not_inherit_pythons_ignored_signals(stack: Stack) -> None:
    """Python ignores SIGPIPE and SIGXFSZ, and glibc's posix_spawn leaves 32 and 33 ignored; none of that
    may reach a container through runc (e.g. `yes | head` would never end, `kill -32` would do nothing)."""
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "signals", stack.log_dir)
            cid = await start_container(client, pod_id, pod, "status",
                                        ["sh", "-c", "cat /proc/self/status; sleep 3600"])
            text = await wait_log(pod, "status", "SigIgn")
            assert linux.ignored_signals(text) == set(), text
            result = await client.exec_sync(cid, ["cat", "/proc/self/status"], timeout=20)
            assert linux.ignored_signals(result.stdout.decode()) == set(), result.stdout
            piped = await client.exec_sync(cid, ["sh", "-c", "yes | head -n 2"], timeout=20)
            assert piped.stdout == b"y\ny\n" and piped.exit_code == 0
            await remove_pod(client, pod_id)

    stack.run(scenario())


def test_exit_codes_are_reported(stack: Stack) -> None:
    stack.run(check_exit_codes(stack.address, HANDLER, stack.log_dir))


def test_a_container_whose_start_fails_is_removed_with_its_pod(stack: Stack) -> None:
    stack.run(check_failed_start_leaves_a_removable_container(stack.address, HANDLER, stack.log_dir))


def test_exec_sync_returns_output_and_exit_code(stack: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "exec", stack.log_dir)
            cid = await start_container(client, pod_id, pod, "sleeper", ["sleep", "3600"])
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            result = await client.exec_sync(cid, ["sh", "-c", "echo out-$((6*7)); echo err >&2; exit 3"],
                                            timeout=20)
            assert result.exit_code == 3
            assert result.stdout == b"out-42\n"
            assert result.stderr == b"err\n"
            ok = await client.exec_sync(cid, ["hostname"], timeout=20)
            assert ok.exit_code == 0
            await remove_pod(client, pod_id)

    stack.run(scenario())


def test_stop_sends_sigterm_then_sigkill(stack: Stack) -> None:
    stack.run(check_stop_sends_sigterm_then_sigkill(stack.address, HANDLER, stack.log_dir))


def test_two_pods_side_by_side_have_their_own_namespaces(stack: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pods = []
            for name in ("left", "right"):
                pod_id, pod = await run_pod(client, name, stack.log_dir, host_network=False, hostname=name)
                cid = await start_container(client, pod_id, pod, "main", ["sleep", "3600"])
                await wait_state(client, cid, cri.CONTAINER_RUNNING)
                pods.append((pod_id, pod, cid))
            seen = []
            for _, _, cid in pods:
                host = await client.exec_sync(cid, ["hostname"], timeout=20)
                addr = await client.exec_sync(cid, ["ip", "-4", "-o", "addr", "show", "eth0"], timeout=20)
                assert addr.exit_code == 0, addr.stderr
                seen.append((host.stdout.strip(), addr.stdout.split()[3]))
            assert [h for h, _ in seen] == [b"left", b"right"]
            assert seen[0][1] != seen[1][1]
            statuses = [(await client.pod_sandbox_status(p)).status for p, _, _ in pods]
            assert all(s.network.ip for s in statuses)
            for pod_id, _, _ in pods:
                await remove_pod(client, pod_id)

    stack.run(scenario())


def test_pod_sysctls_and_containerds_defaults_are_set_in_the_pods_namespaces(stack: Stack) -> None:
    """As containerd's own sandbox sets them on its pause container: the pod's sysctls, and for a pod
    with its own network unprivileged low ports and ICMP sockets; the host keeps its values."""
    keys = ("net.ipv4.ip_local_port_range", "kernel.shm_rmid_forced", "net.ipv4.ip_unprivileged_port_start",
            "net.ipv4.ping_group_range")
    host = {key: Path("/proc/sys", sysctl_path(key)).read_text().split() for key in keys}

    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            sysctls = {"net.ipv4.ip_local_port_range": "40000 41000", "kernel.shm_rmid_forced": "1"}
            pod_id, config = await run_pod(client, "sysctls", stack.log_dir, host_network=False, sysctls=sysctls)
            cid = await start_container(client, pod_id, config, "main", ["sleep", "3600"])
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            paths = " ".join(str(Path("/proc/sys", sysctl_path(key))) for key in keys)
            seen = await client.exec_sync(cid, ["sh", "-c", f"for f in {paths}; do echo $(cat $f); done"], timeout=20)
            assert seen.exit_code == 0, seen.stderr
            assert [line.split() for line in seen.stdout.decode().splitlines()] == [
                ["40000", "41000"], ["1"], ["0"], ["0", "2147483647"]]
            await remove_pod(client, pod_id)
            # A sysctl the pod's namespaces do not scope is refused before anything is made.
            with pytest.raises(grpc.aio.AioRpcError, match="vm.swappiness is not scoped"):
                await run_pod(client, "sysctls", stack.log_dir, host_network=False,
                              sysctls={**sysctls, "vm.swappiness": "1"})

    stack.run(scenario())
    assert {key: Path("/proc/sys", sysctl_path(key)).read_text().split() for key in keys} == host
    assert_nothing_left(stack)


def test_port_forward_reaches_a_server_in_the_pods_network(stack: Stack) -> None:
    stack.run(check_port_forward(stack.address, HANDLER, stack.log_dir))


def test_a_pod_with_its_own_user_namespace_maps_its_containers_ids(stack: Stack) -> None:
    """kubelet's `hostUsers: false`: the pod process enters the user namespace containerd made the pod's
    netns in, its containers join it (their spec names the pod process's), and their image layers are
    mounted id-mapped, so root inside is an unprivileged host uid that still owns the image's files."""
    host_id = 600000

    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "userns", stack.log_dir, host_network=False, hostname="uns-pod",
                                        userns_host_id=host_id)
            holder = next(p for p in pod_processes() if p.name() == f"pod-{pod_id[:11]}")
            cid = await start_container(client, pod_id, pod, "main", ["sleep", "3600"])
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            script = ("cat /proc/self/uid_map /proc/self/gid_map; id -u; hostname; stat -c %u /bin/busybox; "
                      "touch /made-here && stat -c %u /made-here")
            seen = await client.exec_sync(cid, ["sh", "-c", script], timeout=20)
            assert seen.exit_code == 0, seen.stderr
            lines = seen.stdout.decode().splitlines()
            assert [line.split() for line in lines[:2]] == [["0", str(host_id), "65536"]] * 2
            assert lines[2:] == ["0", "uns-pod", "0", "0"]
            sleepers = [p for p in psutil.process_iter(["name", "uids"])
                        if p.info["name"] == "sleep" and p.info["uids"].real == host_id]
            assert len(sleepers) == 1, "the container runs as the pod's mapped root on the host"
            pod_userns = os.readlink(f"/proc/{holder.pid}/ns/user")
            assert os.readlink(f"/proc/{sleepers[0].pid}/ns/user") == pod_userns != os.readlink("/proc/self/ns/user")
            # CRI gives such a pod's volumes id mappings; containerd 2.1 then runs our v1 helper's `-info`
            # for the runtime's features and needs runc's id-mapped mounts (runc >= 1.2) before it
            # creates the task: with an older runc a clear refusal, not the helper's usage error.
            volume = stack.log_dir / "uns-volume"
            volume.mkdir()
            ids = cri.IDMapping(host_id=host_id, container_id=0, length=65536)
            config = container_config("vol", BUSYBOX, ["sleep", "3600"], log_path="vol.log")
            config.mounts.append(cri.Mount(container_path="/data", host_path=str(volume),
                                           uidMappings=[ids], gidMappings=[ids]))
            vol_cid = (await client.create_container(pod_id, config, pod)).container_id
            if runc_supports_idmap_mounts():
                await client.start_container(vol_cid)
                await wait_state(client, vol_cid, cri.CONTAINER_RUNNING)
            else:
                with pytest.raises(grpc.aio.AioRpcError, match="idmap mounts not supported: missing"):
                    await client.start_container(vol_cid)
            await remove_pod(client, pod_id)
            # Kubernetes refuses hostNetwork with hostUsers: false; a pod asking anyway gets a clear error.
            with pytest.raises(grpc.aio.AioRpcError, match="needs its own network namespace"):
                await run_pod(client, "userns-hostnet", stack.log_dir, host_network=True, userns_host_id=host_id)

    with traversable(stack.containerd.state_dir):
        stack.run(scenario())
    assert_nothing_left(stack)


def test_pod_stop_kills_containers_and_remove_leaves_nothing(stack: Stack) -> None:
    cgroup_parent = f"kuasar-it-{os.getpid()}/pod-a"

    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "teardown", stack.log_dir, cgroup_parent=cgroup_parent)
            cid = await start_container(client, pod_id, pod, "main", ["sleep", "3600"])
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            assert (hierarchy_of("memory") / cgroup_parent).is_dir()
            # In its pod's cgroup, though the parent is relative and the task server's own memory cgroup
            # need not be the root (runc puts a relative path under its own).
            assert (hierarchy_of("memory") / cgroup_parent / cid).is_dir()
            await wait_pod_process_in(pod_process_cgroup(hierarchy_of("memory") / cgroup_parent, pod_id))
            # `crictl inspectp` reads containerd's SandboxInfo JSON under "info", as its own sandboxes give it.
            info = json.loads((await client.pod_sandbox_status(pod_id, verbose=True)).info["info"])
            assert psutil.Process(info["pid"]).name() == f"pod-{pod_id[:11]}" and info["processStatus"] == "running"
            assert info["config"]["metadata"]["name"] == "teardown" and info["runtimeHandler"] == HANDLER
            await client.stop_pod_sandbox(pod_id)
            assert (await client.container_status(cid)).status.state == cri.CONTAINER_EXITED
            stopped = await client.pod_sandbox_status(pod_id, verbose=True)
            assert stopped.status.state == cri.SANDBOX_NOTREADY
            assert (json.loads(stopped.info["info"])["pid"], json.loads(stopped.info["info"])["processStatus"]) == (
                0, "stopped")
            await client.remove_pod_sandbox(pod_id)
            with pytest.raises(grpc.aio.AioRpcError):
                await client.pod_sandbox_status(pod_id)

    stack.run(scenario())
    assert cgroups_named(cgroup_parent.split("/")[0]) == [], "the parent is gone from every hierarchy"
    assert_nothing_left(stack)


def test_a_root_cgroup_parent_gives_the_pod_process_a_cgroup_of_its_own(stack: Stack) -> None:
    """kubelet without QoS cgroups gives `/`: the pod process goes to /<pod id>, as containerd's pause
    container, not into the root cgroup (it was refused at Create for a while)."""
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "rootparent", stack.log_dir, cgroup_parent="/")
            cid = await start_container(client, pod_id, pod, "main", ["sleep", "3600"])
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            await wait_pod_process_in(hierarchy_of("memory") / pod_id)
            await remove_pod(client, pod_id)
            assert cgroups_named(pod_id) == [], "the pod process's cgroup went with the pod"

    stack.run(scenario())
    assert_nothing_left(stack)


def test_a_systemd_slice_parent_is_laid_out_as_systemd_would(stack: Stack) -> None:
    """Kubelet's systemd cgroup driver names the pod's slice; containerd then writes the containers'
    cgroupsPath as `slice:cri-containerd:<id>`. Both land where systemd puts them."""
    top = f"kuasarit{os.getpid()}"
    pod_slice = hierarchy_of("memory") / f"{top}.slice" / f"{top}-poda.slice"

    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "slice", stack.log_dir, cgroup_parent=f"{top}-poda.slice")
            cid = await start_container(client, pod_id, pod, "main", ["sleep", "3600"])
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            await wait_pod_process_in(pod_process_cgroup(pod_slice, pod_id))
            scope = pod_slice / f"cri-containerd-{cid}.scope"
            assert (scope / "cgroup.procs").read_text().split(), "the container is in its scope under the slice"
            await remove_pod(client, pod_id)

    stack.run(scenario())
    assert cgroups_named(f"{top}.slice") == []
    assert_nothing_left(stack)


def pod_process_cgroup(pod_cgroup: Path, pod_id: str) -> Path:
    """Under cgroup v2 the pod process has a cgroup of its own below the pod's (as containerd's pause
    container): a cgroup holding a process cannot give its children, the containers', controllers."""
    return pod_cgroup / pod_id if cgroups.is_unified() else pod_cgroup


async def wait_pod_process_in(cgroup: Path) -> None:
    """The pod's process is moved into its cgroup after Create has answered (PodService._place)."""
    for _ in range(1000):
        members = {int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()}
        if members & {proc.pid for proc in pod_processes()}:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no pod process in {cgroup}: {members}")


def assert_nothing_left(stack: Stack) -> None:
    """Nothing this stack made outlives its pods (other stacks on the machine are not our business)."""
    server = task_server_pid(stack.sandboxer_dir)
    assert children_of(server) == []
    assert [p for p in pod_processes() if p.ppid() == server] == []
    assert list((stack.sandboxer_dir / "sandboxes").iterdir()) == []
    assert mounts_containing(str(stack.containerd.state_dir)) == []
    assert list((stack.sandboxer_dir / "console").iterdir()) == []
    assert list((stack.sandboxer_dir / "runc").glob("*")) == [] or runc_list_empty(stack)


def runc_list_empty(stack: Stack) -> bool:
    listed = subprocess.run(["runc", "--root", str(stack.sandboxer_dir / "runc"), "list", "-q"],
                            capture_output=True, text=True, check=True)
    return listed.stdout.strip() == ""


def test_terminal_exec_gets_a_pty_and_resize(stack: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "tty", stack.log_dir)
            cid = await start_container(client, pod_id, pod, "main", ["sleep", "3600"])
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            text = await terminal_exec(client, cid)
            assert "on-a-terminal=/dev/pts/" in text, text
            await signalled_terminal_exec(client, cid)
            await remove_pod(client, pod_id)

    stack.run(scenario())


def test_attach_to_a_tty_container_like_kubectl_run_it(stack: Stack) -> None:
    """`kubectl run -it`: a shell on a terminal with stdin once; attach, type, see it answer, exit it."""
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "attach", stack.log_dir)
            cid = await start_container(client, pod_id, pod, "shell", ["sh"], tty=True, stdin=True,
                                        stdin_once=True)
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            url = await client.attach(cid, tty=True, stdin=True)
            out, error = await exec_over_websocket(url, stdin=b"echo attached-$((40+2)) $(stty size)\nexit 3\n",
                                                   resize=(100, 30))
            assert b"attached-42 30 100" in out, (out, error)
            assert (await wait_state(client, cid, cri.CONTAINER_EXITED)).exit_code == 3
            await remove_pod(client, pod_id)

    stack.run(scenario())


def test_container_stats_and_update_resources(stack: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            # Absolute, as kubelet's cgroupfs driver gives it: containerd reads PodSandboxStats from the
            # pod's cgroup parent, and on cgroup v2 it refuses a relative one ("invalid group path").
            pod_id, pod = await run_pod(client, "stats", stack.log_dir,
                                        cgroup_parent=f"/kuasar-stats-{os.getpid()}/pod-s")
            cid = await start_container(client, pod_id, pod, "main", ["sleep", "3600"])
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            stats = (await client.container_stats(cid)).stats
            assert stats.memory.working_set_bytes.value > 0 or stats.memory.usage_bytes.value > 0
            # The pod's own (CRI reads the pod's cgroup parent, where our pod process and containers are).
            pod_stats = (await client.pod_sandbox_stats(pod_id)).stats
            assert pod_stats.attributes.id == pod_id
            assert pod_stats.linux.memory.working_set_bytes.value > 0
            assert [c.attributes.id for c in pod_stats.linux.containers] == [cid]
            resources = cri.LinuxContainerResources(memory_limit_in_bytes=64 << 20, cpu_shares=512)
            await client.update_container_resources(cid, resources)
            limit = await client.exec_sync(cid, ["cat", memory_limit_file_in_container()],
                                           timeout=20)
            assert limit.stdout.strip() == str(64 << 20).encode(), limit
            # Updates at once: each is applied whole (the task server writes one resources file at a time).
            limits = [48 << 20, 56 << 20, 72 << 20, 80 << 20]
            await asyncio.gather(*(client.update_container_resources(
                cid, cri.LinuxContainerResources(memory_limit_in_bytes=m)) for m in limits))
            limit = await client.exec_sync(cid, ["cat", memory_limit_file_in_container()],
                                           timeout=20)
            assert int(limit.stdout) in limits, limit
            await remove_pod(client, pod_id)

    stack.run(scenario())


def test_oom_kill_is_reported_as_oomkilled(stack: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "oom", stack.log_dir)
            # The shell doubles a string until the 24 MiB cgroup limit makes the kernel kill it.
            cid = await start_container(client, pod_id, pod, "hog",
                                        ["sh", "-c", "sleep 0.3; x=aaaaaaaa; while true; do x=$x$x; done"],
                                        memory_limit=24 << 20)
            status = await wait_state(client, cid, cri.CONTAINER_EXITED, timeout=60)
            assert status.exit_code == 137
            # containerd only says OOMKilled if it received our /tasks/oom event for the container.
            assert status.reason == "OOMKilled", status
            await remove_pod(client, pod_id)

    stack.run(scenario())


def test_remove_pod_during_exec_is_consistent(stack: Stack) -> None:
    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            pod_id, pod = await run_pod(client, "busy", stack.log_dir)
            cid = await start_container(client, pod_id, pod, "main", ["sleep", "3600"])
            await wait_state(client, cid, cri.CONTAINER_RUNNING)
            exec_call = asyncio.ensure_future(client.exec_sync(cid, ["sleep", "30"], timeout=60))
            await asyncio.sleep(0.5)
            async with asyncio.timeout(30):  # no deadlock: the removal finishes promptly
                await client.stop_pod_sandbox(pod_id)
                await client.remove_pod_sandbox(pod_id)
                result = await asyncio.gather(exec_call, return_exceptions=True)
            # The exec ends with the pod: either killed (137) or failed because its container went away.
            assert isinstance(result[0], grpc.aio.AioRpcError) or result[0].exit_code != 0
            assert pod_id not in [p.id for p in (await client.list_pod_sandbox()).items]

    stack.run(scenario())
    assert_nothing_left(stack)


def test_a_pod_whose_start_fails_leaves_nothing(stack: Stack) -> None:
    """containerd forgets a sandbox whose Start failed and never calls Shutdown for it: what Create and
    Start made (the record, the pod's files, its cgroup) is ours to remove, there and then."""
    cgroup_parent = f"kuasar-it-{os.getpid()}/failed"

    async def scenario() -> None:
        async with CriClient(stack.address) as client:
            # Valid as a name and scoped by the pod's IPC namespace, so only the write in it fails.
            with pytest.raises(grpc.aio.AioRpcError, match="shm_rmid_forced"):
                await run_pod(client, "failing", stack.log_dir, cgroup_parent=cgroup_parent,
                              sysctls={"kernel.shm_rmid_forced": "not-a-number"})
            assert all(p.metadata.name != "failing" for p in (await client.list_pod_sandbox()).items)

    stack.run(scenario())
    assert cgroups_named(cgroup_parent.split("/")[0]) == [], "the parent is gone from every hierarchy"
    assert not (stack.sandboxer_dir / "pods").exists() or list((stack.sandboxer_dir / "pods").iterdir()) == []
    assert_nothing_left(stack)
