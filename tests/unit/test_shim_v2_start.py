"""The v2 shim's `start` (containerd 1.6): a sandbox it made is removed again when it cannot finish,
since containerd then only deletes the bundle and never runs the shim's `delete`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kuasar.common import shim_v2


class Calls:
    """Stands in for the Sandbox API: records each call; `Start` answers `address` or fails."""

    def __init__(self, address: str = "", start_fails: bool = False, exists: bool = False) -> None:
        self.address, self.start_fails, self.exists = address, start_fails, exists
        self.made: list[str] = []

    def __call__(self, method: str, request: Any) -> Any:
        self.made.append(method)
        if method == "Status":
            raise _rpc_error(shim_v2.grpc.StatusCode.NOT_FOUND)
        if method == "Create" and self.exists:
            raise _rpc_error(shim_v2.grpc.StatusCode.ALREADY_EXISTS)
        if method == "Start":
            if self.start_fails:
                raise shim_v2.ShimError("the pod did not start")
            return SimpleNamespace(address=self.address)
        return SimpleNamespace()


def _rpc_error(code: Any) -> Exception:
    error = shim_v2.grpc.RpcError()
    error.code = lambda: code  # type: ignore[attr-defined]
    return error


def _start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: Calls, kind: str = "runc",
           sandbox_id: str = "") -> str:
    bundle = tmp_path / "c1"
    bundle.mkdir()
    annotations = {shim_v2.SANDBOX_ID_ANNOTATION: sandbox_id} if sandbox_id else {}
    (bundle / "config.json").write_text(json.dumps({"linux": {"namespaces": [{"type": "pid"}]},
                                                    "annotations": annotations}))
    monkeypatch.chdir(bundle)
    monkeypatch.setattr(shim_v2.Sandboxer, "call", lambda self, method, request, timeout=None: calls(method, request))
    return shim_v2.start(argparse.Namespace(id="c1", namespace="default"), kind, str(tmp_path / "sb.sock"))


def test_a_sandbox_whose_address_containerd_16_cannot_dial_is_removed(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # containerd-shim-kuasar-vmm-v2 booted a VM, refused its hvsock address and left the VM running.
    calls = Calls(address="hvsock:///run/kuasar-vmm/c1/vsock.sock:1024")
    with pytest.raises(shim_v2.ShimError, match="not a unix socket"):
        _start(tmp_path, monkeypatch, calls, "vmm")
    assert calls.made == ["Status", "Create", "Start", "Stop", "Shutdown"]
    assert not (tmp_path / "c1" / shim_v2.ADDRESS_FILE).exists()


def test_a_sandbox_made_here_whose_start_fails_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(start_fails=True)
    with pytest.raises(shim_v2.ShimError):
        _start(tmp_path, monkeypatch, calls)
    assert calls.made == ["Status", "Create", "Start", "Stop", "Shutdown"]


def test_a_sandbox_another_start_made_is_not_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(start_fails=True, exists=True)
    with pytest.raises(shim_v2.ShimError):
        _start(tmp_path, monkeypatch, calls)
    assert calls.made == ["Status", "Create", "Start"]


def test_a_started_sandbox_is_written_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(address="ttrpc+unix:///run/kuasar/task.sock")
    assert _start(tmp_path, monkeypatch, calls) == "unix:///run/kuasar/task.sock"
    assert (tmp_path / "c1" / shim_v2.ADDRESS_FILE).read_text() == "unix:///run/kuasar/task.sock"
    assert "Shutdown" not in calls.made


def test_a_pod_container_never_makes_its_missing_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # containerd 1.6 tearing a pod down (its pause task deleted, so the sandbox removed) while a
    # StartContainer of the same pod runs: a sandbox made again here would belong to nobody.
    calls = Calls(address="ttrpc+unix:///run/kuasar/task.sock")
    with pytest.raises(shim_v2.ShimError, match="sandbox pod1 is gone; containers cannot join it"):
        _start(tmp_path, monkeypatch, calls, sandbox_id="pod1")
    assert calls.made == ["Status"]
    assert not (tmp_path / "c1" / shim_v2.SHIM_STATE).exists()


def test_the_shim_config_gives_the_address_and_a_bad_one_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "shim.toml"
    env = {shim_v2.CONFIG_ENV: str(config)}
    config.write_text('[runc]\nsandboxer_address = "unix:///run/x.sock"\n')
    assert shim_v2.sandboxer_address("runc", env, "/usr/bin/x") == "/run/x.sock"
    assert shim_v2.sandboxer_address("wasm", env, "/usr/bin/x") == shim_v2.default_address("wasm")
    # A traceback (UnicodeDecodeError is no OSError) became containerd 1.6's start error; a number was
    # taken for a socket path ("unix://5").
    for raw, message in ((b"\xff[runc]", "is not UTF-8"), (b"[runc]\nsandboxer_address = 5\n", "must be a string")):
        config.write_bytes(raw)
        with pytest.raises(shim_v2.ShimError, match=message):
            shim_v2.sandboxer_address("runc", env, "/usr/bin/x")
