"""Debian 12's stock containerd 1.6 (no Sandbox API) running containers on runc-sandboxer through the
forwarding shim `containerd-shim-kuasar-runc-v2` (kuasar/common/shim_v2.py).

containerd 1.6.20 comes from Debian bookworm as a .deb (setup.sh's private-apt fetch), unpacked
with `dpkg-deb -x` into build/containerd-1.6/ (cached there; nothing is installed system-wide), and runs
with its own root, state and sockets. `ctr run --runtime io.containerd.kuasar-runc.v2` has no pod: the
container becomes its own one-container sandbox on the sandboxer (Controller.Create + Start in the shim's
`start`), removed again by the shim's `delete` when the container goes. With 1.6's CRI, the first
container of a pod is its pause container, whose own id is the pod's `io.kubernetes.cri.sandbox-id`: it
makes the sandbox, the app containers join it, and removing the pause container removes the sandbox.
The shim is tested twice: as the venv's Python entry point, and as the frozen binary from dist/ when
`make binaries` built it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from kuasar.common.cri_client import CriClient, container_config, pod_config
from tests.support import containerd as cd
from tests.support import images
from tests.support.procs import live_children

from .conftest import kill_task_server, start_sandboxer, stop_process
from .cri_helpers import cgroups_named

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "containerd-1.6"
BUSYBOX = "localhost/kuasar/busybox:latest"
RUNTIME = "io.containerd.kuasar-runc.v2"
SHIM = "containerd-shim-kuasar-runc-v2"
NAMESPACE = "default"
DISABLED = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
            "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp",
            "io.containerd.internal.v1.tracing"]


# containerd 1.6's CRI with our forwarding shim as the `kuasar-runc` handler (the shipped
# packaging/config/containerd-kuasar-1.6.toml says the same), and the local pause image.
CRI_CONFIG = """
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/kuasar/pause:latest"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kuasar-runc]
      runtime_type = "io.containerd.kuasar-runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"""


def fetch_containerd16() -> Path:
    """build/containerd-1.6/root/usr/bin with Debian bookworm's containerd 1.6, fetched once."""
    bindir = CACHE / "root" / "usr" / "bin"
    if (bindir / "containerd").is_file():
        return bindir
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs apt-get and dpkg-deb to fetch Debian 12's containerd 1.6")
    # setup.sh's own fetch: bookworm's archive from this machine's Debian mirror through a private apt
    # state, so it works on Debian 13 too, whose sources name no bookworm (and the machine's apt is
    # left as it is).
    shutil.rmtree(CACHE, ignore_errors=True)
    CACHE.mkdir(parents=True)
    stage = CACHE / ".stage"
    fetch = subprocess.run(["bash", "-c", 'source "$1" && fetch_debian_package bookworm containerd "$2"', "bash",
                            str(REPO / "scripts" / "setup.sh"), str(stage)],
                           env={**os.environ, "KUASAR_PREFIX": str(CACHE / "prefix"), "PY": sys.executable},
                           capture_output=True, text=True, timeout=600, check=False)
    if fetch.returncode != 0 or not (stage / "usr" / "bin" / "containerd").is_file():
        shutil.rmtree(CACHE, ignore_errors=True)
        pytest.skip(f"containerd from Debian bookworm is not available from this machine's Debian mirror: "
                    f"{(fetch.stdout + fetch.stderr).strip()[-300:]}")
    stage.rename(CACHE / "root")
    shutil.rmtree(CACHE / "prefix", ignore_errors=True)
    return bindir


def version_of(containerd: Path) -> str:
    out = subprocess.run([str(containerd), "--version"], capture_output=True, text=True, timeout=30).stdout
    return out.split()[2] if len(out.split()) > 2 else ""


