"""packaging/install.py (`make install` / `make uninstall`) on a fake dist/ in temporary trees: DESTDIR
handling, re-installs that fail or meet an administrator's edits, and what the manifest claims."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_install() -> ModuleType:
    # A file, not a package (and `packaging` would be the PyPI one): load it by path.
    spec = importlib.util.spec_from_file_location("kuasar_install", REPO / "packaging" / "install.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


install_py = load_install()
PROGRAMS = ["runc-sandboxer", "kuasar-ctl", "containerd-shim-kuasar-runc-v2"]


@pytest.fixture
def dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A dist/ as `make binaries` leaves it (tiny fake binaries); no pause program, no guest image."""
    directory = tmp_path / "dist"
    directory.mkdir()
    (directory / install_py.MULTICALL).write_bytes(b"\x7fELF fake multi-call binary")
    for program in PROGRAMS:
        os.link(directory / install_py.MULTICALL, directory / program)
    (directory / install_py.STAMP).write_text(json.dumps({"programs": PROGRAMS}))
    monkeypatch.setattr(install_py, "PAUSE", tmp_path / "no-pause")
    monkeypatch.setattr(install_py, "GUEST_DIR", tmp_path / "no-guest")
    return directory


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def manifest_of(layout: object) -> dict[str, object]:
    return json.loads(layout.real(layout.manifest).read_text())  # type: ignore[attr-defined]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("relative", [False, True])
def test_destdir_that_does_not_exist_yet_is_created_and_not_recorded(
        dist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relative: bool) -> None:
    # `--destdir /tmp/x/new` (missing) looped for ever in _mkdirs: walking up from a missing directory never
    # found one that exists, as DESTDIR + "/" did not either and Path("/").parent is "/" again.
    monkeypatch.chdir(tmp_path)
    destdir = Path("x/new") if relative else tmp_path / "x" / "new"
    layout = install_py.Layout("/usr/local", str(destdir))
    assert layout.destdir == tmp_path / "x" / "new"  # a relative DESTDIR is made absolute first
    install_py.install(layout, dist)
    staged = tmp_path / "x/new/usr/local"
    assert (staged / "bin/runc-sandboxer").is_file() and (staged / "etc/kuasar/runc.toml").is_file()
    paths = [e["path"] for e in manifest_of(layout)["entries"]]
    assert "/" not in paths and all(p.startswith("/usr") for p in paths)  # DESTDIR itself is not ours

    monkeypatch.chdir("/")  # the same tree from anywhere
    install_py.uninstall(install_py.Layout("/usr/local", str(tmp_path / "x" / "new")), quiet=True)
    assert tree(tmp_path / "x") == {"new"}


@pytest.mark.parametrize("break_it", ["no binaries", "a config source missing"])
def test_failed_reinstall_keeps_the_existing_install(
        dist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, break_it: str) -> None:
    # install() uninstalled the previous install before finding out that dist/ had no binaries: a failed
    # `make install` left the machine with nothing installed.
    layout = install_py.Layout(str(tmp_path / "prefix"))
    install_py.install(layout, dist)
    before = tree(tmp_path / "prefix")
    if break_it == "no binaries":
        shutil.rmtree(dist)
        dist.mkdir()
        failure: type[BaseException] = SystemExit
    else:
        sources = tmp_path / "sources"
        shutil.copytree(install_py.HERE, sources)
        (sources / "config" / "vmm.toml").unlink()
        monkeypatch.setattr(install_py, "HERE", sources)
        failure = OSError
    with pytest.raises(failure):
        install_py.install(layout, dist)
    assert tree(tmp_path / "prefix") == before
    assert (tmp_path / "prefix/bin/runc-sandboxer").is_file() and manifest_of(layout)["programs"] == PROGRAMS


