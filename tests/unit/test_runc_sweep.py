"""The sweep a fresh runc task server makes of the containers a dead one left in its runc root."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

from kuasar.common.bounded import SWEEP_CONCURRENCY
from kuasar.common.runc_tasks import RuncContainerTasks


class CountingRunc:
    """Stands in for `Runc.delete`, which takes ~100 ms for a running container (runc polls for its
    killed init); counts how many deletes are under way at once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.deleted: list[str] = []
        self.under_way = 0
        self.most_at_once = 0

    async def delete(self, container_id: str) -> None:
        self.under_way += 1
        self.most_at_once = max(self.most_at_once, self.under_way)
        await asyncio.sleep(0.01)
        self.under_way -= 1
        self.deleted.append(container_id)


def _leftover(root: Path, name: str, state: dict) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "state.json").write_text(json.dumps(state))


def test_leftover_containers_are_deleted_many_at_a_time_and_only_ours(tmp_path: Path) -> None:
    # 200 leftovers one at a time took 21.7 s with real runc, past the 20 s a task server has to start.
    root = tmp_path / "runc"
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)  # not a mount point: unmounting it is a no-op
    count = SWEEP_CONCURRENCY * 3
    names = [f"c{index:03d}" for index in range(count)]
    for name in names:
        _leftover(root, name, {"config": {"labels": [f"bundle={bundle}"]}})
    _leftover(root, "not an id!", {})
    (root / "no-state").mkdir()
    runc = CountingRunc(root)
    tasks = SimpleNamespace(runc=runc, _end_runtime_commands=lambda: asyncio.sleep(0))  # no runc runs here
    asyncio.run(RuncContainerTasks.sweep_leftovers(tasks))  # type: ignore[arg-type]
    assert sorted(runc.deleted) == names
    assert runc.most_at_once == SWEEP_CONCURRENCY

