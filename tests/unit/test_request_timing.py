"""Opt-in request timing: one line per request, per process, never a failed request."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from kuasar.common.request_timing import ENV, RequestTiming


def lines(directory: Path, pid: int | None = None) -> list[list[str]]:
    path = directory / f"{pid or os.getpid()}.tsv"
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_off_without_the_variable_records_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    timing = RequestTiming.from_env()
    assert not timing.enabled and timing.start() == 0
    timing.done("ttrpc", "Task/Create", timing.start())
    timing.done("ttrpc", "Task/Create", 0)
    assert list(tmp_path.iterdir()) == []


def test_each_request_is_one_line_on_the_monotonic_clock(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV, str(tmp_path))
    timing = RequestTiming.from_env()
    before = time.monotonic_ns()
    started = timing.start()
    timing.done("sandbox", "Start", started)
    timing.done("runc", "create", timing.start())
    after = time.monotonic_ns()
    (first, second) = lines(tmp_path)
    assert first[:2] == ["sandbox", "Start"] and second[:2] == ["runc", "create"]
    for row in (first, second):
        start, end = int(row[2]), int(row[3])
        assert before <= start <= end <= after


def test_a_forked_child_writes_its_own_file(tmp_path: Path) -> None:
    timing = RequestTiming(str(tmp_path))
    timing.done("ttrpc", "parent", timing.start())
    pid = os.fork()
    if pid == 0:  # the child: record one line and leave without running pytest's exit handlers
        try:
            timing.done("ttrpc", "child", timing.start())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert [row[1] for row in lines(tmp_path)] == ["parent"]
    assert [row[1] for row in lines(tmp_path, pid)] == ["child"]


def test_an_unwritable_directory_turns_timing_off_with_one_warning(tmp_path: Path, caplog) -> None:
    timing = RequestTiming(str(tmp_path / "missing"))
    with caplog.at_level(logging.WARNING, logger="kuasar.common.request_timing"):
        timing.done("ttrpc", "Task/Create", timing.start())  # must not raise
        timing.done("ttrpc", "Task/Create", timing.start())
    assert not timing.enabled
    assert len([r for r in caplog.records if "request timing off" in r.message]) == 1
