"""wasm-sandboxer, the gVisor and Quark backends and the shared IO on their failure paths: a stream
preempted mid-send, a module cache write that fails or a temp file renamed during a prune, CloseIO of a
terminal without stdout, an image symlink under a bind mount, a `runsc exec` that never starts, and a
launch given up before its report was read."""

from __future__ import annotations

import asyncio
import builtins
import errno
import os
import subprocess

import pytest
from google.protobuf import any_pb2

from kuasar.common import streaming_io as sio
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.api.containerd.types.transfer import streaming_pb2 as transfer
from kuasar.common.errors import InvalidArgument, KuasarError
from kuasar.common.fifo_stdio import ProcessIO
from kuasar.common.reaper import Exit
from kuasar.quark import gvisor_tasks as gt
from kuasar.quark import quark_containers
from kuasar.wasm import cache as cache_mod
from kuasar.wasm import tasks as wasm_tasks
from kuasar.wasm.cache import ModuleCache
from kuasar.wasm.launch import Launch, LaunchPlan
from kuasar.wasm.runner import RunSpec


class FakeStream:
    def __init__(self, gate=None):
        self.sent, self.gate = [], gate
        self._never = asyncio.Event()

    async def send(self, payload):
        if self.gate is not None:
            await self.gate.wait()  # e.g. writer.drain() of a paused transport
        a = any_pb2.Any.FromString(payload)
        self.sent.append(transfer.Data.FromString(a.value).data)

    async def recv(self):
        await self._never.wait()


async def preempted_mid_send(name: str):
    """A channel with "A" queued, its first stream blocked sending it when a second one takes over
    (containerd re-attaching); returns the channel, both streams and their tasks, and the gate that lets
    the first one's send return (as drain() does once the connection is lost)."""
    channel = sio.StreamHub().output(name)
    await channel.write(b"A")
    gate = asyncio.Event()
    old, new = FakeStream(gate), FakeStream()
    old_attachment = channel.attachment = sio._Attachment()
    old_task = asyncio.create_task(channel.serve(old, old_attachment))
    await asyncio.sleep(0.01)  # the old stream is blocked sending "A"
    old_attachment.preempted.set()
    new_attachment = channel.attachment = sio._Attachment()
    new_task = asyncio.create_task(channel.serve(new, new_attachment))
    await asyncio.sleep(0.01)  # the new one sends "A"
    return channel, old_task, new, new_task, gate


def test_a_stream_preempted_mid_send_loses_no_chunk():
    async def main():
        channel, old_task, new, new_task, gate = await preempted_mid_send("x-stdout")
        await channel.write(b"B")
        await channel.write(b"C")
        gate.set()  # in the same loop step as more output arrives, before the new stream sent it
        await asyncio.sleep(0.05)
        channel.close()
        await asyncio.sleep(0.05)
        assert b"".join(new.sent) == b"ABC"
        new_task.cancel()
    asyncio.run(main())


def test_a_stream_preempted_mid_send_leaves_the_queue_to_its_successor():
    async def main():
        channel, old_task, new, new_task, gate = await preempted_mid_send("y-stdout")
        gate.set()
        await asyncio.sleep(0.01)
        assert old_task.exception() is None and channel.buffered == 0
        new_task.cancel()
    asyncio.run(main())


def test_a_cache_write_that_fails_leaves_no_temp_file(tmp_path, monkeypatch):
    """ENOSPC half way through writing the artifact: load_module swallows the OSError, but the partial
    .tmp stays (and prune() only removes it an hour later, never counting it against max_bytes)."""
    c = ModuleCache(tmp_path / "cache")
    real_open = builtins.open

    class Short:
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *a): self.f.close()
        def write(self, data):
            self.f.write(data[:100])
            raise OSError(errno.ENOSPC, "No space left on device")

    def short_writes(p, m="r", *a, **k):
        return Short(real_open(p, m, *a, **k)) if str(p).endswith(".tmp") else real_open(p, m, *a, **k)

    monkeypatch.setattr(builtins, "open", short_writes)
    target = c.path("d" * 64, "fp")
    with pytest.raises(OSError):
        c.store(target, b"x" * 1000)
    left = [p.name for p in (tmp_path / "cache").iterdir()]
    print("left in the cache dir after a failed store:", left)
    assert left == []


