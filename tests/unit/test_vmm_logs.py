"""A VM's log files, rotated (kuasar.vmm.vm_logs) by the task proxy."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kuasar.vmm import vm_logs
from kuasar.vmm.config import parse_config


def appender(path: Path) -> int:
    """A writer as QEMU opens the file with append=on."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def test_a_log_within_the_limit_is_left_alone(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert not vm_logs.rotate_if_over(log, 100)  # not there (yet): nothing is made
    assert not log.exists() and not vm_logs.rotated(log).exists()
    log.write_bytes(b"x" * 100)
    assert not vm_logs.rotate_if_over(log, 100)
    assert log.read_bytes() == b"x" * 100 and not vm_logs.rotated(log).exists()


def test_a_log_over_the_limit_keeps_its_last_bytes_in_dot_1_and_the_writer_goes_on_at_its_start(
        tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    fd = appender(log)
    try:
        os.write(fd, b"".join(b"line %04d\n" % i for i in range(100)))  # 1000 bytes
        assert vm_logs.rotate_if_over(log, 250)
        old = vm_logs.rotated(log).read_bytes()
        assert len(old) == 250 and old.endswith(b"line 0099\n") and old.startswith(b"line 0075\n")
        assert log.stat().st_size == 0
        # The writer's next bytes are the file: no hole of NULs where the old content was.
        os.write(fd, b"after\n")
        assert log.read_bytes() == b"after\n"
        os.write(fd, b"y" * 300)
        assert vm_logs.rotate_if_over(log, 250)  # a second rotation replaces the first's file
        assert vm_logs.rotated(log).read_bytes() == b"y" * 250
        assert oct(vm_logs.rotated(log).stat().st_mode & 0o777) == "0o600"
    finally:
        os.close(fd)
    assert not list(tmp_path.glob(".*tmp")), "no temporary file left behind"


def test_a_symlink_in_place_of_the_log_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"z" * 1000)
    (tmp_path / "console.log").symlink_to(target)
    with pytest.raises(OSError):
        vm_logs.rotate_if_over(tmp_path / "console.log", 10)
    assert target.read_bytes() == b"z" * 1000


def test_the_tail_reads_across_a_rotation(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert vm_logs.tail(log) == ""
    log.write_bytes(b"".join(b"boot %d\n" % i for i in range(30)))
    vm_logs.rotate_if_over(log, 40)
    log.write_bytes(b"panic: the end\n")
    assert vm_logs.tail(log, lines=3).splitlines() == ["boot 28", "boot 29", "panic: the end"]
    # Only the end of each file is read: a guest's endless line does not come back whole.
    log.write_bytes(b"q" * (vm_logs.TAIL_BYTES * 4))
    assert len(vm_logs.tail(log)) <= 2 * vm_logs.TAIL_BYTES + 30


def test_every_log_of_the_vm_directory_is_rotated_and_nothing_else(tmp_path: Path) -> None:
    for name in ("console.log", "qemu.log", "proxy.log", "small.log", "state.json"):
        (tmp_path / name).write_bytes(b"z" * (10 if name == "small.log" else 300))
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "inner.log").write_bytes(b"z" * 300)  # the guest's: not ours to touch
    assert vm_logs.rotate_logs_in(tmp_path, 100) == [tmp_path / "console.log", tmp_path / "proxy.log",
                                                      tmp_path / "qemu.log"]
    assert (tmp_path / "small.log").stat().st_size == 10 and not (tmp_path / "small.log.1").exists()
    assert (tmp_path / "state.json").stat().st_size == 300
    assert (tmp_path / "shared" / "inner.log").stat().st_size == 300


def test_keep_bounded_rotates_until_cancelled_and_survives_errors(tmp_path: Path) -> None:
    log = tmp_path / "console.log"

    async def scenario() -> None:
        log.mkdir()  # a directory by that name: an error it logs and lives through
        task = asyncio.create_task(vm_logs.keep_bounded(tmp_path, 100, period=0.01))
        await asyncio.sleep(0.05)
        assert not task.done()
        log.rmdir()
        fd = appender(log)
        os.write(fd, b"w" * 500)
        deadline = time.monotonic() + 5
        while not vm_logs.rotated(log).exists() and time.monotonic() < deadline:  # noqa: ASYNC110 - a file
            await asyncio.sleep(0.01)
        os.close(fd)
        assert vm_logs.rotated(log).read_bytes() == b"w" * 100 and log.stat().st_size == 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_the_limit_comes_from_the_config() -> None:
    assert parse_config({}).log_file_limit_in_kb == 1024
    assert parse_config({"log_file_limit_in_kb": 0}).log_file_limit_in_kb == 0  # never rotated
    with pytest.raises(Exception, match="non-negative integer"):
        parse_config({"log_file_limit_in_kb": -1})


def test_the_task_proxy_bounds_the_logs_of_its_vm(tmp_path: Path) -> None:
    """The proxy, which outlives restarts of the sandboxer, is what rotates them, its own log too."""
    log, share = tmp_path / "console.log", tmp_path / "shared"
    share.mkdir()
    fd = appender(log)
    with open(tmp_path / "proxy.log", "ab") as own:
        proxy = subprocess.Popen([sys.executable, "-m", "kuasar.vmm.proxy", "--listen", str(tmp_path / "task.sock"),
                                  "--uds", str(tmp_path / "vsock.sock"), "--share", str(share),
                                  "--log-dir", str(tmp_path), "--log-limit", "1000"], stdout=own, stderr=own)
    try:
        os.write(fd, b"k" * 5000)
        deadline = time.monotonic() + 10
        while not vm_logs.rotated(log).exists() and time.monotonic() < deadline and proxy.poll() is None:
            time.sleep(0.05)
        assert vm_logs.rotated(log).read_bytes() == b"k" * 1000
        assert log.stat().st_size == 0
    finally:
        os.close(fd)
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(timeout=10)
    assert proxy.returncode == 0, (tmp_path / "proxy.log").read_text()
    assert "console.log rotated at 1000 bytes" in (tmp_path / "proxy.log").read_text()


def test_a_log_that_cannot_be_rotated_keeps_neither_the_others_nor_its_content_from_harm(tmp_path: Path) -> None:
    (tmp_path / "a.log").mkdir()  # not a file
    (tmp_path / "b.log").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").write_bytes(b"e" * 500)
    (tmp_path / "c.log").write_bytes(b"c" * 500)
    (tmp_path / "d.log").write_bytes(b"d" * 500)
    (tmp_path / "d.log.1").mkdir()  # its copy cannot be saved: it is not emptied either
    with pytest.raises(OSError):
        vm_logs.rotate_logs_in(tmp_path, 100)
    assert (tmp_path / "c.log.1").read_bytes() == b"c" * 100 and (tmp_path / "c.log").stat().st_size == 0
    assert (tmp_path / "d.log").read_bytes() == b"d" * 500
    assert (tmp_path / "elsewhere").read_bytes() == b"e" * 500


def test_a_limit_the_proxy_could_not_hold_is_refused() -> None:
    with pytest.raises(Exception, match="at most"):
        parse_config({"log_file_limit_in_kb": 10 << 20})