class Containerd16:
    """containerd 1.6 with a private root, state and sockets; CRI off (ctr only) unless `cri`."""

    def __init__(self, bindir: Path, base: Path, sockets: Path, shim_dir: Path, sandboxer_socket: Path,
                 cri: bool = False) -> None:
        self.bindir, self.base, self.sockets, self.cri = bindir, base, sockets, cri
        self.root, self.state = base / "root", sockets / "state"
        self.address = str(sockets / "containerd.sock")
        self.ttrpc_address = str(sockets / "containerd.sock.ttrpc")
        self.config = base / "config.toml"
        self.log = base / "containerd.log"
        self.env = {"PATH": f"{shim_dir}:{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "KUASAR_SANDBOXER_ADDRESS": str(sandboxer_socket), "HOME": "/root",
                    "KUASAR_SHIM_LOG": str(base / "shim.log")}
        self.proc: subprocess.Popen | None = None

    def write_config(self) -> None:
        disabled = ", ".join(f'"{p}"' for p in DISABLED if not (self.cri and p.endswith(".cri")))
        text = (f'version = 2\nroot = "{self.root}"\nstate = "{self.state}"\n'
                f"disabled_plugins = [{disabled}]\n"
                f'[grpc]\n  address = "{self.address}"\n[ttrpc]\n  address = "{self.ttrpc_address}"\n'
                '[debug]\n  level = "debug"\n')
        if self.cri:  # host-network pods only: no CNI plugin is called, the conf dir stays empty
            (self.base / "cni").mkdir(exist_ok=True)
            text += CRI_CONFIG.format(cni=self.base / "cni")
        self.config.write_text(text)

    def start(self) -> None:
        self.write_config()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(self.bindir / "containerd"), "--config", str(self.config)],
                                         env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while self.ctr("version", check=False, namespace=None).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"containerd 1.6 did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def terminate(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def ctr(self, *args: str, check: bool = True, namespace: str | None = NAMESPACE,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / "ctr"), "--address", self.address]
        if namespace:
            cmd += ["-n", namespace]
        res = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=self.env, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)}: {res.returncode}\n{res.stdout}\n{res.stderr}\n"
                                 f"--- containerd log ---\n{self.log.read_text()[-3000:]}")
        return res

    def cleanup(self) -> None:
        if self.proc is not None:
            for ns in (NAMESPACE, "k8s.io"):
                for task in self.ctr("tasks", "ls", "-q", check=False, namespace=ns).stdout.split():
                    self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", task, check=False, namespace=ns)
                    self.ctr("tasks", "delete", "-f", task, check=False, namespace=ns)
                for container in self.ctr("containers", "ls", "-q", check=False, namespace=ns).stdout.split():
                    self.ctr("containers", "rm", container, check=False, namespace=ns)
        self.terminate()
        cd.unmount_all(self.root, self.state)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)


