"""The floor: raw `runc run -d` + `runc delete -f` of the same busybox bundle, no containerd at all.

Runs as its own process (``python -m benchmarks.floor``) because it makes itself a child subreaper:
a detached container's init is orphaned when `runc run -d` returns, and this way it is reaped here
after `runc delete -f` instead of depending on the machine's PID 1.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kuasar.common import linux
from tests.support import images

from .pods import WORKLOAD


def prepare_bundle(bundle: Path) -> None:
    """Extract the busybox image's layer as rootfs and write a `runc spec` adjusted to our workload:
    the same `sleep`, no terminal, and the host network (as the CRI pods use)."""
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True)
    images.extract_busybox_rootfs(rootfs)
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True, capture_output=True)
    config_path = bundle / "config.json"
    spec = json.loads(config_path.read_text())
    spec["process"]["args"] = list(WORKLOAD)
    spec["process"]["terminal"] = False
    spec["root"] = {"path": "rootfs", "readonly": True}
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    config_path.write_text(json.dumps(spec))


def _runc(root: Path, *args: str) -> None:
    # Not a pipe for stderr: a detached container inherits runc's stdio and would hold it open.
    with tempfile.TemporaryFile() as err:
        result = subprocess.run(["runc", "--root", str(root), *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, check=False)
        if result.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"runc {args[0]} failed: {err.read().decode(errors='replace').strip()}")


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def _timed(root: Path, *args: str) -> float:
    t0 = time.perf_counter()
    _runc(root, *args)
    return (time.perf_counter() - t0) * 1000.0


def measure(count: int, workdir: Path) -> dict[str, list[float]]:
    """`count` rounds of `run -d` (timed until runc returns: the container is running) + `delete -f`,
    each followed by the two-step `create` + `start` that a shim has to do, for reference."""
    bundle, root = workdir / "bundle", workdir / "runc-root"
    prepare_bundle(bundle)
    root.mkdir(mode=0o700)
    prefix = f"kuasar-floor-{secrets.token_hex(3)}"
    result: dict[str, list[float]] = {"run_ms": [], "delete_ms": [], "create_ms": [], "start_ms": []}
    live: set[str] = set()
    try:
        for i in range(count):
            name = f"{prefix}-{i}"
            live.add(name)
            result["run_ms"].append(_timed(root, "run", "--detach", "--bundle", str(bundle), name))
            result["delete_ms"].append(_timed(root, "delete", "--force", name))
            live.add(f"{name}-2")
            result["create_ms"].append(_timed(root, "create", "--bundle", str(bundle), f"{name}-2"))
            result["start_ms"].append(_timed(root, "start", f"{name}-2"))
            _runc(root, "delete", "--force", f"{name}-2")
            live -= {name, f"{name}-2"}
            _reap()
    finally:
        for name in live:
            subprocess.run(["runc", "--root", str(root), "delete", "--force", name], capture_output=True,
                           check=False)
        _reap()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    linux.set_child_subreaper()
    workdir = Path(tempfile.mkdtemp(prefix="kuasar-floor-"))
    try:
        measure(args.warmup, workdir / "warmup")
        result = measure(args.count, workdir / "measured")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    json.dump(result, sys.stdout)
    return 0


def run_floor(count: int, warmup: int) -> dict[str, list[float]]:
    """Run `main` in a fresh interpreter (see the module docstring) and return its numbers."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.floor", "--count", str(count), "--warmup",
                           str(warmup)], cwd=repo, capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"floor benchmark failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


if __name__ == "__main__":
    sys.exit(main())
