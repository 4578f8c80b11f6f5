"""kuasar-ctl without containerd: configs from files and flags, CRI log parsing, tables, progress, the
sandboxer state listing, and the command line's offline paths (errors before any RPC)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient
from kuasar.ctl import cli, configs, logs, output, progress, sandboxers
from kuasar.ctl.cli import main


# -- configs -------------------------------------------------------------------------------------------------
def test_pod_config_from_flags_gets_kubelets_defaults() -> None:
    config = configs.pod_config(name="web")
    assert config.metadata.name == "web" and config.metadata.namespace == "default"
    assert len(config.metadata.uid) == 32
    assert config.log_directory == f"/var/log/pods/default_web_{config.metadata.uid}"
    ns = config.linux.security_context.namespace_options
    assert (ns.network, ns.pid) == (cri.NODE, cri.CONTAINER)
    assert config.hostname == ""  # host network: the node's hostname shows through

    pod_net = configs.pod_config(name="db", namespace="prod", uid="u1", host_network=False, share_pid=True,
                                 labels={"a": "b"}, cgroup_parent="/kubepods")
    ns = pod_net.linux.security_context.namespace_options
    assert (ns.network, ns.pid) == (cri.POD, cri.POD)
    assert pod_net.hostname == "db" and pod_net.labels["a"] == "b" and pod_net.linux.cgroup_parent == "/kubepods"
    assert pod_net.log_directory == "/var/log/pods/prod_db_u1"


def test_pod_config_file_crictl_style_and_flag_overrides(tmp_path: Path) -> None:
    path = tmp_path / "pod.json"
    path.write_text(json.dumps({
        "metadata": {"name": "nginx-sandbox", "namespace": "default", "attempt": 1, "uid": "hdishd83djaidwnduwk28bcsb"},
        "logDirectory": "/tmp", "hostname": "nginx",
        "linux": {"security_context": {"namespace_options": {"network": 0}}},
        "unknown_field": 1,
    }))
    config = configs.pod_config(str(path))
    assert config.metadata.attempt == 1 and config.log_directory == "/tmp" and config.hostname == "nginx"
    assert config.linux.security_context.namespace_options.network == cri.POD  # the file says POD
    override = configs.pod_config(str(path), name="other", log_directory="/var/tmp/x")
    assert override.metadata.name == "other" and override.log_directory == "/var/tmp/x"


@pytest.mark.parametrize(("text", "message"), [
    ("{nope", "is not JSON"), ('{"metadata": 5}', "PodSandboxConfig"),
    (b"\xff\xfe{}", "is not UTF-8"), ("[" * 100_000, "nested too deeply"),  # tracebacks before
    ('"metadata"', "a JSON object is needed, not a str"), ("[1]", "not a list"),  # ignored, or an odd message
])
def test_bad_pod_files(tmp_path: Path, text: str | bytes, message: str) -> None:
    path = tmp_path / "pod.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(configs.ConfigError, match=message):
        configs.pod_config(str(path))
    with pytest.raises(configs.ConfigError, match="No such file"):
        configs.pod_config(str(tmp_path / "missing.json"))
    with pytest.raises(configs.ConfigError, match="needs a name"):
        configs.pod_config()


def test_container_config(tmp_path: Path) -> None:
    pod = configs.pod_config(name="p", share_pid=True)
    config = configs.container_config(image="localhost/library/busybox:1.36", command=["sh", "-c", "true"],
                                      env={"A": "1"}, tty=True, pod=pod)
    assert config.metadata.name == "busybox" and list(config.command) == ["sh", "-c", "true"]
    assert config.log_path == "busybox/0.log" and config.tty
    assert [(e.key, e.value) for e in config.envs] == [("A", "1")]
    assert config.linux.security_context.namespace_options.pid == cri.POD  # copied from the pod

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"metadata": {"name": "c"}, "image": {"image": "busybox"},
                                "command": ["top"], "args": ["-b"], "log_path": "c.log"}))
    from_file = configs.container_config(str(path))
    assert (list(from_file.command), list(from_file.args), from_file.log_path) == (["top"], ["-b"], "c.log")
    replaced = configs.container_config(str(path), command=["echo", "hi"])
    assert (list(replaced.command), list(replaced.args)) == (["echo", "hi"], [])
    with pytest.raises(configs.ConfigError, match="needs an image"):
        configs.container_config(name="x")


def test_parse_pairs() -> None:
    assert configs.parse_pairs(["a=b", "c=d=e", "e="], "--label") == {"a": "b", "c": "d=e", "e": ""}
    with pytest.raises(configs.ConfigError, match="KEY=VALUE"):
        configs.parse_pairs(["novalue"], "--label")


def test_pod_config_back_from_status() -> None:
    status = cri.PodSandboxStatusResponse()
    assert configs.pod_config_from_status(status) is None
    original = configs.pod_config(name="web", uid="u", log_directory="/logs/web")
    # containerd's podsandbox info: Go's encoding/json of the CRI config (snake_case, enums as numbers).
    status.info["info"] = json.dumps({"config": {"metadata": {"name": "web", "uid": "u", "namespace": "default"},
                                                 "log_directory": "/logs/web",
                                                 "linux": {"security_context": {"namespace_options": {"network": 2}}}}})
    back = configs.pod_config_from_status(status)
    assert back is not None and back.log_directory == original.log_directory
    assert back.linux.security_context.namespace_options.network == cri.NODE

    pod_status = cri.PodSandboxStatus(metadata=cri.PodSandboxMetadata(name="n", namespace="ns", uid="u2"),
                                      labels={"l": "v"})
    pod_status.linux.namespaces.options.network = cri.NODE
    rebuilt = configs.pod_config_from_pod_status(pod_status)
    assert rebuilt.log_directory == "/var/log/pods/ns_n_u2" and rebuilt.labels["l"] == "v"
    assert rebuilt.linux.security_context.namespace_options.network == cri.NODE


def test_remembered_pod_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(configs.STATE_ENV, str(tmp_path / "state"))
    config = configs.pod_config(name="kept", log_directory="/somewhere")
    assert configs.remembered_pod("abc") is None
    configs.remember_pod("abc", config)
    assert configs.remembered_pod("abc") == config
    configs.forget_pod("abc")
    assert configs.remembered_pod("abc") is None
    configs.forget_pod("abc")  # twice is fine
    monkeypatch.setenv(configs.STATE_ENV, "/proc/not-writable")
    configs.remember_pod("abc", config)  # best effort: no exception


# -- logs ----------------------------------------------------------------------------------------------------
LOG = (b"2024-01-01T00:00:00.000000001Z stdout F hello\n"
       b"2024-01-01T00:00:00.000000002Z stderr F oops\n"
       b"2024-01-01T00:00:00.000000003Z stdout P par\n"
       b"2024-01-01T00:00:00.000000004Z stdout F tial\n"
       b"garbage line\n"
       b"2024-01-01T00:00:00.000000005Z stdout F \n")


def test_parse_and_render_cri_log_lines() -> None:
    items = list(logs.records(LOG))
    assert [(r.stream, r.partial, r.text) for r in items] == [
        ("stdout", False, b"hello"), ("stderr", False, b"oops"), ("stdout", True, b"par"),
        ("stdout", False, b"tial"), ("stdout", False, b"")]
    assert logs.render(items[0], timestamps=True) == b"2024-01-01T00:00:00.000000001Z hello\n"
    assert logs.render(items[2], timestamps=False) == b"par"
    assert [r.text for r in logs.tail_records(LOG, 2)] == [b"par", b"tial", b""]
    assert len(logs.tail_records(LOG, None)) == 5


def test_show_and_follow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.log"
    path.write_bytes(LOG[:90])  # the second line is cut in the middle: not printed yet
    out, err = io.BytesIO(), io.BytesIO()
    polls = 0

    async def running() -> bool:
        nonlocal polls
        polls += 1
        if polls == 2:
            path.write_bytes(LOG)
        return polls < 3

    monkeypatch.setattr(logs, "FOLLOW_POLL", 0.01)
    asyncio.run(logs.show(str(path), follow=True, still_running=running, stdout=out, stderr=err))
    assert out.getvalue() == b"hello\npartial\n\n" and err.getvalue() == b"oops\n"
    # A log that is not there, or cannot be read, is an error (it printed nothing, or a traceback); only
    # a followed one may not exist yet (a container just created).
    for unreadable, message in ((tmp_path / "missing.log", "does not exist"), (tmp_path, "Is a directory")):
        with pytest.raises(logs.LogFileError, match=message):
            asyncio.run(logs.show(str(unreadable), stdout=out, stderr=io.BytesIO()))
    out = io.BytesIO()
    asyncio.run(logs.show(str(tmp_path / "missing.log"), follow=True, still_running=lambda: _false(),
                          stdout=out, stderr=io.BytesIO()))
    assert out.getvalue() == b""


async def _false() -> bool:
    return False


# -- output and progress -------------------------------------------------------------------------------------
def test_age_and_sizes() -> None:
    now = 10**18
    assert output.age(0) == "-"
    assert output.age(now - 500_000_000, now) == "Less than a second ago"
    assert output.age(now - 1_000_000_000, now) == "1 second ago"
    assert output.age(now - 125 * 10**9, now) == "2 minutes ago"
    assert output.age(now - 7200 * 10**9, now) == "2 hours ago"
    assert output.age(now - 86400 * 10**9, now) == "1 day ago"
    assert output.human_size(999) == "999B" and output.human_size(4_300_000) == "4.3MB"
    assert output.short_id("a" * 64) == "a" * 13 and output.short_id("abc", no_trunc=True) == "abc"


def test_table() -> None:
    out = io.StringIO()
    output.table(["ID", "NAME"], [["1", "short"], ["12345", "x"]], out)
    assert out.getvalue() == "ID      NAME\n1       short\n12345   x\n"


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_spinner_only_on_a_terminal() -> None:
    async def run(out: io.StringIO, fail: bool = False) -> None:
        async with progress.step("RunPodSandbox web", out=out):
            await asyncio.sleep(0.25)
            if fail:
                raise RuntimeError("boom")

    tty = FakeTty()
    asyncio.run(run(tty))
    assert "RunPodSandbox web" in tty.getvalue() and tty.getvalue().endswith("s)\033[K\n")
    assert "... done (" in tty.getvalue() and "\r|" in tty.getvalue()
    failed = FakeTty()
    with pytest.raises(RuntimeError):
        asyncio.run(run(failed, fail=True))
    assert "... failed (" in failed.getvalue()
    pipe = io.StringIO()
    asyncio.run(run(pipe))
    assert pipe.getvalue() == ""  # scripts read clean stderr


# -- sandboxers ----------------------------------------------------------------------------------------------
def write_record(directory: Path, sandbox_id: str, name: str, state: str = "ready") -> None:
    config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=name, namespace="ns"))
    record = {"id": sandbox_id, "state": state, "pid": 42, "created_at_ns": 1,
              "pod_config_b64": base64.b64encode(config.SerializeToString()).decode(), "address": "ttrpc+unix:///x"}
    (directory / "sandboxes" / sandbox_id).mkdir(parents=True)
    (directory / "sandboxes" / sandbox_id / "sandbox.json").write_text(json.dumps(record))


def test_sandboxes_from_state_files(tmp_path: Path) -> None:
    write_record(tmp_path, "aaa111", "web")
    write_record(tmp_path, "aab222", "db", state="stopped")
    (tmp_path / "sandboxes" / "broken").mkdir()
    ref = sandboxers.SandboxerRef("runc", str(tmp_path / "absent.sock"), str(tmp_path))
    rows = sandboxers.list_sandboxes([ref, sandboxers.SandboxerRef("wasm", "/nonexistent.sock", "/nonexistent")])
    assert [(r.id, r.kind, r.state, r.name, r.namespace, r.live) for r in rows] == [
        ("aaa111", "runc", "ready", "web", "ns", False), ("aab222", "runc", "stopped", "db", "ns", False)]
    assert sandboxers.find([ref], "aaa")[1] == "aaa111"
    with pytest.raises(LookupError, match="several"):
        sandboxers.find([ref], "aa")
    with pytest.raises(LookupError, match="no sandboxer knows"):
        sandboxers.find([ref], "zzz")
    only = sandboxers.SandboxerRef("runc", str(tmp_path / "absent.sock"), str(tmp_path / "one"))
    write_record(tmp_path / "one", "ccc333", "solo")
    assert sandboxers.find([only], "c")[1] == "ccc333"
    with pytest.raises(LookupError, match="id .* is needed"):  # an empty id was a prefix of the only one
        sandboxers.find([only], "")
    assert sandboxers.default_ref("gvisor") == sandboxers.SandboxerRef(
        "gvisor", "/run/kuasar/gvisor-sandboxer.sock", "/run/kuasar-gvisor")


def test_sandboxes_ls_survives_damaged_state_records(tmp_path: Path) -> None:
    # A state file with a non-integer pid (or created_at_ns), or one that is a JSON list, crashed the
    # whole listing (ValueError/TypeError from int(), AttributeError from list.get).
    write_record(tmp_path, "good", "web")
    for sandbox_id, content in {"badpid": {"id": "badpid", "state": "ready", "pid": "forty-two",
                                           "created_at_ns": [1]},
                                "alist": ["not", "a", "record"]}.items():
        (tmp_path / "sandboxes" / sandbox_id).mkdir()
        (tmp_path / "sandboxes" / sandbox_id / "sandbox.json").write_text(json.dumps(content))
    ref = sandboxers.SandboxerRef("runc", str(tmp_path / "absent.sock"), str(tmp_path))
    rows = {r.id: r for r in sandboxers.list_sandboxes([ref])}
    assert sorted(rows) == ["badpid", "good"]  # the list is skipped like a file that is not JSON
    assert (rows["badpid"].pid, rows["badpid"].created_at_ns, rows["good"].pid) == (0, 0, 42)
    result = CliRunner().invoke(main, ["sandboxes", "ls", "--type", "runc", "--address", ref.socket,
                                       "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "badpid" in result.output and "good" in result.output


# -- the command line, offline -------------------------------------------------------------------------------
def test_cli_offline_paths(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "runp" in result.output and "sandboxes" in result.output
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and "kuasar-ctl, version" in result.output
    result = runner.invoke(main, ["runp"])
    assert result.exit_code == 1 and "needs a name" in result.output
    result = runner.invoke(main, ["exec", "-it", "abc", "--", "sh"])
    assert result.exit_code == 1 and "not available" in result.output
    for timeout in ("0", "nan", "inf", "1e10"):  # nan: a traceback; the huge ones overflowed the deadline
        result = runner.invoke(main, ["--timeout", timeout, "pods"])
        assert result.exit_code == 2 and "Invalid value for" in result.output and "--timeout" in result.output

    write_record(tmp_path, "abc123", "web")
    flags = ["--type", "runc", "--address", str(tmp_path / "none.sock"), "--dir", str(tmp_path)]
    result = runner.invoke(main, ["--json", "sandboxes", "ls", *flags])
    assert result.exit_code == 0
    assert [s["id"] for s in json.loads(result.output)["sandboxes"]] == ["abc123"]
    result = runner.invoke(main, ["sandboxes", "ls", *flags])
    assert "abc123" in result.output and "ready (state file)" in result.output and "ns/web" in result.output
    result = runner.invoke(main, ["sandbox", "shell", "abc", *flags])
    assert result.exit_code == 1 and "runc pod: it has no guest" in result.output
    result = runner.invoke(main, ["sandboxes", "ls", "--address", "/x.sock"])
    assert result.exit_code == 1 and "exactly one --type" in result.output


# -- the command line against a fake CRI client --------------------------------------------------------------
class FakeRuntime:
    """A RuntimeService stub behind a real CriClient: records what was sent and each call's RPC deadline."""

    def __init__(self) -> None:
        self.created: cri.ContainerConfig | None = None
        self.exec_request: cri.ExecSyncRequest | None = None
        self.exec_deadline: float | None = None

    async def ListPodSandbox(self, request: object, timeout: float | None = None) -> cri.ListPodSandboxResponse:
        return cri.ListPodSandboxResponse(items=[cri.PodSandbox(id="pod1")])

    async def ListContainers(self, request: object, timeout: float | None = None) -> cri.ListContainersResponse:
        return cri.ListContainersResponse(containers=[cri.Container(id="c1")])

    async def CreateContainer(self, request: cri.CreateContainerRequest,
                              timeout: float | None = None) -> cri.CreateContainerResponse:
        self.created = request.config
        return cri.CreateContainerResponse(container_id="c1")

    async def ExecSync(self, request: cri.ExecSyncRequest, timeout: float | None = None) -> cri.ExecSyncResponse:
        self.exec_request, self.exec_deadline = request, timeout
        return cri.ExecSyncResponse(stdout=b"out\n", exit_code=0)