def test_prune_goes_on_past_a_temp_file_renamed_meanwhile(tmp_path, monkeypatch):
    """A container process renames its .tmp (store()) between prune()'s scandir and entry.stat():
    FileNotFoundError from that one entry aborts the whole prune (returns 0, nothing pruned)."""
    c = ModuleCache(tmp_path, max_bytes=10)
    for i in range(3):
        (tmp_path / f"{i}{cache_mod.SUFFIX}").write_bytes(b"x" * 100)
    tmp = tmp_path / f".a{cache_mod.SUFFIX}.123.tmp"
    tmp.write_bytes(b"partial")
    real_scandir = os.scandir

    class Scan:
        def __init__(self, d): self.it = real_scandir(d)
        def __enter__(self): return self
        def __exit__(self, *a): self.it.close()
        def __iter__(self):
            for e in self.it:
                if e.name.endswith(".tmp") and tmp.exists():
                    os.replace(tmp, tmp_path / f"a{cache_mod.SUFFIX}")  # the child's os.replace
                yield e
    monkeypatch.setattr(cache_mod.os, "scandir", Scan)
    removed = c.prune()
    size = sum(p.stat().st_size for p in tmp_path.iterdir())
    print("prune removed", removed, "files, cache now", size, "bytes, max", c.max_bytes)
    assert removed > 0


def test_close_io_ends_the_stdin_copy_of_a_terminal_without_stdout(tmp_path):
    async def main():
        fifo = tmp_path / "stdin"
        os.mkfifo(fifo)
        w = os.open(fifo, os.O_RDWR)  # containerd's writer end
        master, slave = os.openpty()
        io = ProcessIO(stdin=str(fifo), terminal=True)
        io.attach_master(master)
        io.close_stdin()
        await asyncio.sleep(0.05 + 0.2)  # what was there is copied first (iopump.FINISH_LULL)
        running = [not p._task.done() for p in io.pumps]
        print("pumps after close_stdin:", len(io.pumps), "still running:", running)
        io.close()
        os.close(slave)
        os.close(w)
        assert not any(running)
    asyncio.run(main())


def test_a_bind_mount_follows_the_images_symlinks_inside_the_rootfs_only(tmp_path, monkeypatch):
    image = tmp_path / "image"
    image.mkdir()
    host_dir = tmp_path / "HOST-etc"            # stands for the host's /etc
    host_dir.mkdir()
    os.symlink(str(host_dir), image / "data")  # image: /data -> /etc  (absolute link)
    (image / "etc").mkdir()
    os.symlink(str(host_dir / "new.conf"), image / "etc" / "x")  # dangling link for a file bind
    vol = tmp_path / "vol"
    vol.mkdir()
    volfile = tmp_path / "volfile"
    volfile.write_text("v")
    calls = []

    def fake_mount(source, target, fstype, flags, data=None):
        if flags & quark_containers.linux.MS_BIND:  # not a propagation change of a mount made already
            # (a bind goes onto an opened place, /proc/self/fd/<n>: where it leads, now)
            calls.append((source, os.path.realpath(target)))
    monkeypatch.setattr(quark_containers.linux, "mount", fake_mount)
    # Nothing is mounted here, so the check that the bind is in place would fail: not this test's subject.
    monkeypatch.setattr(quark_containers.beneath, "_change_the_bind", lambda *args: None)
    # rootfs "mount" = copy of the image (symlinks kept), as mount_rootfs would expose it
    def fake_mount_rootfs(ms, rootfs):
        import shutil
        shutil.copytree(image, rootfs, symlinks=True)
    monkeypatch.setattr(quark_containers.mounts, "mount_rootfs", fake_mount_rootfs)
    layout = quark_containers.QuarkContainers(tmp_path / "sandbox", {})
    layout.append("c1", {"rootfs": [{"type": "bind", "source": str(image)}],
                         "spec": {"mounts": [
                             {"destination": "/data", "type": "bind", "source": str(vol)},
                             {"destination": "/etc/x", "type": "bind", "source": str(volfile)}]}})
    rootfs = os.path.realpath(tmp_path / "sandbox" / "c1" / "rootfs")
    escaped = [t for _, t in calls if not os.path.realpath(t).startswith(rootfs + "/")]
    print("mount targets:", [(t, os.path.realpath(t)) for _, t in calls])
    print("host file created through the image's symlink:", (host_dir / "new.conf").exists())
    assert not escaped, f"bind targets resolve outside the rootfs: {[os.path.realpath(t) for t in escaped]}"


def test_a_runsc_exec_that_never_starts_is_killed_and_can_be_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(gt, "EXEC_START_TIMEOUT", 0.3)
    monkeypatch.setattr(gt, "EXEC_KILL_WAIT", 0.5)
    spawned = []

    class FakeRunsc:
        def spawn_exec(self, cid, network, process_json, pid_file, log_path, stdio, terminal=False):
            p = subprocess.Popen(["bash", "-c", "exec -a rv5-runsc-exec sleep 30"])
            spawned.append(p)
            return p.pid, asyncio.get_running_loop().create_future()  # never exits by itself

    async def main():
        t = gt.GvisorTasks.__new__(gt.GvisorTasks)
        t.runsc = FakeRunsc()
        pod = gt.GvisorPod("pod", tmp_path, "none")
        proc = gt.Process("e1", ProcessIO(), spec=b"{}")
        container = gt.Container("c1", tmp_path, pod=pod, namespace="k8s.io", init=gt.Process("", ProcessIO()))
        for attempt in range(2):
            try:
                await t._run_exec(container, proc)
            except KuasarError as exc:
                print(f"start {attempt}: {exc.message}, status {types.Status.Name(proc.status)} pid {proc.pid}")
            assert proc.pid == 0 and proc.status == types.CREATED  # Start may be tried again
        alive = [p.pid for p in spawned if p.poll() is None]
        print("runsc exec runners still alive after failed Starts:", alive)
        for p in spawned:
            p.kill()
            p.wait()
        assert not alive
    asyncio.run(main())


