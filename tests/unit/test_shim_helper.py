"""`containerd-shim-kuasar-<type>-v1 ... delete` against a real ttrpc task server in this process.

containerd runs the helper as a separate program and reads a DeleteResponse from its stdout; here
`main()` runs in the test thread (it calls asyncio.run itself) and the task server in a background loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from kuasar.common import linux, mounts, shim_helper
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task
from kuasar.common.api.containerd.types.task import task_pb2 as types
from kuasar.common.errors import FailedPrecondition, NotFound
from kuasar.common.task_api import TaskBackend, register_task_service
from kuasar.common.ttrpc import Context, TtrpcServer
from tests.support.ttrpc_thread import ThreadedTtrpcServer

REPO = Path(__file__).resolve().parents[2]
CID = "c" * 64
NS = "k8s.io"


class FakeTasks(TaskBackend):
    """Containers as the task server sees them; every call is recorded with its namespace."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        self.exit_status: dict[str, int] = {}
        self.exited: dict[str, asyncio.Event] = {}
        self.calls: list[tuple[str, str, str | None]] = []
        self.kills: list[tuple[int, bool]] = []
        self.hang = False

    def add(self, cid: str, status: int, exit_status: int = 0) -> None:
        self.status[cid], self.exit_status[cid] = status, exit_status
        self.exited[cid] = asyncio.Event()
        if status == types.STOPPED:
            self.exited[cid].set()

    def _seen(self, method: str, cid: str, ctx: Context) -> None:
        self.calls.append((method, cid, ctx.namespace))
        if cid not in self.status:
            raise NotFound(f"container {cid} not found")

    async def state(self, req: task.StateRequest, ctx: Context) -> task.StateResponse:
        if self.hang:
            await asyncio.Event().wait()
        self._seen("State", req.id, ctx)
        return task.StateResponse(id=req.id, pid=4242, status=self.status[req.id],
                                  exit_status=self.exit_status[req.id])

    async def resume(self, req: task.ResumeRequest, ctx: Context) -> empty_pb2.Empty:
        self._seen("Resume", req.id, ctx)
        self.status[req.id] = types.RUNNING
        return empty_pb2.Empty()

    async def kill(self, req: task.KillRequest, ctx: Context) -> empty_pb2.Empty:
        self._seen("Kill", req.id, ctx)
        self.kills.append((req.signal, req.all))
        self.status[req.id], self.exit_status[req.id] = types.STOPPED, 128 + req.signal
        self.exited[req.id].set()
        return empty_pb2.Empty()

    async def wait(self, req: task.WaitRequest, ctx: Context) -> task.WaitResponse:
        self._seen("Wait", req.id, ctx)
        await self.exited[req.id].wait()
        return task.WaitResponse(exit_status=self.exit_status[req.id])

    async def delete(self, req: task.DeleteRequest, ctx: Context) -> task.DeleteResponse:
        self._seen("Delete", req.id, ctx)
        if self.status[req.id] != types.STOPPED:
            raise FailedPrecondition(f"container {req.id} is still running")
        response = task.DeleteResponse(pid=4242, exit_status=self.exit_status.pop(req.id))
        response.exited_at.FromSeconds(1_700_000_000)
        del self.status[req.id]
        return response


@pytest.fixture
def server() -> Iterator[tuple[ThreadedTtrpcServer, FakeTasks]]:
    backend = FakeTasks()

    def setup(server: TtrpcServer) -> None:
        register_task_service(server, backend)

    with ThreadedTtrpcServer(setup) as threaded:
        yield threaded, backend
        assert threaded.loop_errors == []


def make_bundle(root: Path, address: str, cid: str = CID) -> Path:
    bundle = root / NS / cid
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "bootstrap.json").write_text(json.dumps({"version": 3, "protocol": "ttrpc", "address": address}))
    return bundle


def run_delete(capsysbinary: pytest.CaptureFixture[bytes], bundle: Path, cid: str = CID,
               *extra: str) -> tuple[int, task.DeleteResponse, str]:
    """Run the helper as containerd does (its flags, cwd = the bundle) and decode what it printed."""
    argv = ["-namespace", NS, "-address", "/run/containerd/containerd.sock", "-publish-binary",
            "/usr/bin/containerd", "-id", cid, "-bundle", str(bundle), *extra, "delete"]
    cwd = os.getcwd()
    os.chdir(bundle if bundle.is_dir() else "/")
    try:
        code = shim_helper.main(argv)
    finally:
        os.chdir(cwd)
    out, err = capsysbinary.readouterr()
    return code, task.DeleteResponse.FromString(out), err.decode()