def write_python_shim(directory: Path) -> None:
    """The shim as the venv runs it (an executable named like the frozen one)."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / SHIM
    shim.write_text(f"#!{sys.executable}\nimport sys\nfrom kuasar.common.shim_v2 import main\nsys.exit(main())\n")
    shim.chmod(0o755)


def frozen_shim_or_skip(directory: Path) -> None:
    dist = REPO / "dist"
    if not (dist / SHIM).is_file():
        pytest.skip(f"no frozen {SHIM} in dist/: run `make binaries` (`make test` builds it)")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        os.link(dist / SHIM, directory / SHIM)  # not a symlink: the program goes by its own path's name
    except OSError as err:
        if err.errno != errno.EXDEV:  # Debian 13's /tmp is a tmpfs of its own
            raise
        shutil.copy2(dist / SHIM, directory / SHIM)


@pytest.fixture(params=["python", "frozen"])
def stack16(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Containerd16, Path]]:
    yield from make_stack16(request.param, tmp_path, cri=False)


@pytest.fixture(params=["python", "frozen"])
def cri_stack16(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Containerd16, Path]]:
    yield from make_stack16(request.param, tmp_path, cri=True)


def make_stack16(shim: str, tmp_path: Path, cri: bool) -> Iterator[tuple[Containerd16, Path]]:
    if os.geteuid() != 0:
        pytest.skip("needs root (containerd, runc, mounts)")
    if shutil.which("runc") is None:
        pytest.skip("runc not installed (run `make setup`)")
    shim_dir = tmp_path / "shim-bin"
    if shim == "frozen":
        frozen_shim_or_skip(shim_dir)
    else:
        write_python_shim(shim_dir)
    bindir = fetch_containerd16()
    assert version_of(bindir / "containerd").startswith("1.6.")
    sockets = Path(f"/run/kuasar-sh0-{secrets.token_hex(3)}")
    sockets.mkdir(mode=0o700)
    sandboxer_socket, sandboxer_dir = sockets / "runc.sock", sockets / "runc"
    instance = Containerd16(bindir, tmp_path, sockets, shim_dir, sandboxer_socket, cri=cri)
    sandboxer = None
    try:
        instance.start()
        tars = [images.build_busybox_image(tmp_path / "images" / "busybox.tar", ref=BUSYBOX)]
        if cri:
            tars.append(images.build_pause_image(tmp_path / "images" / "pause.tar"))
        for tar in tars:
            instance.ctr("images", "import", "--platform", "linux/amd64", str(tar),
                         namespace="k8s.io" if cri else NAMESPACE)
        sandboxer = start_sandboxer(sandboxer_socket, sandboxer_dir, tmp_path / "runc-sandboxer.log",
                                    instance.ttrpc_address)
        yield instance, sandboxer_dir
    finally:
        instance.cleanup()
        if sandboxer is not None:
            stop_process(sandboxer)
        kill_task_server(sandboxer_dir)
        shutil.rmtree(sockets, ignore_errors=True)


def sandboxes(sandboxer_dir: Path) -> list[str]:
    root = sandboxer_dir / "sandboxes"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def pod_processes(sandboxer_dir: Path) -> list[int]:
    try:
        server = int((sandboxer_dir / "task-server.pid").read_text())
    except FileNotFoundError:
        return []
    return [proc.pid for proc in live_children(server, "pod-")]


def wait_until(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.1)


def test_ctr_run_prints_hello(stack16: tuple[Containerd16, Path]) -> None:
    instance, sandboxer_dir = stack16
    res = instance.ctr("run", "--rm", "--runtime", RUNTIME, BUSYBOX, "hello16", "echo", "hello")
    assert res.stdout == "hello\n"
    # Exit codes come back through the task server's Wait.
    res = instance.ctr("run", "--rm", "--runtime", RUNTIME, BUSYBOX, "exit16", "sh", "-c", "echo bye >&2; exit 3",
                       check=False)
    assert res.returncode == 3 and "bye" in res.stdout + res.stderr
    # The shim's `delete` removed each one-container sandbox; containerd removed its bundles.
    wait_until(lambda: sandboxes(sandboxer_dir) == [] and not pod_processes(sandboxer_dir),
               "the sandboxes of the finished containers are gone")
    bundles = instance.state / "io.containerd.runtime.v2.task" / NAMESPACE
    assert not bundles.is_dir() or list(bundles.iterdir()) == []
    assert cd.mounts_under(instance.root, instance.state) == []
    # containerd ran our `delete` after each task's connection closed, and liked its DeleteResponse.
    log = instance.log.read_text()
    assert log.count("cleaning up dead shim") >= 2
    assert "failed to clean up after shim disconnected" not in log and "cleanup warnings" not in log


def test_detached_container_exec_and_containerd_restart(stack16: tuple[Containerd16, Path]) -> None:
    instance, sandboxer_dir = stack16
    instance.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX, "sleeper16", "sleep", "300")
    try:
        assert sandboxes(sandboxer_dir) == ["sleeper16"] and len(pod_processes(sandboxer_dir)) == 1
        tasks = instance.ctr("tasks", "ls").stdout
        assert "sleeper16" in tasks and "RUNNING" in tasks
        res = instance.ctr("tasks", "exec", "--exec-id", "e1", "sleeper16", "sh", "-c", "echo exec-ok; exit 4",
                           check=False)
        assert res.returncode == 4 and res.stdout == "exec-ok\n"
        bundle = instance.state / "io.containerd.runtime.v2.task" / NAMESPACE / "sleeper16"
        assert (bundle / "address").read_text().startswith(f"unix://{sandboxer_dir}/")

        # containerd 1.6 restarts: it re-attaches through <bundle>/address, the container never stopped.
        pid_before = instance.ctr("tasks", "ls").stdout.split()[-2]
        instance.terminate()
        instance.start()
        tasks = instance.ctr("tasks", "ls").stdout
        assert "sleeper16" in tasks and "RUNNING" in tasks and tasks.split()[-2] == pid_before
        res = instance.ctr("tasks", "exec", "--exec-id", "e2", "sleeper16", "echo", "after-restart")
        assert res.stdout == "after-restart\n"

        instance.ctr("tasks", "kill", "-s", "SIGKILL", "sleeper16")
        wait_until(lambda: "STOPPED" in instance.ctr("tasks", "ls").stdout, "the task is stopped")
        instance.ctr("tasks", "delete", "sleeper16")
        wait_until(lambda: sandboxes(sandboxer_dir) == [], "the one-container sandbox is removed")
        instance.ctr("containers", "rm", "sleeper16")
        assert not pod_processes(sandboxer_dir)
    finally:  # (no-ops when the test got through)
        instance.ctr("tasks", "kill", "-s", "SIGKILL", "sleeper16", check=False)
        instance.ctr("tasks", "delete", "-f", "sleeper16", check=False)
        instance.ctr("containers", "rm", "sleeper16", check=False)


def test_a_sandbox_its_owner_left_while_the_sandboxer_was_down_is_removed_at_its_restart(
        stack16: tuple[Containerd16, Path], tmp_path: Path) -> None:
    """The owner's `delete` reaches the task server (it outlives the sandboxer) but not the sandboxer, and
    containerd removes the bundle after it all the same: the restarted sandboxer removes the orphan."""
    instance, sandboxer_dir = stack16
    instance.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX, "orphan16", "sleep", "300")
    socket = sandboxer_dir.parent / "runc.sock"
    restarted = None
    try:
        assert sandboxes(sandboxer_dir) == ["orphan16"] and len(pod_processes(sandboxer_dir)) == 1
        sandboxer = next(p for p in psutil.process_iter(["cmdline"])  # (its spec is one JSON argument)
                         if any(str(socket) in arg for arg in p.info["cmdline"] or []) and p.pid != os.getpid())
        sandboxer.kill()
        sandboxer.wait(10)
        instance.ctr("tasks", "kill", "-s", "SIGKILL", "orphan16")
        wait_until(lambda: "STOPPED" in instance.ctr("tasks", "ls").stdout, "the task is stopped")
        instance.ctr("tasks", "delete", "orphan16")
        bundle = instance.state / "io.containerd.runtime.v2.task" / NAMESPACE / "orphan16"
        wait_until(lambda: not bundle.exists(), "containerd removed the owner's bundle")
        assert sandboxes(sandboxer_dir) == ["orphan16"] and len(pod_processes(sandboxer_dir)) == 1
        restarted = start_sandboxer(socket, sandboxer_dir, tmp_path / "runc-sandboxer.log", instance.ttrpc_address)
        wait_until(lambda: sandboxes(sandboxer_dir) == [] and not pod_processes(sandboxer_dir),
                   "the restarted sandboxer removed the orphaned sandbox and its pod process")
        assert "its owner's bundle is gone" in (tmp_path / "runc-sandboxer.log").read_text()
    finally:
        if restarted is not None:
            stop_process(restarted)
        instance.ctr("tasks", "delete", "-f", "orphan16", check=False)
        instance.ctr("containers", "rm", "orphan16", check=False)


def test_cri_pod_on_containerd16(cri_stack16: tuple[Containerd16, Path], tmp_path: Path) -> None:
    """CRI on 1.6: RunPodSandbox starts the pause container through the shim (its own id is the pod's
    sandbox-id: the shim makes the sandbox), the app container joins that sandbox; removing the pause
    container (RemovePodSandbox) removes the sandbox. The pod's cgroup_parent reaches the sandbox (read
    back from the pause container's cgroupsPath)."""
    instance, sandboxer_dir = cri_stack16
    log_dir = tmp_path / "logs"
    parent = f"kuasar16-{os.getpid()}/pod"
    memory = Path("/sys/fs/cgroup/memory")

    async def scenario() -> None:
        async with CriClient(instance.address) as client:
            assert (await client.version()).runtime_version.startswith("1.6.")
            pod = pod_config("p16", log_directory=str(log_dir), cgroup_parent=parent)
            pod_id = (await client.run_pod_sandbox(pod, runtime_handler="kuasar-runc")).pod_sandbox_id
            assert sandboxes(sandboxer_dir) == [pod_id]
            if memory.is_dir():  # cgroup v1 (v2 has no memory/ directory)
                assert set(pod_processes(sandboxer_dir)) & {int(p) for p in (memory / parent / "cgroup.procs")
                                                           .read_text().split()}, "the pod process is in its parent"
            host_pid_ns = os.readlink("/proc/self/ns/pid")
            assert all(os.readlink(f"/proc/{pid}/ns/pid") != host_pid_ns for pid in pod_processes(sandboxer_dir))
            config = container_config("c1", BUSYBOX, ["sh", "-c", "echo hello from CRI on 1.6; exec sleep 300"])
            cid = (await client.create_container(pod_id, config, pod)).container_id
            await client.start_container(cid)
            wait_until(lambda: "hello from CRI on 1.6" in (log_dir / "c1.log").read_text(errors="replace")
                       if (log_dir / "c1.log").exists() else False, "the container's output in its CRI log")
            result = await client.exec_sync(cid, ["sh", "-c", "echo exec-ok; exit 5"], timeout=20)
            assert (result.exit_code, result.stdout) == (5, b"exec-ok\n")
            assert sandboxes(sandboxer_dir) == [pod_id]  # one sandbox for the pod's two containers
            await client.stop_container(cid, 0)
            await client.remove_container(cid)
            await client.stop_pod_sandbox(pod_id)
            await client.remove_pod_sandbox(pod_id)

    asyncio.run(scenario())
    wait_until(lambda: sandboxes(sandboxer_dir) == [] and not pod_processes(sandboxer_dir), "the pod is gone")
    assert cgroups_named(parent.split("/")[0]) == [], "the pod's cgroup is removed with it"