def test_reinstall_keeps_an_edited_unit_and_writes_ours_beside(
        dist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An edited unit is kept by the uninstall a re-install starts with (changed since install), and then the
    # install wrote the shipped unit over it: the administrator's change was silently lost.
    prefix = tmp_path / "prefix"
    argv = ["--prefix", str(prefix), "--dist", str(dist)]
    assert install_py.main(["install", *argv]) == 0
    unit = prefix / "lib/systemd/system/kuasar-runc.service"
    shipped = unit.read_text()
    unit.write_text(shipped.replace("RestartSec=2s", "RestartSec=7s"))
    capsys.readouterr()

    assert install_py.main(["install", *argv]) == 0
    assert "RestartSec=7s" in unit.read_text()
    beside = unit.with_name(unit.name + install_py.NEW_SUFFIX)
    assert beside.read_text() == shipped  # ours, for the administrator to compare
    assert f"kept the existing {unit}" in capsys.readouterr().out

    # Uninstall leaves the administrator's unit alone and removes ours (in the manifest, unchanged).
    assert install_py.main(["uninstall", "--prefix", str(prefix)]) == 0
    assert "RestartSec=7s" in unit.read_text() and not beside.exists()


def test_destdir_manifest_never_claims_the_targets_system_dirs(dist: Path, tmp_path: Path) -> None:
    # A DESTDIR starts empty, so every directory on the way (/usr, /usr/local/bin, lib/systemd/system, ...)
    # was recorded as created: an uninstall on the target removed the system's own directories when empty.
    target = tmp_path / "target"
    prefix = target / "usr/local"
    for shared in ("bin", "etc", "lib/systemd/system", "share"):
        (prefix / shared).mkdir(parents=True)  # the target system's, there before the package
    before = tree(target)
    stage = tmp_path / "stage"
    stage.mkdir()
    layout = install_py.Layout(str(prefix), str(stage))
    install_py.install(layout, dist)
    owned = [e["path"] for e in manifest_of(layout)["entries"] if e["type"] == "dir"]
    assert sorted(owned) == [f"{prefix}/etc/kuasar", f"{prefix}/lib/kuasar", f"{prefix}/share/kuasar"]

    # A package manager unpacks the staged tree onto the target; later the target uninstalls it.
    shutil.copytree(layout.real(prefix), prefix, symlinks=True, dirs_exist_ok=True)
    install_py.uninstall(install_py.Layout(str(prefix)), quiet=True)
    assert tree(target) == before

    # In the staging tree itself, an uninstall with the same DESTDIR still removes everything it made.
    install_py.uninstall(layout, quiet=True)
    assert tree(stage) == set()


def test_without_destdir_the_directories_it_made_are_removed_and_only_those(dist: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "someone-elses").write_text("x")
    (prefix / "share").mkdir()  # empty, but there before: not ours to remove
    before = tree(tmp_path)
    layout = install_py.Layout(str(prefix))
    install_py.install(layout, dist)
    owned = {e["path"] for e in manifest_of(layout)["entries"] if e["type"] == "dir"}
    assert f"{prefix}/lib/systemd/system" in owned and f"{prefix}/share" not in owned
    install_py.uninstall(layout, quiet=True)
    assert tree(tmp_path) == before


def test_the_helpers_setup_fetched_are_installed_beside_the_binaries_and_first_on_the_units_path(
        dist: Path, tmp_path: Path) -> None:
    # They stayed in the checkout's .prefix/bin: an installed kuasar-vmm found no vhost-device-vsock and
    # kuasar-gvisor no runsc (Debian 12's own is too old for systrap), and both failed every pod.
    for helper in install_py.FETCHED_HELPERS:
        (install_py.PAUSE.parent / helper).write_bytes(b"\x7fELF fake " + helper.encode())
    prefix = tmp_path / "opt-kuasar"
    assert install_py.main(["install", "--prefix", str(prefix), "--dist", str(dist)]) == 0
    for helper in install_py.FETCHED_HELPERS:
        assert (prefix / "bin" / helper).read_bytes() == b"\x7fELF fake " + helper.encode()
        assert os.access(prefix / "bin" / helper, os.X_OK)
    unit = (prefix / "lib/systemd/system/kuasar-gvisor.service").read_text()
    assert f"Environment=PATH={prefix / 'bin'}:" in unit and "Restart=always" in unit
    assert install_py.main(["uninstall", "--prefix", str(prefix)]) == 0
    assert not (prefix / "bin" / "runsc").exists()


def test_uninstall_keeps_a_fragment_containerd_imports(
        dist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # containerd does not start with an import that is missing: the uninstall took every workload down
    # at containerd's next restart.
    containerd_config = tmp_path / "containerd" / "config.toml"
    containerd_config.parent.mkdir()
    monkeypatch.setattr(install_py, "CONTAINERD_CONFIG", containerd_config)
    prefix = tmp_path / "prefix"
    assert install_py.main(["install", "--prefix", str(prefix), "--dist", str(dist)]) == 0
    fragment = prefix / "etc/kuasar/containerd-kuasar.toml"
    containerd_config.write_text(f'version = 3\nimports = ["{fragment}"]\n')
    assert install_py.main(["install", "--prefix", str(prefix), "--dist", str(dist)]) == 0  # a re-install
    assert fragment.is_file() and not fragment.with_name(fragment.name + install_py.NEW_SUFFIX).exists()
    capsys.readouterr()
    assert install_py.main(["uninstall", "--prefix", str(prefix)]) == 0
    assert fragment.is_file() and f"{containerd_config} imports it" in capsys.readouterr().out
    assert not (prefix / "etc/kuasar/containerd-kuasar-1.6.toml").exists()  # not imported: removed


def test_a_reinstall_leaves_the_build_a_running_program_reads_from(
        dist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A frozen one-file program reads its modules from its own file, by path, as long as it runs: the
    # re-install replaced it under a task server still holding pods (its next import read the new build,
    # or, while the file was missing, ended it).
    def build(extra: bytes) -> None:
        (dist / install_py.MULTICALL).unlink()
        shutil.copy2(shutil.which("sleep") or "/bin/sleep", dist / install_py.MULTICALL)
        with open(dist / install_py.MULTICALL, "ab") as f:
            f.write(extra)  # another build: a different digest, still a program that runs

    prefix = tmp_path / "prefix"
    argv = ["--prefix", str(prefix), "--dist", str(dist)]
    build(b"build 1")
    assert install_py.main(["install", *argv]) == 0
    running = subprocess.Popen([prefix / "bin" / "runc-sandboxer", "30"])  # argv[0] picks the program
    try:
        old = Path(os.readlink(f"/proc/{running.pid}/exe"))
        assert old.parent == prefix / "lib" / "kuasar"
        build(b"build 2")
        assert install_py.main(["install", *argv]) == 0
        new = (prefix / "bin" / "runc-sandboxer").resolve()
        assert new != old and new.parent == old.parent
        assert old.read_bytes().endswith(b"build 1"), "the running program's build was replaced"
        assert os.readlink(f"/proc/{running.pid}/exe") == str(old)  # not "(deleted)"
        assert str(old) in [e["path"] for e in manifest_of(install_py.Layout(str(prefix)))["entries"]]
    finally:
        running.kill()
        running.wait()
    capsys.readouterr()
    assert install_py.main(["uninstall", "--prefix", str(prefix)]) == 0
    assert not (prefix / "lib" / "kuasar").exists(), "a build nothing runs any more is removed"


def test_install_warns_of_a_containerd_config_below_version_3(
        dist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # containerd 2.x migrates only a main config below version 3; the fragment's `version = 3` raised it, and
    # every CRI setting of a version-2 file (left by a 1.7 -> 2.1 upgrade) was ignored without a word.
    containerd_config = tmp_path / "config.toml"
    monkeypatch.setattr(install_py, "CONTAINERD_CONFIG", containerd_config)
    argv = ["install", "--prefix", str(tmp_path / "prefix"), "--dist", str(dist)]
    containerd_config.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n')
    assert install_py.main(argv) == 0
    assert "WARNING" in capsys.readouterr().out and "containerd config migrate" in "".join(
        install_py.containerd_config_warnings(install_py.Layout(str(tmp_path / "prefix"))))
    containerd_config.write_text("version = 3\n")
    assert install_py.main(argv) == 0
    assert "WARNING" not in capsys.readouterr().out


@pytest.mark.parametrize("option", ["sysconfdir", "unitdir", "shimdir"])
def test_a_relative_directory_is_refused_before_anything_is_touched(option: str) -> None:
    # Only PREFIX was checked: a relative SHIMDIR crashed after uninstall() had removed the working install.
    with pytest.raises(SystemExit, match=f"{option.upper()} must be absolute"):
        install_py.Layout("/usr/local", **{option: "relative/dir"})
