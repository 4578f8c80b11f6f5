"""The floor: raw `runc run -d` + `runc delete -f` of the same busybox bundle, no containerd at all.

Runs as its own process (``python -m benchmarks.floor``) because it makes itself a child subreaper:
a detached container's init is orphaned when `runc run -d` returns, and this way it is reaped here
after `runc delete -f` instead of depending on the machine's PID 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kuasar.common import linux
from tests.support import images

from .pods import WORKLOAD

FLOOR_KEYS = ("run_ms", "delete_ms", "create_ms", "start_ms")


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


class FloorRounds:
    """Rounds of the floor on one prepared bundle: each a timed `run -d` + `delete -f`, then the two-step
    `create` + `start` that a shim has to do (for reference), deleted untimed."""

    def __init__(self, workdir: Path) -> None:
        self.bundle, self.root = workdir / "bundle", workdir / "runc-root"
        prepare_bundle(self.bundle)
        self.root.mkdir(mode=0o700)
        self.prefix = f"kuasar-floor-{secrets.token_hex(3)}"
        self.rounds = 0
        self.live: set[str] = set()

    def round(self) -> dict[str, float]:
        name = f"{self.prefix}-{self.rounds}"
        self.rounds += 1
        times: dict[str, float] = {}
        self.live.add(name)
        times["run_ms"] = _timed(self.root, "run", "--detach", "--bundle", str(self.bundle), name)
        times["delete_ms"] = _timed(self.root, "delete", "--force", name)
        self.live.add(f"{name}-2")
        times["create_ms"] = _timed(self.root, "create", "--bundle", str(self.bundle), f"{name}-2")
        times["start_ms"] = _timed(self.root, "start", f"{name}-2")
        _runc(self.root, "delete", "--force", f"{name}-2")
        self.live -= {name, f"{name}-2"}
        _reap()
        return times

    def close(self) -> None:
        for name in self.live:
            subprocess.run(["runc", "--root", str(self.root), "delete", "--force", name], capture_output=True,
                           check=False)
        _reap()


def measure(count: int, workdir: Path) -> dict[str, list[float]]:
    """`count` rounds (see FloorRounds), their times by step."""
    rounds = FloorRounds(workdir)
    result: dict[str, list[float]] = {key: [] for key in FLOOR_KEYS}
    try:
        for _ in range(count):
            for key, value in rounds.round().items():
                result[key].append(value)
    finally:
        rounds.close()
    return result


def serve(warmup: int, workdir: Path) -> None:
    """One round per line read from stdin, its times as a JSON line on stdout, until end of input: the
    floor measured between the serial pods, under the same machine conditions as they are."""
    measure(warmup, workdir / "warmup")
    rounds = FloorRounds(workdir / "measured")
    try:
        print(READY, flush=True)  # the bundle is made and warmed up: nothing of that overlaps a pod
        for _ in sys.stdin:
            print(json.dumps(rounds.round()), flush=True)
    finally:
        rounds.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--serve", action="store_true", help="a round per line of stdin (see serve)")
    args = parser.parse_args(argv)
    linux.set_child_subreaper()
    workdir = Path(tempfile.mkdtemp(prefix="kuasar-floor-"))
    try:
        if args.serve:
            # Stopped by its parent: end through the finally clauses, which delete the containers.
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
            serve(args.warmup, workdir)
            return 0
        measure(args.warmup, workdir / "warmup")
        result = measure(args.count, workdir / "measured")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    json.dump(result, sys.stdout)
    return 0


REPO = Path(__file__).resolve().parents[1]
# A round is four runc commands; one that takes this long is stuck.
ROUND_TIMEOUT = 60.0
# Preparing the bundle (extracting busybox) and the warm-up rounds.
READY_TIMEOUT = 120.0
READY = "ready"


def run_floor(count: int, warmup: int) -> dict[str, list[float]]:
    """Run `main` in a fresh interpreter (see the module docstring) and return its numbers."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.floor", "--count", str(count), "--warmup",
                           str(warmup)], cwd=REPO, capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"floor benchmark failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


class InterleavedFloor:
    """`serve` in a fresh interpreter, asked for one round at a time (between the serial pods)."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self.times: dict[str, list[float]] = {key: [] for key in FLOOR_KEYS}

    async def start(self, warmup: int) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.floor", "--serve", "--warmup", str(warmup), cwd=REPO,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), READY_TIMEOUT)
        if line.strip() != READY.encode():
            raise RuntimeError(f"floor benchmark did not start ({await self._proc.wait()})")

    async def round(self, record: bool = True) -> None:
        assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(b"round\n")
        line = await asyncio.wait_for(self._proc.stdout.readline(), ROUND_TIMEOUT)
        if not line:
            raise RuntimeError(f"floor benchmark ended ({await self._proc.wait()}) before its round")
        if record:
            for key, value in json.loads(line).items():
                self.times[key].append(value)

    async def close(self) -> None:
        if self._proc is None:
            return
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        # End of input ends it; SIGTERM still deletes its containers; SIGKILL only if that hangs too.
        for stop in (None, self._proc.terminate, self._proc.kill):
            if stop is not None:
                with contextlib.suppress(ProcessLookupError):
                    stop()
            try:
                await asyncio.wait_for(self._proc.wait(), ROUND_TIMEOUT)
                return
            except TimeoutError:
                continue


if __name__ == "__main__":
    sys.exit(main())
