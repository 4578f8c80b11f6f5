"""Starting a created container through runc's exec FIFO (what `runc start` does), with real runc:
the container runs and runc sees it running; a spec with poststart hooks still goes through
`runc start`; an init that dies before it is started is an error, not a hang."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from kuasar.common.errors import FailedPrecondition
from kuasar.common.reaper import Reaper
from kuasar.common.runc_cli import EXEC_FIFO, Runc, Stdio
from tests.support import images

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def image_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0 or shutil.which("runc") is None:
        pytest.skip("needs root and runc")
    rootfs = tmp_path_factory.mktemp("image") / "rootfs"
    rootfs.mkdir()
    images.extract_busybox_rootfs(rootfs)
    return rootfs


def make_bundle(base: Path, rootfs: Path, hooks: dict | None = None) -> Path:
    bundle = base / "bundle"
    bundle.mkdir()
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["sleep", "3600"]
    spec["root"] = {"path": str(rootfs), "readonly": True}
    if hooks:
        spec["hooks"] = hooks
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


class Scenario:
    """One container in a runc root of its own, created and then started (or not) by the test."""

    def __init__(self, base: Path, rootfs: Path, hooks: dict | None = None) -> None:
        self.base = base
        self.bundle = make_bundle(base, rootfs, hooks)
        self.id = f"fifo-{base.name[-20:]}".replace("_", "-")
        self.commands: list[str] = []
        self.init_exited = asyncio.Event()

    async def create(self) -> tuple[Runc, int]:
        reaper = Reaper()
        reaper.install()
        runc = Runc(reaper, self.base / "root")
        original = runc._run

        async def spy(args: list[str], **kwargs):
            self.commands.append(args[0])
            return await original(args, **kwargs)

        runc._run = spy  # type: ignore[method-assign]
        pid_file = self.base / "init.pid"
        await runc.create(self.id, self.bundle, pid_file, self.base / "log.json", Stdio())
        return runc, int(pid_file.read_text())

    def status(self) -> str:
        out = subprocess.run(["runc", "--root", str(self.base / "root"), "state", self.id],
                             check=True, capture_output=True).stdout
        return json.loads(out)["status"]

    def delete(self) -> None:
        subprocess.run(["runc", "--root", str(self.base / "root"), "delete", "--force", self.id],
                       capture_output=True)


def test_start_reads_the_exec_fifo_instead_of_running_runc_start(tmp_path: Path, image_rootfs: Path) -> None:
    scenario = Scenario(tmp_path, image_rootfs)

    async def run() -> None:
        runc, pid = await scenario.create()
        assert scenario.status() == "created"
        assert (tmp_path / "root" / scenario.id / EXEC_FIFO).exists()
        await runc.start(scenario.id, scenario.bundle, tmp_path / "log.json", scenario.init_exited)
        assert scenario.commands == ["create"]
        assert not (tmp_path / "root" / scenario.id / EXEC_FIFO).exists()
        assert scenario.status() == "running"
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"

    try:
        asyncio.run(run())
    finally:
        scenario.delete()


def test_a_spec_with_poststart_hooks_is_started_by_runc_start(tmp_path: Path, image_rootfs: Path) -> None:
    marker = tmp_path / "hooked"
    hooks = {"poststart": [{"path": "/bin/sh", "args": ["sh", "-c", f"echo ran > {marker}"]}]}
    scenario = Scenario(tmp_path, image_rootfs, hooks)

    async def run() -> None:
        runc, _ = await scenario.create()
        await runc.start(scenario.id, scenario.bundle, tmp_path / "log.json", scenario.init_exited)
        assert scenario.commands == ["create", "start"]
        assert scenario.status() == "running"
        assert marker.read_text() == "ran\n"

    try:
        asyncio.run(run())
    finally:
        scenario.delete()


def test_an_init_that_dies_before_start_fails_the_start(tmp_path: Path, image_rootfs: Path) -> None:
    scenario = Scenario(tmp_path, image_rootfs)

    async def run() -> None:
        runc, pid = await scenario.create()
        os.kill(pid, signal.SIGKILL)  # killed from outside before anyone started it
        psutil.wait_procs([psutil.Process(pid)], timeout=10)
        starting = asyncio.create_task(
            runc.start(scenario.id, scenario.bundle, tmp_path / "log.json", scenario.init_exited))
        await asyncio.sleep(0.2)
        assert not starting.done()  # a FIFO whose writer never came is not readable: we wait for the exit
        scenario.init_exited.set()  # what the task server's reaper does when it reaps the init
        with pytest.raises(FailedPrecondition, match="exited before it was started"):
            await asyncio.wait_for(starting, 5)
        assert scenario.commands == ["create"]

    try:
        asyncio.run(run())
    finally:
        scenario.delete()