@pytest.fixture
def fake_cri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeRuntime:
    """`run_cri` with a CriClient (the global --timeout's 60 s) whose stub is a FakeRuntime: no socket."""
    runtime = FakeRuntime()

    def run_cri(settings: cli.Settings, body: Any) -> Any:
        client = CriClient("/nonexistent.sock", timeout=settings.timeout)
        client._runtime = runtime  # type: ignore[assignment]
        return asyncio.run(body(client))

    monkeypatch.setattr(cli, "run_cri", run_cri)
    monkeypatch.setenv(configs.STATE_ENV, str(tmp_path / "state"))
    configs.remember_pod("pod1", configs.pod_config(name="p"))
    return runtime


def test_create_never_takes_words_after_double_dash_as_config_files(
        fake_cri: FakeRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `create POD --image busybox -- cat data.json` loaded data.json as the ContainerConfig (any existing
    # *.json among the first two positionals was a config file, even after `--`) and ran `data.json`.
    (tmp_path / "data.json").write_text('{"hello": "world"}')
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["create", "pod1", "--image", "busybox", "--", "cat", "data.json"])
    assert result.exit_code == 0, result.output
    assert fake_cri.created is not None and list(fake_cri.created.command) == ["cat", "data.json"]
    # Files are a leading run: a word that is not one ends it (`echo data.json` lost its `echo`).
    result = runner.invoke(main, ["create", "pod1", "--image", "busybox", "echo", "data.json"])
    assert result.exit_code == 0, result.output
    assert list(fake_cri.created.command) == ["echo", "data.json"]
    # Before the command (and before `--`) a file is still the container's config.
    (tmp_path / "ctr.json").write_text(json.dumps({"metadata": {"name": "from-file"}, "image": {"image": "x"}}))
    result = runner.invoke(main, ["create", "pod1", "ctr.json", "--", "cat", "data.json"])
    assert result.exit_code == 0, result.output
    assert fake_cri.created.metadata.name == "from-file"
    assert list(fake_cri.created.command) == ["cat", "data.json"]


def test_exec_timeout_zero_means_no_rpc_deadline(fake_cri: FakeRuntime) -> None:
    # `exec --timeout 0` (the default, "0: none") still cut the call off after the global --timeout (60 s).
    result = CliRunner().invoke(main, ["exec", "c1", "--", "sleep", "300"])
    assert result.exit_code == 0, result.output
    request = fake_cri.exec_request
    assert request is not None and (list(request.cmd), request.timeout) == (["sleep", "300"], 0)
    assert fake_cri.exec_deadline is None
    # With a timeout, containerd's comes first: the deadline is that plus a grace (not the global 60 s).
    result = CliRunner().invoke(main, ["exec", "--timeout", "5", "c1", "--", "true"])
    assert result.exit_code == 0, result.output
    request, deadline = fake_cri.exec_request, fake_cri.exec_deadline
    assert request is not None and request.timeout == 5 and deadline is not None and 5 < deadline < 60


@pytest.mark.parametrize("argv", [
    ["runp", "--name", "p", "--attempt", "-1"], ["runp", "--name", "p", "--attempt", "5000000000"],
    ["exec", "--timeout", "-1", "c1", "--", "true"], ["exec", "--timeout", str(2**63), "c1", "--", "true"],
    ["stop", "-t", "-1", "c1"], ["stop", "-t", str(2**63), "c1"],
])
def test_int_options_outside_their_protobuf_field_are_usage_errors(
        argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # `runp --attempt -1` or 5000000000 (a uint32) ended in protobuf's ValueError traceback, as did seconds
    # beyond int64 for exec/stop; negative seconds went on to containerd.
    def no_rpc(*_: object) -> None:
        raise AssertionError("a bad option must stop before any RPC")

    monkeypatch.setattr(cli, "run_cri", no_rpc)
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2 and "Invalid value" in result.output, (result.output, result.exception)


def test_an_endpoint_that_cannot_answer_fails_at_once_with_its_reason(tmp_path: Path) -> None:
    # It waited the whole --timeout (60 s) for a gRPC channel, then blamed the endpoint for any cause.
    runner = CliRunner()
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:  # its file stays: a crashed server's
        gone.bind(str(dead))
    for endpoint, reason in ((tmp_path / "none.sock", "no socket at"), (dead, "nothing listens on")):
        started = time.monotonic()
        result = runner.invoke(main, ["-r", f"unix://{endpoint}", "pods"])
        assert result.exit_code == 1 and reason in result.output, result.output
        assert time.monotonic() - started < 5
    # A containerd that stopped accepting (its listen queue full): the probe's connect blocked for ever.
    stuck = tmp_path / "stuck.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(stuck))
        server.listen(0)
        queued = []
        for _ in range(4):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            queued.append(client)
            try:
                client.connect(str(stuck))
            except BlockingIOError:
                break
        try:
            result = runner.invoke(main, ["-r", str(stuck), "pods"])
            assert result.exit_code == 1 and "does not accept connections" in result.output, result.output
        finally:
            for client in queued:
                client.close()


def test_a_config_file_that_is_not_there_is_an_error_not_the_command(
        fake_cri: FakeRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `create POD ctr.json pdo.json` (a typo) ran `pdo.json` as the container's command.
    (tmp_path / "ctr.json").write_text(json.dumps({"metadata": {"name": "c"}, "image": {"image": "x"}}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["create", "pod1", "ctr.json", "pdo.json"])
    assert result.exit_code == 2 and "pdo.json: no such config file" in result.output
    assert fake_cri.created is None


def test_exec_takes_everything_after_the_container_as_the_command(fake_cri: FakeRuntime) -> None:
    # `exec C ls -la` failed (No such option '-l'), and `exec C curl --timeout 5 URL` lost `--timeout 5`
    # to our own option.
    for argv, command in ((["c1", "ls", "-la"], ["ls", "-la"]),
                          (["c1", "sh", "-c", "echo hi"], ["sh", "-c", "echo hi"]),
                          (["c1", "curl", "--timeout", "5", "http://x"], ["curl", "--timeout", "5", "http://x"]),
                          (["c1", "--", "ls", "-la"], ["ls", "-la"])):
        result = CliRunner().invoke(main, ["exec", *argv])
        assert result.exit_code == 0, result.output
        request = fake_cri.exec_request
        assert request is not None and (list(request.cmd), request.timeout) == (command, 0)
    result = CliRunner().invoke(main, ["exec", "c1", "--"])
    assert result.exit_code == 2 and "no command to run" in result.output


def test_sandbox_state_we_may_not_read_is_an_error_not_an_empty_list(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_record(tmp_path, "abc123", "web")

    def denied(self: Path) -> Any:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", denied)
    flags = ["--type", "runc", "--address", str(tmp_path / "none.sock"), "--dir", str(tmp_path)]
    for argv in (["sandboxes", "ls", *flags], ["sandbox", "status", "abc", *flags]):
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 1 and "permission denied" in result.output, result.output
