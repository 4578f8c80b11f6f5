"""`containerd-shim-kuasar-<type>-v1 -info` (and the v2 shim's): what containerd 2.x reads before it creates
a task with id-mapped mounts (core/runtime/v2 TaskManager.PluginInfo and validateRuntimeFeatures)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from kuasar.common import runtime_info, shim_helper, shim_v2
from kuasar.common.api.containerd.types import introspection_pb2 as introspection

FEATURES = {"ociVersionMin": "1.0.0", "linux": {"mountExtensions": {"idmap": {"enabled": True}}}}


def fake_runc(tmp_path: Path, body: str) -> str:
    runc = tmp_path / "runc"
    runc.write_text(f"#!/bin/sh\n{body}\n")
    runc.chmod(0o755)
    return str(runc)


def run_main(monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes], main, program: str,
             stdin: bytes) -> tuple[int, bytes, bytes]:
    monkeypatch.setattr(sys, "argv", [program])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = main(["-info"])
    out, err = capsysbinary.readouterr()
    return code, out, err


def test_runc_type_reports_runc_features_and_echoes_the_options(tmp_path: Path) -> None:
    runc = fake_runc(tmp_path, f"[ \"$1\" = features ] && echo '{json.dumps(FEATURES)}'")
    options = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=b"\x0a\x01x")
    info = runtime_info.runtime_info("runc", options.SerializeToString(), runc=runc)
    assert info.name == "io.containerd.kuasar-runc.v1" and info.version.version
    assert info.options == options
    # containerd's typeurl decodes this URL as runtime-spec features.Features, from JSON
    assert info.features.type_url == "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
    assert json.loads(info.features.value) == FEATURES


def test_a_runc_without_features_gives_info_without_features(tmp_path: Path) -> None:
    # as containerd's runc shim: containerd then refuses the id-mapped task with its own message
    for body in ("echo 'No help topic for features' >&2; exit 1", "echo not-json", "echo '[1]'"):
        info = runtime_info.runtime_info("runc", b"", runc=fake_runc(tmp_path, body))
        assert not info.HasField("features") and info.name == "io.containerd.kuasar-runc.v1"
    assert not runtime_info.runtime_info("runc", b"", runc=str(tmp_path / "missing")).HasField("features")


def test_types_that_run_no_runc_report_no_features(tmp_path: Path) -> None:
    runc = fake_runc(tmp_path, f"echo '{json.dumps(FEATURES)}'")
    for kind in ("wasm", "vmm", "quark"):
        info = runtime_info.runtime_info(kind, b"", runc=runc)
        assert info.name == f"io.containerd.kuasar-{kind}.v1" and not info.HasField("features")


def test_garbage_options_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(runtime_info.InfoError, match="not a protobuf Any"):
        runtime_info.runtime_info("runc", b"\xff\xff\xff", runc=fake_runc(tmp_path, "exit 1"))


def test_v1_helper_prints_the_info_named_after_its_program(monkeypatch: pytest.MonkeyPatch, capsysbinary) -> None:
    code, out, _ = run_main(monkeypatch, capsysbinary, shim_helper.main, "/usr/bin/containerd-shim-kuasar-wasm-v1",
                            b"")
    assert code == 0
    assert introspection.RuntimeInfo.FromString(out).name == "io.containerd.kuasar-wasm.v1"
    code, out, err = run_main(monkeypatch, capsysbinary, shim_helper.main, "some-helper", b"")
    assert code == 2 and out == b"" and b"cannot tell the sandbox type" in err
    code, out, err = run_main(monkeypatch, capsysbinary, shim_helper.main, "containerd-shim-kuasar-runc-v1",
                              b"\xff\xff")
    assert code == 1 and out == b"" and b"not a protobuf Any" in err


def test_v2_shim_prints_the_info_too(monkeypatch: pytest.MonkeyPatch, capsysbinary) -> None:
    monkeypatch.delenv(shim_v2.TYPE_ENV, raising=False)
    code, out, _ = run_main(monkeypatch, capsysbinary, shim_v2.main, "containerd-shim-kuasar-vmm-v2", b"")
    assert code == 0 and introspection.RuntimeInfo.FromString(out).name == "io.containerd.kuasar-vmm.v2"


def test_the_runc_is_the_one_runc_sandboxer_is_configured_with(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # containerd's idmap check must see the features of the runc that will run the container.
    monkeypatch.setattr(runtime_info, "Path", _without_system_config(tmp_path))
    helper = tmp_path / "prefix" / "bin" / "containerd-shim-kuasar-runc-v1"
    config = tmp_path / "prefix" / "etc" / "kuasar" / "runc.toml"
    config.parent.mkdir(parents=True)
    assert runtime_info.configured_runc(str(helper)) == "runc"  # no config: runc-sandboxer's default
    config.write_text('[runc]\nbinary = "/opt/runc/runc"\n')
    assert runtime_info.configured_runc(str(helper)) == "/opt/runc/runc"
    config.write_text("[runc\n")  # broken: PATH's runc, with a warning
    assert runtime_info.configured_runc(str(helper)) == "runc"


def _without_system_config(tmp_path: Path):
    """Path, with /etc/kuasar/runc.toml (which a machine may have) moved into `tmp_path`."""

    def make(*parts: object) -> Path:
        path = Path(*parts)
        return tmp_path / "no-etc" / "runc.toml" if str(path) == "/etc/kuasar/runc.toml" else path

    return make
