"""The events namespace of a task whose caller sends no namespace metadata (containerd 1.6)."""

from pathlib import Path

from kuasar.common.host_runc_tasks import bundle_namespace


def test_namespace_comes_from_containerds_bundle_layout() -> None:
    state = Path("/run/containerd/io.containerd.runtime.v2.task")
    assert bundle_namespace(state / "default" / "hello") == "default"
    assert bundle_namespace(state / "k8s.io" / ("a" * 64)) == "k8s.io"


def test_other_layouts_fall_back_to_the_cri_namespace() -> None:
    assert bundle_namespace(Path("/tmp/bundle")) == "k8s.io"
