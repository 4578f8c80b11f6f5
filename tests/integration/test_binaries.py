"""The frozen executables (dist/, `make binaries`) and `make install`/`make uninstall`.

* every [project.scripts] entry has a single-file executable in dist/ (hard links to one multi-call
  binary), and each one runs from an empty environment whose PATH has no Python (`--version`, `-v`);
* `make install` into a temporary PREFIX (and with DESTDIR), the systemd units (`systemd-analyze verify`
  when it exists, else parsed), the containerd fragment as containerd 2.1 merges it (`config dump`), and
  `make uninstall` removing exactly what was installed;
* the installed runc-sandboxer, started with `env -i` (PATH: only runc), tells systemd READY=1 on an
  abstract $NOTIFY_SOCKET, starts its own frozen task server, and serves a pod + container + exec
  through a private containerd 2.1 and CRI.

dist/ is built by `make binaries` (and by `make test`, about 25 s); without it these tests skip.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import CriClient
from tests.support import containerd as cd
from tests.support import images

from . import cri_helpers as h
from .conftest import integration_skip_reason, kill_task_server, stop_process, wait_ready

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DIST = REPO / "dist"
INSTALL = REPO / "packaging" / "install.py"
SANDBOXER_KINDS = ("runc", "wasm", "vmm", "quark", "gvisor")


def scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.fixture(scope="module")
def dist() -> Path:
    if not (DIST / "kuasar").is_file():
        pytest.skip("no frozen binaries in dist/: run `make binaries` (`make test` builds them)")
    missing = [name for name in scripts() if not (DIST / name).is_file()]
    if missing:
        pytest.skip(f"dist/ has no {', '.join(missing)}: run `make binaries` (`make test` builds them)")
    check = subprocess.run([sys.executable, str(REPO / "packaging" / "build_binaries.py"), "--check"],
                           capture_output=True, timeout=120, check=False)
    if check.returncode != 0:
        warnings.warn("dist/ is older than the sources (run `make binaries`); testing it anyway", stacklevel=1)
    return DIST


def empty_env(path_dir: Path, **extra: str) -> dict[str, str]:
    """What `env -i PATH=<dir>` gives: no PYTHONPATH/VIRTUAL_ENV/HOME, and no python on PATH."""
    assert shutil.which("python3", path=str(path_dir)) is None and shutil.which("python", path=str(path_dir)) is None
    return {"PATH": str(path_dir), **extra}


def test_every_script_is_a_link_to_one_multicall_binary(dist: Path) -> None:
    main = (dist / "kuasar").stat()
    for name in scripts():
        st = (dist / name).stat()
        assert (st.st_dev, st.st_ino) == (main.st_dev, main.st_ino), f"{name} is not a hard link to dist/kuasar"
    assert main.st_size < 80e6


def test_each_program_runs_without_python(dist: Path, tmp_path: Path) -> None:
    env = empty_env(tmp_path)
    for name in scripts():
        flag = "-v" if name.startswith("containerd-shim-") else "--version"
        res = subprocess.run([str(dist / name), flag], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=60, check=False)
        assert res.returncode == 0, f"{name} {flag}: {res.returncode}\n{res.stdout}\n{res.stderr}"
        assert "0.1.0" in res.stdout and name in res.stdout, f"{name} {flag}: {res.stdout!r}"
    # The multi-call binary also takes the program as its first argument, and lists them without one.
    res = subprocess.run([str(dist / "kuasar"), "runc-sandboxer", "--version"], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0 and "runc-sandboxer, version" in res.stdout
    res = subprocess.run([str(dist / "kuasar")], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2 and "runc-sandboxer" in res.stderr and "kuasar-ctl" in res.stderr
    # The per-pod helpers a sandboxer starts from its own binary, as task_server.helper_argv names them:
    # argv[0] picks the program whatever the executable's file name is.
    for program, subcommand, prog_name in (("vmm-sandboxer", "task-proxy", "kuasar.vmm.proxy"),
                                           ("quark-sandboxer", "task-relay", "quark-task-relay")):
        res = subprocess.run([program, subcommand, "--help"], executable=str(dist / "kuasar"), env=env,
                             capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0 and prog_name in res.stdout, f"{program} {subcommand}: {res}"
    # kuasar-ctl's own commands work frozen too (a clear error when containerd is absent).
    res = subprocess.run([str(dist / "kuasar-ctl"), "--timeout", "1", "-r", str(tmp_path / "no.sock"), "pods"],
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1 and "no socket at" in res.stderr


def make(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args], capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert res.returncode == 0, f"make {' '.join(args)}: {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def parse_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def test_install_with_destdir_then_uninstall(dist: Path, tmp_path: Path) -> None:
    """`make install DESTDIR=... PREFIX=/usr/local`: files land under DESTDIR, contents name /usr/local."""
    dest = tmp_path / "dest"
    dest.mkdir()
    out = make("install", f"DESTDIR={dest}", "PREFIX=/usr/local").stdout
    assert "containerd-kuasar.toml" in out
    root = dest / "usr/local"
    for name in scripts():
        assert os.access(root / "bin" / name, os.X_OK), name
    assert (root / "bin/kuasar").stat().st_ino == (root / "bin/runc-sandboxer").stat().st_ino
    unit = parse_unit(root / "lib/systemd/system/kuasar-runc.service")
    exec_start = unit["Service"]["ExecStart"]
    assert exec_start.startswith("/usr/local/bin/runc-sandboxer --listen /run/kuasar/runc-sandboxer.sock")
    assert "--config /usr/local/etc/kuasar/runc.toml" in unit["Service"]["ExecStart"]
    assert tomllib.loads((root / "etc/kuasar/runc.toml").read_text())["runc"]["binary"] == "runc"
    manifest = json.loads((root / "share/kuasar/install-manifest.json").read_text())
    files = [e["path"] for e in manifest["entries"] if e["type"] not in ("dir", "stagedir")]
    assert files and all(f.startswith("/usr/local/") for f in files)  # target paths, without DESTDIR

    # An administrator edits a config: uninstall keeps that one, removes everything else it made.
    edited = root / "etc/kuasar/runc.toml"
    edited.write_text(edited.read_text().replace('binary = "runc"', 'binary = "/opt/runc/runc"'))
    (root / "bin/not-ours").write_text("x")
    res = make("uninstall", f"DESTDIR={dest}", "PREFIX=/usr/local")
    assert "kept /usr/local/etc/kuasar/runc.toml" in res.stdout
    assert tree(dest) == {"usr", "usr/local", "usr/local/bin", "usr/local/bin/not-ours", "usr/local/etc",
                          "usr/local/etc/kuasar", "usr/local/etc/kuasar/runc.toml"}


def check_enable_makes_containerd_want_it(units: list[Path]) -> None:
    """`systemctl enable` of a unit (offline, on a root of its own) links it into containerd.service.wants
    too: a containerd started while the sandboxer is down starts it and, ordered after it, waits for it."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:  # not a systemd machine: nothing would read the units either
        return
    with tempfile.TemporaryDirectory() as name:
        root = Path(name)
        unitdir = root / "usr/lib/systemd/system"
        unitdir.mkdir(parents=True)
        for unit_path in units:
            shutil.copy(unit_path, unitdir / unit_path.name)
        res = subprocess.run([systemctl, f"--root={root}", "enable", "kuasar-runc.service"], capture_output=True,
                             text=True, timeout=60, check=False)
        assert res.returncode == 0, res.stderr
        wants = root / "etc/systemd/system/containerd.service.wants"
        assert sorted(p.name for p in wants.iterdir()) == ["kuasar-runc.service"]
        assert (root / "etc/systemd/system/multi-user.target.wants/kuasar-runc.service").is_symlink()


