"""A sandboxer that cannot start says why in one line and changes nothing: a bad config file, a --dir
that is not its own, a --listen another sandboxer serves."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kuasar.common.config import load_config
from kuasar.common.daemon import _check_listen, _own_directory, refuse_served_socket
from kuasar.common.errors import FailedPrecondition, InvalidArgument


def test_a_config_path_that_is_a_directory_or_not_text_is_invalid(tmp_path: Path) -> None:
    # They raised IsADirectoryError and UnicodeDecodeError: a traceback instead of a message.
    with pytest.raises(InvalidArgument, match="Is a directory"):
        load_config("/run/x.sock", str(tmp_path), str(tmp_path), "info")
    binary = tmp_path / "config.toml"
    binary.write_bytes(b"\xff\xfe[sandboxer]\n")
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        load_config("/run/x.sock", str(tmp_path), str(binary), "info")


@pytest.mark.parametrize(("text", "message"), [
    ('[sandboxer]\nevents-address = "/x"\n', r"unknown key\(s\) in \[sandboxer\]: events-address"),
    ("[sandboxer]\nevents_address = 5\n", r"\[sandboxer\] events_address must be a string, not 5"),
    ('[runc]\nbinary = ["runc"]\n', r"\[runc\] binary must be a string"),
    ('[runc]\nbinray = "runc"\n', r"unknown key\(s\) in \[runc\]: binray \(known: binary\)"),
    ('[runc]\nbinary = "/nonexistent/runc"\n', "no such program"),
    ('[wasm]\nruntime = "wasmtime"\n', r"unknown config table\(s\) \[wasm\]: this sandboxer reads"),
    ("[hypervisor]\n", r"unknown config table\(s\) \[hypervisor\]"),
])
def test_a_misspelt_or_mistyped_config_key_is_refused(tmp_path: Path, text: str, message: str) -> None:
    # Each of these started and reported ready (events silently off, a runc named "['runc']", ...).
    from kuasar.runc.sandboxer import RuncSandboxer

    path = tmp_path / "runc.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=message):
        RuncSandboxer(load_config("/run/x.sock", str(tmp_path / "d"), str(path), "info"))


def test_wasm_config_keys_are_checked_too(tmp_path: Path) -> None:
    from kuasar.wasm.sandboxer import WasmSandboxer

    for text, message in (('[wasm]\nruntme = "wasmtime"\n', r"unknown key\(s\) in \[wasm\]: runtme"),
                          ('[wasm]\nwasmedge = 1\n', r"\[wasm\] wasmedge must be a string"),
                          ('[runc]\nbinary = "runc"\n', r"unknown config table\(s\) \[runc\]")):
        path = tmp_path / "wasm.toml"
        path.write_text(text)
        with pytest.raises(InvalidArgument, match=message):
            WasmSandboxer(load_config("/run/x.sock", str(tmp_path / "d"), str(path), "info"))


def test_a_shared_directory_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    # `--dir /tmp` made /tmp root-only (0700, sticky bit gone).
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(InvalidArgument, match="shared"):
        _own_directory(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(InvalidArgument, match="not a directory"):
        _own_directory(not_a_dir)


def test_a_directory_of_its_own_is_made_or_kept_root_only(tmp_path: Path) -> None:
    made, existing = tmp_path / "a" / "made", tmp_path / "existing"
    existing.mkdir(mode=0o755)
    for directory in (made, existing):
        _own_directory(directory)
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_a_listen_path_too_long_for_a_socket_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="longer than a unix socket path"):
        _check_listen(tmp_path / ("s" * 120))


def test_a_socket_someone_serves_is_refused_and_a_dead_ones_is_not(tmp_path: Path) -> None:
    # A second sandboxer (another --dir, the default --listen) unlinked a running one's socket,
    # which then kept running unreachable.
    path = tmp_path / "sandboxer.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    try:
        with pytest.raises(FailedPrecondition, match="another process serves"):
            refuse_served_socket(path)
    finally:
        server.close()
    assert path.exists()  # a crashed sandboxer's socket: nobody answers
    refuse_served_socket(path)
    refuse_served_socket(tmp_path / "none.sock")


def test_a_listen_path_that_is_not_a_socket_is_refused_and_left_alone(tmp_path: Path) -> None:
    # `--listen /etc/kuasar/runc.toml` by mistake: start-up deleted the file and bound a socket there.
    precious = tmp_path / "precious.toml"
    precious.write_text("important\n")
    link = tmp_path / "link.sock"
    link.symlink_to(precious)
    for path in (precious, link, tmp_path):
        with pytest.raises(InvalidArgument, match="exists and is not a socket"):
            _check_listen(path)
    assert precious.read_text() == "important\n" and link.is_symlink()
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as crashed:  # closed, the file left: a crashed one's
        crashed.bind(str(dead))
    _check_listen(dead)
    _check_listen(tmp_path / "none.sock")


def test_a_dir_in_the_way_is_a_one_line_error_not_a_traceback(tmp_path: Path) -> None:
    # FileExistsError and friends from --dir/--listen came out as Python tracebacks.
    (tmp_path / "file").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "kuasar.runc.cli", "--listen", str(tmp_path / "file" / "s.sock"),
         "--dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=60,
        env={**os.environ, "KUASAR_PREFIX": os.environ.get("KUASAR_PREFIX", "")})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr == f"runc-sandboxer: cannot start: File exists ({tmp_path / 'file'})\n"
    assert not (tmp_path / "d" / "task.sock").exists()  # refused before a task server was started
