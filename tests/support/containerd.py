"""Run a private, real containerd 2.x for integration tests.

Example::

    from tests.support.containerd import ContainerdInstance

    with ContainerdInstance(tmp_path, sandboxers={"runc": "/run/kuasar-x/runc.sock"}) as cd:
        cd.import_image(busybox_tar)
        print(cd.ctr("images", "ls", "-q").stdout)

Everything the instance owns lives under ``base_dir`` (root, state, CNI config and IPAM data, the
log) except the unix sockets, which go to a short directory (``/run/kuasar-test-<random>/``) when
``base_dir`` is too long for the 108-byte ``sun_path`` limit. The containerd binaries come from
``$KUASAR_PREFIX/bin`` (``<repo>/.prefix/bin`` by default, see scripts/setup.sh).

Things that are shared with any other containerd on the machine and that we cannot relocate: the
runc shim's sockets (``/run/containerd/s/``), ctr's FIFOs (``/run/containerd/fifo``), runc's state
(``/run/containerd/runc/<ns>``) and the CNI result cache (``/var/lib/cni``). ``stop()`` removes what
this instance left there (its shims and runc containers), not the directories themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kuasar.common.mounts import mount_points_under

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_NAMESPACE = "k8s.io"
PAUSE_REF = "localhost/kuasar/pause:latest"
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes including the NUL; keep a margin

# Plugins that a test instance does not need. NRI is off because its socket is machine-wide
# (/var/run/nri/nri.sock) and would clash with another containerd; the others only slow start-up
# down or log errors on this machine.
DISABLED_PLUGINS = [
    "io.containerd.nri.v1.nri",
    "io.containerd.internal.v1.opt",  # would create /opt/containerd
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.blockfile",
    "io.containerd.snapshotter.v1.erofs",
    "io.containerd.differ.v1.erofs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
]


def prefix_dir() -> Path:
    """Where scripts/setup.sh installed containerd (``$KUASAR_PREFIX`` or ``<repo>/.prefix``)."""
    return Path(os.environ.get("KUASAR_PREFIX") or REPO_ROOT / ".prefix")


def containerd_binary() -> Path | None:
    """The containerd binary the harness would run, or None when it is not installed."""
    path = prefix_dir() / "bin" / "containerd"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def containerd_version(binary: Path | None = None) -> str | None:
    """``"2.1.9"`` for the given (default: the prefix's) containerd binary, or None."""
    binary = binary or containerd_binary()
    if binary is None:
        return None
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    fields = out.split()
    if len(fields) < 3:
        return None
    return fields[2].lstrip("v").split("+")[0].split("~")[0].split("-")[0]


def skip_reason() -> str | None:
    """Why a real-containerd test cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root"
    version = containerd_version()
    if version is None:
        return f"containerd not installed in {prefix_dir() / 'bin'} (run `make setup`)"
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return f"cannot parse containerd version {version!r}"
    if (major, minor) < (2, 1):
        return f"containerd {version} is older than 2.1"
    if shutil.which("runc") is None:
        return "runc not installed (run `make setup`)"
    return None


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _table(name: str, items: Mapping[str, Any]) -> str:
    lines = [f"[{name}]"] + [f"  {_key(k)} = {_toml(v)}" for k, v in items.items()]
    return "\n".join(lines) + "\n"


def mounts_under(*dirs: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below any of ``dirs`` (from /proc/self/mountinfo), deepest first."""
    return mount_points_under(*dirs)


_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2


def unmount_all(*dirs: str | os.PathLike[str]) -> list[str]:
    """Lazily unmount everything mounted under ``dirs``; returns what is still mounted."""
    for _ in range(5):
        mounts = mounts_under(*dirs)
        if not mounts:
            return []
        for mnt in mounts:
            _libc.umount2(os.fsencode(mnt), MNT_DETACH)
    return mounts_under(*dirs)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


class ContainerdError(RuntimeError):
    pass


class ContainerdInstance:
    """A private containerd 2.x with CRI, CNI (bridge) and optional proxy sandboxers.

    Args:
        base_dir: directory for everything of this instance (created if missing).
        sandboxers: proxy sandbox plugins, ``{name: unix socket path}`` -> ``[proxy_plugins.<name>]``
            with ``type = 'sandbox'``.
        runtimes: extra/overriding CRI runtime handlers, ``{handler: {key: value}}`` (e.g.
            ``{"kuasar-wasm": {"runtime_type": "io.containerd.kuasar-wasm.v1", "sandboxer": "wasm",
            "io_type": "streaming"}}``). Always present unless overridden: ``kuasar-runc``
            (sandboxer ``runc``, no options table) and ``runc`` (stock shim, sandboxer
            ``podsandbox``).
        bridge / subnet: the CNI bridge and its subnet (pods see each other and the host only).
        extra_path: folders put in front of containerd's PATH (e.g. a ``containerd-shim-*-v1``).
        extra_config: raw TOML appended to config.toml.
        netns_mounts_under_state_dir: CRI creates pod netns under ``<state>`` instead of
            ``/var/run/netns`` (easier cleanup).
        start_timeout: seconds to wait for the gRPC socket to answer.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        sandboxers: Mapping[str, str | os.PathLike[str]] | None = None,
        runtimes: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        bridge: str = "kuasar-t0",
        subnet: str = "10.240.0.0/16",
        extra_path: Sequence[str | os.PathLike[str]] = (),
        extra_config: str = "",
        netns_mounts_under_state_dir: bool = True,
        pinned_sandbox_image: str = PAUSE_REF,
        start_timeout: float = 60.0,
        log_level: str = "debug",
    ) -> None:
        if len(bridge) > 15:
            raise ValueError(f"bridge name {bridge!r} longer than 15 characters")
        self.base_dir = Path(base_dir).resolve()
        self.sandboxers = {k: str(v) for k, v in (sandboxers or {}).items()}
        self.runtimes: dict[str, dict[str, Any]] = {
            "runc": {"runtime_type": "io.containerd.runc.v2", "sandboxer": "podsandbox"},
            "kuasar-runc": {"runtime_type": "io.containerd.kuasar-runc.v1", "sandboxer": "runc"},
        }
        for name, settings in (runtimes or {}).items():
            self.runtimes[name] = dict(settings)
        self.bridge = bridge
        self.subnet = subnet
        self.extra_path = [str(p) for p in extra_path]
        self.extra_config = extra_config
        self.netns_mounts_under_state_dir = netns_mounts_under_state_dir
        self.pinned_sandbox_image = pinned_sandbox_image
        self.start_timeout = start_timeout
        self.log_level = log_level

        self.prefix = prefix_dir()
        self.bin_dir = self.prefix / "bin"
        self.containerd_bin = self.bin_dir / "containerd"
        self.ctr_bin = self.bin_dir / "ctr"

        self.root_dir = self.base_dir / "root"
        self.state_dir = self.base_dir / "state"
        self.cni_conf_dir = self.base_dir / "cni" / "net.d"
        self.cni_data_dir = self.base_dir / "cni" / "ipam"
        self.config_path = self.base_dir / "config.toml"
        self.log_path = self.base_dir / "containerd.log"
        sock_dir = self.base_dir / "run"
        if len(str(sock_dir / "containerd.sock.ttrpc")) > SOCKET_PATH_MAX:
            sock_dir = Path("/run") / f"kuasar-test-{secrets.token_hex(4)}"
        self.sock_dir = sock_dir
        self.address = str(sock_dir / "containerd.sock")
        self.ttrpc_address = str(sock_dir / "containerd.sock.ttrpc")

        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._bridge_existed = False

    # ------------------------------------------------------------------------------------------
    # configuration
    # ------------------------------------------------------------------------------------------
    def cni_conflist(self) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": f"kuasar-test-{self.bridge}",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.subnet}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.cni_data_dir),
                    },
                }
            ],
        }

    def config_text(self) -> str:
        out = [
            "version = 3",
            f"root = {_toml(str(self.root_dir))}",
            f"state = {_toml(str(self.state_dir))}",
            f"disabled_plugins = {_toml(DISABLED_PLUGINS)}",
            "",
            _table("grpc", {"address": self.address}),
            _table("ttrpc", {"address": self.ttrpc_address}),
            _table("debug", {"level": self.log_level}),
            _table(
                "plugins.'io.containerd.cri.v1.runtime'",
                {
                    "restrict_oom_score_adj": True,  # no CAP_SYS_RESOURCE here (reference 10.2)
                    "netns_mounts_under_state_dir": self.netns_mounts_under_state_dir,
                },
            ),
            _table(
                "plugins.'io.containerd.cri.v1.runtime'.containerd",
                {"default_runtime_name": "runc"},
            ),
        ]
        for name, settings in self.runtimes.items():
            # No `.options` sub-table for proxy-sandboxer runtimes (reference 10.2): keys only.
            table = f"plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{_key(name)}"
            out.append(_table(table, settings))
        out += [
            _table(
                "plugins.'io.containerd.cri.v1.runtime'.cni",
                {"bin_dirs": ["/usr/lib/cni"], "conf_dir": str(self.cni_conf_dir), "max_conf_num": 1},
            ),
            _table("plugins.'io.containerd.cri.v1.images'", {"snapshotter": "overlayfs"}),
            _table(
                "plugins.'io.containerd.cri.v1.images'.pinned_images",
                {"sandbox": self.pinned_sandbox_image},
            ),
            _table(
                "plugins.'io.containerd.grpc.v1.cri'",
                {"stream_server_address": "127.0.0.1", "stream_server_port": "0"},
            ),
        ]
        for name, sock in self.sandboxers.items():
            out.append(_table(f"proxy_plugins.{_key(name)}", {"type": "sandbox", "address": sock}))
        if self.extra_config:
            out.append(self.extra_config.rstrip() + "\n")
        return "\n".join(out)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTAINERD_", "NOTIFY_SOCKET"))}
        path = [*self.extra_path, str(self.bin_dir), env.get("PATH", ""), "/usr/local/sbin:/usr/local/bin",
                "/usr/sbin:/usr/bin:/sbin:/bin"]
        env["PATH"] = ":".join(p for p in path if p)
        return env

    # ------------------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------------------
    def start(self) -> ContainerdInstance:
        if self.proc is not None:
            raise ContainerdError("already started")
        command = self.prepare()
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.env(),
            cwd=str(self.base_dir),
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def prepare(self) -> list[str]:
        """Write the config, CNI config and directories; the command that runs containerd on them."""
        if not self.containerd_bin.exists():
            raise ContainerdError(f"{self.containerd_bin} missing: run `make setup`")
        for d in (self.root_dir, self.state_dir, self.cni_conf_dir, self.cni_data_dir, self.sock_dir):
            d.mkdir(parents=True, exist_ok=True)
        (self.cni_conf_dir / "10-kuasar-test.conflist").write_text(json.dumps(self.cni_conflist(), indent=2))
        self.config_path.write_text(self.config_text())
        self._bridge_existed = Path(f"/sys/class/net/{self.bridge}").exists()
        return [str(self.containerd_bin), "--config", str(self.config_path)]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ContainerdError(f"containerd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if os.path.exists(self.address):
                res = self.ctr("version", namespace=None, check=False, timeout=10)
                if res.returncode == 0:
                    return
                last = res.stderr
            time.sleep(0.1)
        raise ContainerdError(f"containerd did not answer on {self.address}: {last}\n{self.log_tail()}")

    def __enter__(self) -> ContainerdInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, *, timeout: float = 15.0, cleanup: bool = True, remove_dirs: bool = True) -> None:
        """Stop containerd (SIGTERM, then SIGKILL) and clean up what it left behind.

        With ``cleanup``: running tasks are killed through ctr first (while containerd is up),
        then leftover shims of this instance and runc containers whose bundle is under our state
        are killed, mounts under our dirs are detached, and the CNI bridge is removed if this
        instance created it. With ``remove_dirs`` the instance's directories are deleted too.
        """
        try:
            if self.proc is not None:
                if cleanup and self.running():
                    self._best_effort(self._kill_tasks)
                self.terminate(timeout=timeout)
            if cleanup:
                self._best_effort(self._kill_leftover_shims)
                self._best_effort(self._kill_leftover_runc_containers)
                unmount_all(self.root_dir, self.state_dir, self.sock_dir)
                if not self._bridge_existed and Path(f"/sys/class/net/{self.bridge}").exists():
                    subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
                if remove_dirs:
                    self._remove_dirs()
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def _best_effort(self, step: Any) -> None:
        try:
            step()
        except Exception as exc:  # cleanup goes on; the reason lands in our log
            with contextlib.suppress(OSError), open(self.log_path, "a") as log:
                log.write(f"harness: cleanup step {step.__name__} failed: {exc!r}\n")

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM containerd, SIGKILL after ``timeout``; no cleanup (for restart tests)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        code = self.proc.returncode
        self.proc = None
        return code

    def restart(self) -> ContainerdInstance:
        """Stop containerd without any cleanup and start it again with the same config."""
        self.terminate()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        existed = self._bridge_existed
        self.start()
        self._bridge_existed = existed
        return self

    def _kill_tasks(self) -> None:
        for ns in self.namespaces():
            res = self.ctr("tasks", "ls", "-q", namespace=ns, check=False, timeout=20)
            for task in res.stdout.split():
                self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", task, namespace=ns, check=False, timeout=20)
            deadline = time.monotonic() + 10
            for task in res.stdout.split():
                while time.monotonic() < deadline:
                    res_del = self.ctr("tasks", "delete", "-f", task, namespace=ns, check=False, timeout=20)
                    if res_del.returncode == 0:
                        break
                    time.sleep(0.2)

    def _kill_leftover_shims(self) -> None:
        mine = []
        for pid in _pids():
            args = _cmdline(pid)
            if args and "containerd-shim" in os.path.basename(args[0]) and "-address" in args:
                i = args.index("-address")
                if i + 1 < len(args) and args[i + 1] in (self.address, f"unix://{self.address}"):
                    mine.append(pid)
        for pid in mine:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _kill_leftover_runc_containers(self) -> None:
        base = Path("/run/containerd/runc")
        if not base.is_dir() or shutil.which("runc") is None:
            return
        state = str(self.state_dir) + "/"
        for root in base.iterdir():
            res = subprocess.run(["runc", "--root", str(root), "list", "-f", "json"],
                                 capture_output=True, text=True, check=False, timeout=20)
            try:
                containers = json.loads(res.stdout or "null") or []
            except json.JSONDecodeError:
                continue
            for c in containers:
                if str(c.get("bundle", "")).startswith(state):
                    for cmd in (["kill", "--all", c["id"], "KILL"], ["delete", "--force", c["id"]]):
                        subprocess.run(["runc", "--root", str(root), *cmd], capture_output=True, check=False,
                                       timeout=20)

    def _remove_dirs(self) -> None:
        still = mounts_under(self.base_dir, self.sock_dir)
        if still:
            raise ContainerdError(f"still mounted, not removing {self.base_dir}: {still}")
        for d in (self.root_dir, self.state_dir, self.base_dir / "cni", self.sock_dir):
            shutil.rmtree(d, ignore_errors=True)
        for f in (self.config_path,):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()

    # ------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------
    def ctr(
        self,
        *args: str,
        namespace: str | None = DEFAULT_NAMESPACE,
        check: bool = True,
        timeout: float = 120.0,
        input: str | None = None,  # noqa: A002 - mirrors subprocess.run
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address <sock> [-n <namespace>] args...`` and return the completed process."""
        cmd = [str(self.ctr_bin), "--address", self.address]
        if namespace:
            cmd += ["-n", namespace]
        cmd += [str(a) for a in args]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input,
                                 env=self.env(), check=False)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            res = subprocess.CompletedProcess(cmd, -9, out, f"timed out after {timeout}s")
        if check and res.returncode != 0:
            raise ContainerdError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def import_image(self, tarball: str | os.PathLike[str], namespace: str = DEFAULT_NAMESPACE,
                     platform: str = "linux/amd64") -> str:
        """``ctr images import --platform <platform> <tarball>`` into ``namespace``; returns its output."""
        return self.ctr("images", "import", "--platform", platform, os.fspath(tarball),
                        namespace=namespace, timeout=300).stdout

    def images(self, namespace: str = DEFAULT_NAMESPACE) -> list[str]:
        return self.ctr("images", "ls", "-q", namespace=namespace).stdout.split()

    def namespaces(self) -> list[str]:
        res = self.ctr("namespaces", "ls", "-q", namespace=None, check=False, timeout=20)
        return res.stdout.split() if res.returncode == 0 else []

    def plugins(self) -> list[dict[str, str]]:
        """``ctr plugins ls`` as rows ``{"type", "id", "platforms", "status"}``."""
        rows = []
        for line in self.ctr("plugins", "ls", namespace=None).stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3:
                rows.append({"type": fields[0], "id": fields[1],
                             "platforms": " ".join(fields[2:-1]), "status": fields[-1]})
        return rows

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __repr__(self) -> str:
        return f"ContainerdInstance(address={self.address!r}, pid={self.pid})"
