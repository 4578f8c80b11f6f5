"""A failed `Controller.Update` of a Quark sandbox's `extensions.tasks`: the controller restores the
sandbox's record as it was, so whatever the failed layout mounted must be gone too (real bind mounts
under tmp; root only)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.config import DaemonConfig
from kuasar.common.controller import SandboxController, new_record
from kuasar.common.errors import InvalidArgument
from kuasar.common.sandboxer import SandboxRecord
from kuasar.quark import quark_containers
from kuasar.quark.config import QuarkConfig
from kuasar.quark.quark_sandboxer import QuarkSandboxer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bind mounts)")


class Pod:
    """A Quark sandbox record behind a controller, and a host directory of images, volumes and FIFOs."""

    def __init__(self, tmp_path: Path) -> None:
        config = DaemonConfig(listen=tmp_path / "q.sock", dir=tmp_path / "q")
        config.dir.mkdir()
        self.sandboxer = QuarkSandboxer(config, QuarkConfig(quark="/bin/true"))
        self.controller = SandboxController(self.sandboxer, config.dir / "sandboxes")
        self.record = new_record("pod1", "quark", "", cri.PodSandboxConfig().SerializeToString(), {}, {}, {})
        self.controller.records[self.record.id] = self.record
        self.host = tmp_path
        (tmp_path / "image" / "etc").mkdir(parents=True)
        (tmp_path / "volume").mkdir()

    @property
    def bundle(self) -> Path:
        return self.sandboxer.base(self.record) / "sandbox"

    def fifo(self, name: str) -> str:
        path = self.host / name
        os.mkfifo(path)
        return str(path)

    def container(self, cid: str, volume: str = "volume", processes: list[dict[str, Any]] | None = None,
                  options: list[str] | None = None) -> dict[str, Any]:
        return {"task_id": cid, "rootfs": [{"type": "bind", "source": str(self.host / "image"), "options": ["rbind"]}],
                "spec": {"mounts": [{"destination": "/data", "type": "bind", "source": str(self.host / volume),
                                     "options": options or ["rbind"]}]},
                "processes": processes or []}

    def update(self, *tasks: dict[str, Any]) -> None:
        def apply(record: SandboxRecord) -> None:
            record.extra.setdefault("extensions", {})["tasks"] = json.dumps({"tasks": list(tasks)})

        asyncio.run(self.controller.update(self.record.id, apply, ["extensions.tasks"]))

    def recorded(self) -> dict[str, Any]:
        return self.record.extra.get("quark", {}).get("containers", {})

    def mounted(self) -> list[Path]:
        return quark_containers.mounts_under(self.bundle)


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[Pod]:
    made = Pod(tmp_path)
    try:
        yield made
    finally:
        quark_containers.unmount_all_under(tmp_path)


def refused(update: Callable[[], None]) -> None:
    with pytest.raises(InvalidArgument, match="bind source"):
        update()


def test_a_failed_update_leaves_no_new_container_mounted(pod: Pod) -> None:
    # The rootfs was mounted, the volume's bind failed, and the controller restored the record without the
    # container: its rootfs stayed mounted with nothing left that would ever unmount it.
    refused(lambda: pod.update(pod.container("c1", volume="no-such-volume")))
    assert pod.recorded() == {} and pod.mounted() == []
    assert not (pod.bundle / "c1").exists()


def test_a_failed_update_undoes_the_containers_it_laid_out_before_the_failure(pod: Pod) -> None:
    # c1 was laid out in full before c2 failed; the restored record named neither.
    refused(lambda: pod.update(pod.container("c1"), pod.container("c2", volume="no-such-volume")))
    assert pod.recorded() == {} and pod.mounted() == []


def test_a_failed_update_undoes_the_execs_it_added_and_removes_nothing(pod: Pod) -> None:
    # An exec's FIFO bound, the next exec's missing: the first stayed mounted, unrecorded; and a container
    # the same Update dropped was already unmounted while the restored record still named it.
    pod.update(pod.container("c1"), pod.container("gone"))
    before = sorted(pod.mounted())
    e1 = {"exec_id": "e1", "stdout": pod.fifo("e1-stdout")}
    e2 = {"exec_id": "e2", "stdout": str(pod.host / "no-such-fifo")}
    refused(lambda: pod.update(pod.container("c1", processes=[e1, e2])))
    assert sorted(pod.mounted()) == before
    assert set(pod.recorded()) == {"c1", "gone"} and pod.recorded()["c1"]["execs"] == {}
    assert not (pod.bundle / "c1" / "e1-stdout").exists()
    # and the next Update that drops everything unmounts everything
    pod.update()
    assert pod.recorded() == {} and pod.mounted() == []


def test_a_read_only_volume_is_bound_read_only(pod: Pod) -> None:
    # The bind left the spec with its `ro`, and came out writable inside the sandbox.
    pod.update(pod.container("ro", options=["rbind", "ro"]), pod.container("rw"))
    assert os.statvfs(pod.bundle / "ro" / "rootfs" / "data").f_flag & os.ST_RDONLY
    assert not os.statvfs(pod.bundle / "rw" / "rootfs" / "data").f_flag & os.ST_RDONLY
    assert not os.statvfs(pod.host / "volume").f_flag & os.ST_RDONLY  # the host's own stays as it was