def test_sandboxer_down_fails_start_clearly(stack16: tuple[Containerd16, Path], tmp_path: Path) -> None:
    instance, _ = stack16
    instance.env["KUASAR_SANDBOXER_ADDRESS"] = str(tmp_path / "nobody.sock")
    instance.terminate()
    instance.start()
    res = instance.ctr("run", "--rm", "--runtime", RUNTIME, BUSYBOX, "nobody16", "true", check=False)
    assert res.returncode != 0 and "does not answer" in res.stderr
    instance.ctr("containers", "rm", "nobody16", check=False)


def test_the_1_6_config_fragment_is_accepted(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (fetches containerd 1.6 like the other tests here)")
    bindir = fetch_containerd16()
    fragment = REPO / "packaging" / "config" / "containerd-kuasar-1.6.toml"
    config = tmp_path / "config.toml"
    config.write_text(f'version = 2\nimports = ["{fragment}"]\n')
    res = subprocess.run([str(bindir / "containerd"), "--config", str(config), "config", "dump"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    runtimes = tomllib.loads(res.stdout)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    assert runtimes["kuasar-runc"]["runtime_type"] == RUNTIME
    assert runtimes["kuasar-gvisor"]["runtime_type"] == "io.containerd.kuasar-gvisor.v2"


# -- the shim's own logic, no containerd needed ----------------------------------------------------------------
def test_shim_finds_its_type_and_sandboxer(tmp_path: Path) -> None:
    from kuasar.common import shim_v2

    assert shim_v2.sandbox_type("/usr/local/bin/containerd-shim-kuasar-wasm-v2", {}) == "wasm"
    assert shim_v2.sandbox_type("shim", {"KUASAR_SANDBOX_TYPE": "vmm"}) == "vmm"
    with pytest.raises(shim_v2.ShimError, match="containerd-shim-kuasar-<type>-v2"):
        shim_v2.sandbox_type("containerd-shim-runc-v2", {})
    with pytest.raises(shim_v2.ShimError):  # the v1 helper's name is not the forwarding shim's
        shim_v2.sandbox_type("containerd-shim-kuasar-runc-v1", {})

    exe = str(tmp_path / "bin" / SHIM)
    if not shim_v2.SYSTEM_CONFIG.exists():
        assert shim_v2.sandboxer_address("runc", {}, exe) == "/run/kuasar/runc-sandboxer.sock"
    (tmp_path / "etc/kuasar").mkdir(parents=True)
    (tmp_path / "etc/kuasar/shim.toml").write_text('[runc]\nsandboxer_address = "unix:///x/runc.sock"\n')
    if not shim_v2.SYSTEM_CONFIG.exists():  # a machine-wide /etc/kuasar/shim.toml would come first
        assert shim_v2.sandboxer_address("runc", {}, exe) == "/x/runc.sock"  # <prefix>/etc next to <prefix>/bin
        assert shim_v2.sandboxer_address("wasm", {}, exe) == "/run/kuasar/wasm-sandboxer.sock"
    config = tmp_path / "other.toml"
    config.write_text('[quark]\nsandboxer_address = "/y/quark.sock"\n')
    assert shim_v2.sandboxer_address("quark", {"KUASAR_SHIM_CONFIG": str(config)}, exe) == "/y/quark.sock"
    assert shim_v2.sandboxer_address("quark", {"KUASAR_SHIM_CONFIG": str(config),
                                               "KUASAR_SANDBOXER_ADDRESS": "/z.sock"}, exe) == "/z.sock"
    config.write_text("not toml [")
    with pytest.raises(shim_v2.ShimError, match="shim config"):
        shim_v2.sandboxer_address("quark", {"KUASAR_SHIM_CONFIG": str(config)}, exe)


def test_shim_reads_the_bundle(tmp_path: Path) -> None:
    import json

    from kuasar.common import shim_v2
    from kuasar.common.api.runtime.v1 import api_pb2 as cri

    bundle = tmp_path / "c1"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"hostname": "h", "linux": {"namespaces": [{"type": "pid"}]}}))
    info = shim_v2.read_bundle(bundle, "c1")
    assert (info.sandbox_id, info.netns_path) == ("c1", "")  # a `ctr run` container is its own sandbox
    config = shim_v2.pod_config(info, "default")
    assert config.metadata.name == "c1" and config.metadata.namespace == "default"
    assert config.linux.security_context.namespace_options.network == cri.NODE and config.hostname == ""
    assert config.linux.security_context.namespace_options.pid == cri.POD  # the pod process holds one

    # CRI on containerd 1.6: the pause container names the pod and its netns.
    (bundle / "config.json").write_text(json.dumps({
        "hostname": "web", "annotations": {"io.kubernetes.cri.sandbox-id": "pod1",
                                           "io.kubernetes.cri.sandbox-name": "web",
                                           "io.kubernetes.cri.sandbox-namespace": "prod",
                                           "io.kubernetes.cri.sandbox-uid": "u1",
                                           "io.kubernetes.cri.sandbox-log-directory": "/var/log/pods/x",
                                           "team": "a"},
        "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}]}}))
    info = shim_v2.read_bundle(bundle, "c1")
    assert (info.sandbox_id, info.netns_path) == ("pod1", "/var/run/netns/cni-1")
    config = shim_v2.pod_config(info, "k8s.io")
    assert (config.metadata.name, config.metadata.namespace, config.metadata.uid) == ("web", "prod", "u1")
    assert config.log_directory == "/var/log/pods/x" and dict(config.annotations) == {"team": "a"}
    assert config.linux.security_context.namespace_options.network == cri.POD and config.hostname == "web"
    assert config.linux.cgroup_parent == ""  # not a pause container's spec
    assert config.linux.security_context.namespace_options.pid == cri.NODE  # no PID namespace: hostPID

    # The pod's cgroup_parent, from the pause container's cgroupsPath (either cgroup driver's form).
    pod_slice = "kubepods-besteffort-podu1.slice"
    for cgroups_path, parent in (("/kubepods/besteffort/podu1/pod1", "/kubepods/besteffort/podu1"),
                                 (f"{pod_slice}:cri-containerd:pod1", pod_slice), ("/k8s.io/other", "")):
        (bundle / "config.json").write_text(json.dumps({
            "annotations": {"io.kubernetes.cri.sandbox-id": "pod1", "io.kubernetes.cri.container-type": "sandbox"},
            "linux": {"cgroupsPath": cgroups_path}}))
        assert shim_v2.pod_config(shim_v2.read_bundle(bundle, "pod1"), "k8s.io").linux.cgroup_parent == parent
    (bundle / "config.json").write_text("{")
    with pytest.raises(shim_v2.ShimError, match="config.json"):
        shim_v2.read_bundle(bundle, "c1")


def test_shim_task_addresses_and_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from kuasar.common import shim_v2

    assert shim_v2.task_address("ttrpc+unix:///run/x/task.sock") == "unix:///run/x/task.sock"
    assert shim_v2.task_address("unix:///run/x/task.sock") == "unix:///run/x/task.sock"
    for unusable, why in (("ttrpc+vsock://3:1024", "not a unix socket"), ("grpc+unix:///x", "ttrpc only"),
                          ("ttrpc+hvsock:///x.vsock:1024", "not a unix socket")):
        with pytest.raises(shim_v2.ShimError, match=why):
            shim_v2.task_address(unusable)
    assert shim_v2.main(["-v"]) == 0 and "Version: 0.1.0" in capsys.readouterr().out
    assert shim_v2.main(["--version"]) == 0
    assert shim_v2.main(["-namespace", "k8s.io", "-id", "x"]) == 2
    opts = shim_v2.parse_args(["-namespace", "k8s.io", "-id", "-dash", "-debug", "delete"], "p")
    assert (opts.namespace, opts.id, opts.debug, opts.action) == ("k8s.io", "-dash", True, "delete")
