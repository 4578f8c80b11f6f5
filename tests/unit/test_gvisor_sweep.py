"""What a fresh gVisor task server finds in its runsc root, and the order it deletes it in."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from kuasar.common.reaper import Reaper
from kuasar.quark.gvisor_tasks import GvisorTasks
from kuasar.quark.runsc import Leftover, Runsc


def fake_runsc(tmp_path: Path, listed: list[dict]) -> Path:
    """A `runsc` whose `list --format=json` prints `listed`."""
    path = tmp_path / "runsc"
    path.write_text(f"#!{sys.executable}\nimport sys\nassert 'list' in sys.argv and '--format=json' in sys.argv\n"
                    f"print({json.dumps(json.dumps(listed))})\n")
    path.chmod(0o755)
    return path


def test_leftovers_come_with_their_bundle_and_their_sandbox_from_runscs_state_file_names(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    # `<container>_sandbox:<sandbox>.state`, as runsc names them; c3's is missing: a sandbox of its own.
    for container, sandbox in (("pod1", "pod1"), ("c1", "pod1"), ("c2", "pod1"), ("pod2", "pod2")):
        (root / f"{container}_sandbox:{sandbox}.state").write_text("{}")
        (root / f"{container}_sandbox:{sandbox}.lock").write_text("")
    listed = [{"id": "c1", "bundle": "/b/c1"}, {"id": "pod1", "bundle": "/b/pod1"}, {"id": "c2"},
              {"id": "pod2", "bundle": "/b/pod2"}, {"id": "c3", "bundle": "/b/c3"}, {"no": "id"}]

    async def scenario() -> list[Leftover]:
        reaper = Reaper()
        reaper.install()
        return await Runsc(reaper, root, binary=str(fake_runsc(tmp_path, listed))).leftovers()

    assert asyncio.run(scenario()) == [
        Leftover("c1", "/b/c1", "pod1"), Leftover("pod1", "/b/pod1", "pod1"), Leftover("c2", "", "pod1"),
        Leftover("pod2", "/b/pod2", "pod2"), Leftover("c3", "/b/c3", "c3")]


def test_each_sandbox_goes_after_its_containers_and_sandboxes_go_side_by_side(tmp_path: Path) -> None:
    # Deleting a sandbox and its containers at once left runsc's lock files behind.
    left = [Leftover("pod1", "", "pod1"), Leftover("c1", "", "pod1"), Leftover("pod2", "", "pod2"),
            Leftover("c2", "", "pod2"), Leftover("c3", str(tmp_path / "c3"), "pod1")]
    (tmp_path / "c3" / "rootfs").mkdir(parents=True)  # not a mount point: unmounting it is a no-op
    steps: list[tuple[str, str]] = []
    passes = iter([left, []])

    class FakeRunsc:
        async def leftovers(self) -> list[Leftover]:
            return next(passes)

        async def delete(self, container_id: str, network: str) -> None:
            steps.append(("begin", container_id))
            await asyncio.sleep(0.01)
            steps.append(("end", container_id))

    tasks = GvisorTasks.__new__(GvisorTasks)  # only its runsc and its directory are used
    tasks.runsc = FakeRunsc()
    tasks.directory = tmp_path
    tasks._end_runtime_commands = lambda: asyncio.sleep(0)  # no runsc runs here (test_runtime_commands)
    asyncio.run(tasks.sweep_leftovers())
    order = [container_id for step, container_id in steps if step == "begin"]
    for sandbox, containers in (("pod1", ("c1", "c3")), ("pod2", ("c2",))):
        for container in containers:
            assert steps.index(("end", container)) < steps.index(("begin", sandbox))
    assert order[:2] in (["c1", "c2"], ["c3", "c2"]), "the two sandboxes' containers went at once"
    assert sorted(order) == ["c1", "c2", "c3", "pod1", "pod2"]


def test_a_deleted_sandboxs_stray_container_locks_go_and_nothing_else(tmp_path: Path) -> None:
    # Two containers of one sandbox deleted at once: the second `runsc delete` took the lock of the first
    # again after it was deleted, and the lock file outlived the pod (test_gvisor_cri's leftover check).
    root = tmp_path / "root"
    runsc = Runsc(Reaper(), root)
    files = {"gone_sandbox:pod.lock": "removed (no state)", "pod_sandbox:pod.lock": "removed (no state)",
             "kept_sandbox:pod.lock": "kept (its state is there)", "kept_sandbox:pod.state": "kept",
             "other_sandbox:pod2.lock": "kept (another sandbox)"}
    for name in files:
        (root / name).write_text("")
    runsc.forget_stray_locks("pod")
    assert sorted(p.name for p in root.iterdir()) == sorted(n for n, what in files.items() if what.startswith("kept"))