def test_install_into_a_prefix(dist: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    shimdir = tmp_path / "containerd-path"
    shimdir.mkdir()
    (prefix / "etc/kuasar").mkdir(parents=True)
    (prefix / "etc/kuasar/shim.toml").write_text("# mine\n")  # an existing config is never overwritten
    before = tree(tmp_path)
    res = subprocess.run([sys.executable, str(INSTALL), "install", "--prefix", str(prefix), "--shimdir",
                          str(shimdir), "--dist", str(dist)], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert "kept the existing" in res.stdout and (prefix / "etc/kuasar/shim.toml").read_text() == "# mine\n"
    shims = sorted(p.name for p in shimdir.iterdir())
    assert shims == sorted(n for n in scripts() if n.startswith("containerd-shim-"))

    units = sorted((prefix / "lib/systemd/system").glob("kuasar-*.service"))
    assert [u.name for u in units] == sorted(f"kuasar-{k}.service" for k in SANDBOXER_KINDS)
    for unit_path in units:
        unit = parse_unit(unit_path)
        service = unit["Service"]
        assert service["Type"] == "notify" and service["NotifyAccess"] == "all"
        assert service["Restart"] == "always" and service["KillMode"] == "process"
        assert service["Environment"].startswith(f"PATH={prefix / 'bin'}:")
        program = Path(service["ExecStart"].split()[0])
        assert program.parent == prefix / "bin" and os.access(program, os.X_OK)
        config = service["ExecStart"].split("--config ")[1].split()[0]
        tomllib.loads(Path(config).read_text())  # every referenced config exists and is TOML
        assert unit["Install"]["WantedBy"].split() == ["multi-user.target", "containerd.service"]
        assert unit["Unit"]["Before"] == "containerd.service"
    check_enable_makes_containerd_want_it(units)
    analyze = shutil.which("systemd-analyze")
    if analyze:
        res = subprocess.run([analyze, "verify", "--man=no", *map(str, units)], capture_output=True, text=True,
                             timeout=120, check=False)
        # verify exits 0 even for a unit it only half understood: its complaints are the verdict.
        complaints = [line for line in (res.stdout + res.stderr).splitlines()
                      if any(w in line for w in ("Failed", "Unknown", "Invalid", "ignoring", "not executable"))]
        assert res.returncode == 0 and not complaints, res.stdout + res.stderr

    # The containerd fragment, as containerd 2.1 itself merges it through `imports`.
    fragment = prefix / "etc/kuasar/containerd-kuasar.toml"
    main_config = tmp_path / "containerd.toml"
    main_config.write_text(f'version = 3\nimports = ["{fragment}"]\n')
    containerd = cd.containerd_binary()
    if containerd is not None:
        dump = subprocess.run([str(containerd), "--config", str(main_config), "config", "dump"], capture_output=True,
                              text=True, timeout=60, check=False)
        assert dump.returncode == 0, dump.stderr
        merged = tomllib.loads(dump.stdout)
        assert {k: v["address"] for k, v in merged["proxy_plugins"].items()} == {
            k: f"/run/kuasar/{k}-sandboxer.sock" for k in SANDBOXER_KINDS}
        assert all(v["type"] == "sandbox" for v in merged["proxy_plugins"].values())
        runtime = merged["plugins"]["io.containerd.cri.v1.runtime"]
        assert runtime["restrict_oom_score_adj"] is True
        handlers = runtime["containerd"]["runtimes"]
        for kind in SANDBOXER_KINDS:
            assert handlers[f"kuasar-{kind}"]["sandboxer"] == kind
        assert handlers["kuasar-gvisor"]["runtime_type"] == "io.containerd.kuasar-quark.v1"
        # VM containers' stdio: the vmm proxy refuses host FIFOs (every VM container failed at Create)
        assert handlers["kuasar-vmm"]["io_type"] == "streaming"
    raw = tomllib.loads(fragment.read_text())
    for handler in raw["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"].values():
        assert "options" not in handler

    res = subprocess.run([sys.executable, str(INSTALL), "uninstall", "--prefix", str(prefix), "--shimdir",
                          str(shimdir)], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    after = tree(tmp_path) - {"containerd.toml"}
    assert after == before


# -- the installed runc-sandboxer serving pods ---------------------------------------------------------------
def mapped_files(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, dist: Path) -> Iterator[Path]:
    prefix = tmp_path_factory.mktemp("prefix")
    subprocess.run([sys.executable, str(INSTALL), "install", "--prefix", str(prefix), "--dist", str(dist)],
                   check=True, capture_output=True, timeout=300)
    yield prefix
    subprocess.run([sys.executable, str(INSTALL), "uninstall", "--prefix", str(prefix)], check=False,
                   capture_output=True, timeout=120)


def test_installed_runc_sandboxer_serves_a_pod(installed: Path, tmp_path: Path) -> None:
    reason = integration_skip_reason()
    if reason:
        pytest.skip(reason)
    runc = shutil.which("runc")
    assert runc is not None
    path_dir = tmp_path / "path"
    path_dir.mkdir()
    (path_dir / "runc").symlink_to(runc)
    short = Path(f"/run/kuasar-sh0-{secrets.token_hex(3)}")
    short.mkdir(mode=0o700)
    sandboxer_socket, sandboxer_dir = short / "runc.sock", short / "runc"
    notify_name = f"kuasar-sh0-{secrets.token_hex(6)}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind("\0" + notify_name)
    image_dir = tmp_path / "images"
    instance = cd.ContainerdInstance(tmp_path / "containerd", sandboxers={"runc": str(sandboxer_socket)},
                                     bridge="kuasar-sh0", subnet="10.250.0.0/16", log_level="info",
                                     extra_path=[installed / "bin"])
    log_path = tmp_path / "runc-sandboxer.log"
    proc: subprocess.Popen | None = None
    try:
        instance.start()
        instance.import_image(images.build_busybox_image(image_dir / "busybox.tar", ref=h.BUSYBOX))
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [str(installed / "bin/runc-sandboxer"), "--listen", str(sandboxer_socket), "--dir", str(sandboxer_dir),
                 "--events-address", instance.ttrpc_address, "--config", str(installed / "etc/kuasar/runc.toml"),
                 "--log-level", "debug"],
                env=empty_env(path_dir, NOTIFY_SOCKET="@" + notify_name), stdin=subprocess.DEVNULL, stdout=log,
                stderr=log, cwd="/", start_new_session=True)
        assert wait_ready(notify, proc, log_path) == f"READY=1\nSTATUS=serving {sandboxer_socket}".encode()

        # Its task server is the same frozen binary, re-executed as an independent process.
        task_server = int((sandboxer_dir / "task-server.pid").read_text())
        # (the build's own file, which the program names link to: a later install leaves it while it runs)
        assert os.readlink(f"/proc/{task_server}/exe") == str((installed / "bin/runc-sandboxer").resolve())
        assert Path(os.readlink(f"/proc/{task_server}/exe")).parent == installed / "lib/kuasar"
        cmdline = Path(f"/proc/{task_server}/cmdline").read_bytes().split(b"\0")
        assert cmdline[0] == b"runc-task-server"  # the multi-call binary picks the program by argv[0]
        # The build host's interpreter: the venv, its stdlib and extension modules, its libpython.
        paths = sysconfig.get_paths()
        interpreters = tuple({str(REPO / ".venv"), paths["stdlib"], paths["platstdlib"],
                              os.path.realpath(sys.executable)})
        for pid in (task_server, *[int(p) for p in subprocess.run(
                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False).stdout.split()]):
            mapped = mapped_files(pid)
            host_python = [m for m in mapped if m.startswith(interpreters)
                           or ("libpython3" in m and "/_MEI" not in m)]
            assert not host_python, f"pid {pid} maps the build host's Python"
            assert any("libpython3" in m and "/_MEI" in m for m in mapped), f"pid {pid}: no bundled libpython"

        async def scenario() -> None:
            async with CriClient(instance.address) as client:
                pod_id, pod = await h.run_pod(client, "frozen", tmp_path / "logs")
                cid = await h.start_container(client, pod_id, pod, "hello",
                                              ["sh", "-c", "echo hello from a frozen sandboxer; exec sleep 300"])
                await h.wait_log(pod, "hello", "hello from a frozen sandboxer")
                result = await client.exec_sync(cid, ["sh", "-c", "echo exec-ok; exit 7"], timeout=30)
                assert (result.exit_code, result.stdout) == (7, b"exec-ok\n")
                status = (await client.pod_sandbox_status(pod_id)).status
                assert status.state == cri.SANDBOX_READY
                # The pod's process is the installed kuasar-pause, found beside the programs (not the
                # few-MB Python fallback), though the programs are links to the build's file in lib/kuasar.
                pod_pid = json.loads((sandboxer_dir / "sandboxes" / pod_id / "sandbox.json").read_text())["pid"]
                assert os.readlink(f"/proc/{pod_pid}/exe") == str(installed / "bin/kuasar-pause")
                # The frozen kuasar-ctl sees the same pod and container (and answers for scripts).
                ctl = [str(installed / "bin/kuasar-ctl"), "-r", instance.address, "--json"]
                env = empty_env(path_dir)
                pods = json.loads(subprocess.run([*ctl, "pods"], env=env, capture_output=True, text=True,
                                                 timeout=60, check=True).stdout)["items"]
                assert [p["id"] for p in pods] == [pod_id]
                res = subprocess.run([*ctl, "exec", cid, "--", "echo", "frozen-ctl"], env=env, capture_output=True,
                                     text=True, timeout=60, check=True)
                assert json.loads(res.stdout)["stdout"] == "frozen-ctl\n"
                sandboxes = json.loads(subprocess.run(
                    [*ctl, "sandboxes", "ls", "--type", "runc", "--address", str(sandboxer_socket), "--dir",
                     str(sandboxer_dir)], env=env, capture_output=True, text=True, timeout=60, check=True).stdout)
                assert [(s["id"], s["state"]) for s in sandboxes["sandboxes"]] == [(pod_id, "ready")]
                await client.stop_container(cid, 0)
                await h.remove_pod(client, pod_id)

        asyncio.run(scenario())
    finally:
        instance.stop()
        if proc is not None:
            stop_process(proc, signal.SIGTERM)
        kill_task_server(sandboxer_dir)
        notify.close()
        shutil.rmtree(short, ignore_errors=True)