def test_delete_kills_a_running_container_then_prints_the_task_servers_answer(
        server, tmp_path: Path, capsysbinary) -> None:
    threaded, backend = server
    threaded.run(_call(backend.add, CID, types.RUNNING))  # asyncio.Events belong to the server's loop
    bundle = make_bundle(tmp_path, f"unix://{threaded.path}")
    code, response, _ = run_delete(capsysbinary, bundle)
    assert code == 0
    assert (response.pid, response.exit_status, response.exited_at.seconds) == (4242, 137, 1_700_000_000)
    assert [c[0] for c in backend.calls] == ["State", "Kill", "Wait", "Delete"]
    assert all(c[1] == CID and c[2] == NS for c in backend.calls)
    assert backend.kills == [(9, True)]
    assert CID not in backend.status


def test_delete_of_a_stopped_container_keeps_its_exit_status(server, tmp_path: Path, capsysbinary) -> None:
    threaded, backend = server
    threaded.run(_call(backend.add, CID, types.STOPPED, 3))
    bundle = make_bundle(tmp_path, f"unix://{threaded.path}")
    code, response, _ = run_delete(capsysbinary, bundle, CID, "-debug")
    assert code == 0 and response.exit_status == 3
    assert [c[0] for c in backend.calls] == ["State", "Delete"]


def test_delete_resumes_a_paused_container_before_killing_it(server, tmp_path: Path, capsysbinary) -> None:
    threaded, backend = server
    threaded.run(_call(backend.add, CID, types.PAUSED))
    code, response, _ = run_delete(capsysbinary, make_bundle(tmp_path, f"unix://{threaded.path}"))
    assert code == 0 and response.exit_status == 137
    assert [c[0] for c in backend.calls] == ["State", "Resume", "Kill", "Wait", "Delete"]


def test_container_the_task_server_forgot_is_reported_lost_after_a_delete(
        server, tmp_path: Path, capsysbinary) -> None:
    # The Delete (answered NOT_FOUND) is what a VM's task proxy or Quark's relay waits for to take the
    # container's host side down: without it, a Create cut off by containerd's restart left it mounted.
    threaded, backend = server
    before = time.time()
    code, response, _ = run_delete(capsysbinary, make_bundle(tmp_path, f"unix://{threaded.path}"))
    assert code == 0
    assert response.exit_status == 255 and response.pid == 0
    assert before - 1 <= response.exited_at.seconds <= time.time() + 1
    assert [c[0] for c in backend.calls] == ["State", "Delete"]