class FakeEvents:
    def publish(self, *args: object, **kwargs: object) -> None:
        pass


def test_a_launch_given_up_before_its_report_closes_the_report_pipe(tmp_path, monkeypatch):
    async def main():
        tasks = wasm_tasks.WasmTasks(reaper=None, events=FakeEvents(), directory=tmp_path,
                                     settings=wasm_tasks.WasmSettings(cache=False))
        child = subprocess.Popen(["sleep", "30"])
        report_r, report_w = os.pipe()
        launched = {}

        def fake_launch(plan, stdio, reaper, wait_for_go):
            exited = asyncio.get_running_loop().create_future()

            def reap():
                child.kill()
                child.wait()
                exited.set_result(Exit(child.pid, 137, 0))
            asyncio.get_running_loop().call_later(0.1, reap)
            launched["launch"] = Launch(child.pid, exited, report_r, -1)
            return launched["launch"]

        monkeypatch.setattr(wasm_tasks, "launch", fake_launch)
        monkeypatch.setattr(tasks, "plan", lambda c, p, n, *_: LaunchPlan(n, "wasmtime", RunSpec("m", ["m"], []),
                                                                          terminal=True))
        # A terminal process whose stdout FIFO is not there: attaching the pty master fails.
        proc = wasm_tasks.Process("e1", io=ProcessIO("", str(tmp_path / "no-such-fifo"), "", True), spec={})
        container = wasm_tasks.Container("c1", tmp_path, "pod", "k8s.io", {}, tmp_path, "wasmtime", "", proc)
        with pytest.raises(OSError):
            await tasks._launch(container, proc, wait_for_go=False)
        assert launched["launch"].report_fd == -1
        with pytest.raises(BrokenPipeError):  # nobody holds the read end any more
            os.write(report_w, b"x")
        os.close(report_w)
    asyncio.run(main())


@pytest.mark.parametrize("process", [
    {"user": {"uid": "root"}},
    {"user": {"additionalGids": ["wheel"]}},
    {"rlimits": [{"type": "RLIMIT_NOFILE", "soft": "many", "hard": 1}]},
])
def test_a_wasm_process_with_numbers_that_are_not_numbers_is_invalid_argument(tmp_path, process):
    (tmp_path / "m.wasm").write_bytes(b"\0asm\x01\0\0\0")
    tasks = wasm_tasks.WasmTasks(reaper=None, events=FakeEvents(), directory=tmp_path / "dir",
                                 settings=wasm_tasks.WasmSettings(cache=False))
    init = wasm_tasks.Process("", io=ProcessIO(), spec={})
    container = wasm_tasks.Container("c1", tmp_path, "pod", "k8s.io", {}, tmp_path, "wasmtime", "", init)
    with pytest.raises(InvalidArgument):
        tasks.plan(container, {"args": ["/m.wasm"], **process}, "c1")


def test_close_io_of_a_wasm_terminal_process_ends_its_stdin_copy(tmp_path):
    """A terminal process reads a pty whose input the task server copies from containerd's stdin FIFO:
    CloseIO must stop that copy (without a terminal the process holds the FIFO itself)."""
    async def main():
        fifo = tmp_path / "stdin"
        os.mkfifo(fifo)
        writer = os.open(fifo, os.O_RDWR)  # containerd's end
        master, replica = os.openpty()
        io = ProcessIO(stdin=str(fifo), terminal=True)
        io.attach_master(master)
        tasks = wasm_tasks.WasmTasks(reaper=None, events=FakeEvents(), directory=tmp_path / "dir",
                                     settings=wasm_tasks.WasmSettings(cache=False))
        init = wasm_tasks.Process("", io=io, spec={})
        tasks.containers["c1"] = wasm_tasks.Container("c1", tmp_path, "pod", "k8s.io", {}, tmp_path, "wasmtime",
                                                      "", init)
        await tasks.close_io(task.CloseIORequest(id="c1", stdin=True), None)
        await asyncio.sleep(0.05 + 0.2)  # what was there is copied first (iopump.FINISH_LULL)
        try:
            assert io.stdin_pump is not None and io.stdin_pump._task.done()
        finally:
            io.close()
            os.close(replica)
            os.close(writer)
    asyncio.run(main())