def test_hung_task_server_costs_a_bounded_wait_then_local_cleanup(server, tmp_path: Path, capsysbinary,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    threaded, backend = server
    backend.hang = True
    start = time.monotonic()
    code, response, _ = run_delete(capsysbinary, make_bundle(tmp_path, f"unix://{threaded.path}"))
    elapsed = time.monotonic() - start
    assert code == 0 and response.exit_status == 255
    assert elapsed < shim_helper.CONNECT_TIMEOUT + shim_helper.CALL_TIMEOUT + 2, elapsed
    assert "deadline exceeded" in caplog.text and "cleaning up locally" in caplog.text


def test_the_whole_conversation_with_a_slow_task_server_fits_containerds_cleanup_budget(
        server, tmp_path: Path, capsysbinary, caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    # Each call had its own bound and they could add up to 7 s, past the 5 s containerd gives `delete`
    # before it kills it and reads no answer at all.
    monkeypatch.setattr(shim_helper, "TASK_SERVER_BUDGET", 0.3)
    threaded, backend = server
    backend.hang = True
    start = time.monotonic()
    code, response, _ = run_delete(capsysbinary, make_bundle(tmp_path, f"unix://{threaded.path}"))
    assert code == 0 and response.exit_status == 255
    assert time.monotonic() - start < shim_helper.CALL_TIMEOUT
    assert "did not delete" in caplog.text and "within" in caplog.text


def test_task_server_behind_hybrid_vsock_is_reached_too(server, tmp_path: Path, capsysbinary) -> None:
    """The VM sandboxer's task server is a guest agent: `hvsock://<vmm socket>:<port>` in bootstrap.json."""
    pytest.importorskip("kuasar.common.hvsock")
    threaded, backend = server
    threaded.run(_call(backend.add, CID, types.STOPPED, 9))
    vmm_socket = os.path.join(threaded.directory, "vmm.sock")

    async def vmm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        if line != b"CONNECT 1024\n":
            writer.close()
            return
        writer.write(b"OK 1024\n")
        await threaded.server.serve_connection(reader, writer)

    async def listen() -> asyncio.Server:
        return await asyncio.start_unix_server(vmm, path=vmm_socket)

    listener = threaded.run(listen())
    try:
        code, response, _ = run_delete(capsysbinary, make_bundle(tmp_path, f"hvsock://{vmm_socket}:1024"))
    finally:
        threaded.loop.call_soon_threadsafe(listener.close)
    assert code == 0 and response.exit_status == 9
    assert [c[0] for c in backend.calls] == ["State", "Delete"]


@pytest.mark.parametrize("bootstrap", [
    None,  # containerd died before writing it
    "{not json",
    json.dumps({"version": 3, "protocol": "grpc", "address": "unix:///x.sock"}),
    json.dumps({"version": 3, "protocol": "ttrpc", "address": "vsock://3:1024"}),
    json.dumps({"version": 3, "protocol": "ttrpc", "address": "hvsock:///nowhere/vmm.sock:1024"}),
    json.dumps({"version": 3, "protocol": "ttrpc", "address": "unix://"}),
    json.dumps(["unix:///x.sock"]),
    "missing-socket",
])
def test_unreachable_task_server_means_local_cleanup_and_exit_255(
        tmp_path: Path, capsysbinary, bootstrap: str | None) -> None:
    bundle = make_bundle(tmp_path, f"unix://{tmp_path}/gone.sock")
    if bootstrap is None:
        (bundle / "bootstrap.json").unlink()
    elif bootstrap != "missing-socket":
        (bundle / "bootstrap.json").write_text(bootstrap)
    code, response, _ = run_delete(capsysbinary, bundle)
    assert code == 0
    assert response.exit_status == 255 and response.exited_at.seconds > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_unreachable_task_server_leaves_no_rootfs_mount(tmp_path: Path, capsysbinary) -> None:
    bundle = make_bundle(tmp_path, f"unix://{tmp_path}/gone.sock")
    linux.mount("tmpfs", str(bundle / "rootfs"), "tmpfs", 0, "size=1m")
    try:
        assert mounts.is_mountpoint(bundle / "rootfs")
        code, response, _ = run_delete(capsysbinary, bundle)
        assert code == 0 and response.exit_status == 255
        assert not mounts.is_mountpoint(bundle / "rootfs")
    finally:
        mounts.unmount_all(bundle / "rootfs")


@pytest.mark.parametrize("bad_id", ["", "../../etc", "a/b", ".", "..", "x" * 77, "-rf"])
def test_invalid_id_is_refused_and_nothing_is_printed(tmp_path: Path, capsysbinary, bad_id: str) -> None:
    code = shim_helper.main(["-id", bad_id, "-bundle", str(tmp_path), "delete"])
    out, err = capsysbinary.readouterr()
    assert code != 0 and out == b""
    assert b"-id" in err or b"usage" in err


def test_bundle_of_another_container_is_refused(tmp_path: Path, capsysbinary) -> None:
    bundle = make_bundle(tmp_path, "unix:///nowhere.sock", cid="other")
    code = shim_helper.main(["-id", CID, "-bundle", str(bundle), "delete"])
    out, err = capsysbinary.readouterr()
    assert code == 1 and out == b"" and b"is not the bundle of container" in err


def test_bundle_defaults_to_the_working_directory_and_go_style_flags_parse(
        tmp_path: Path, capsysbinary) -> None:
    bundle = make_bundle(tmp_path, f"unix://{tmp_path}/gone.sock")
    cwd = os.getcwd()
    os.chdir(bundle)
    try:
        code = shim_helper.main([f"-id={CID}", "--namespace", NS, "-debug", "delete"])
    finally:
        os.chdir(cwd)
    out, _ = capsysbinary.readouterr()
    assert code == 0 and task.DeleteResponse.FromString(out).exit_status == 255


def test_start_is_refused_with_a_clear_message(capsysbinary) -> None:
    code = shim_helper.main(["-namespace", NS, "-address", "/x.sock", "-publish-binary", "/c", "-id", CID,
                             "start"])
    out, err = capsysbinary.readouterr()
    assert code == 1 and out == b""
    assert b"never starts them through a shim" in err


def test_console_scripts_for_every_sandbox_type_point_at_the_helper() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for kind in ("runc", "wasm", "vmm", "quark"):
        assert scripts[f"containerd-shim-kuasar-{kind}-v1"] == "kuasar.common.shim_helper:main"


async def _call(fn, *args) -> None:
    fn(*args)


def test_a_shim_programs_type_comes_from_its_name_and_version() -> None:
    assert shim_helper.program_type("containerd-shim-kuasar-gvisor-v1", "v1") == "gvisor"
    assert shim_helper.program_type("containerd-shim-kuasar-wasm-v2", "v2") == "wasm"
    # Neither shim takes the other's name for its own, nor containerd's runc shim for ours.
    assert shim_helper.program_type("containerd-shim-kuasar-runc-v2", "v1") is None
    assert shim_helper.program_type("containerd-shim-kuasar-runc-v1", "v2") is None
    assert shim_helper.program_type("containerd-shim-runc-v2", "v2") is None
