"""The benchmark's split of a pod start into containerd, our daemons and runc, on hand-made intervals."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.attribution import Interval, attribute, by_request, covered, load, split_call
from benchmarks.report import _attribution

MS = 1_000_000


def iv(kind: str, method: str, start_ms: float, end_ms: float) -> Interval:
    return Interval(kind, method, int(start_ms * MS), int(end_ms * MS))


# One pod: RunPodSandbox 0-10 ms, CreateContainer 10-18, StartContainer 18-48.
MARKS = [[0, 10 * MS, 18 * MS, 48 * MS]]
INTERVALS = [
    iv("sandbox", "Create", 3, 4),
    iv("ttrpc", "Pods/Create", 3.5, 5),  # overlaps the sandboxer's Create: counted once
    iv("sandbox", "Start", 5.5, 7),
    iv("sandbox", "Wait", 8, 100),  # open for the pod's life: not start time
    iv("ttrpc", "Pods/Wait", 8, 100),
    iv("ttrpc", "Task/Create", 20, 42),
    iv("runc", "create", 21, 40),  # inside Task/Create: runc's, not ours
    iv("ttrpc", "Task/Start", 43, 44),
    iv("ttrpc", "Task/State", 47, 49),  # only its part before StartContainer returned counts
    iv("ttrpc", "Task/Delete", 60, 61),  # after the pod's start
]


def test_covered_is_the_length_of_the_union() -> None:
    assert covered([]) == 0
    assert covered([(0, 2), (1, 3), (5, 6), (6, 7), (9, 9)]) == 5


def test_one_call_is_split_into_containerd_ours_and_runc() -> None:
    assert split_call(0, 10 * MS, INTERVALS) == pytest.approx({"containerd": 6.5, "ours": 3.5, "runc": 0.0})
    assert split_call(10 * MS, 18 * MS, INTERVALS) == pytest.approx({"containerd": 8.0, "ours": 0.0, "runc": 0.0})
    assert split_call(18 * MS, 48 * MS, INTERVALS) == pytest.approx({"containerd": 6.0, "ours": 5.0, "runc": 19.0})


def test_a_start_is_summed_over_its_calls_and_less_ours() -> None:
    found = attribute(MARKS, INTERVALS)
    total = found["calls"]["start total"]
    assert (total["containerd"]["p50"], total["ours"]["p50"], total["runc"]["p50"]) == pytest.approx((20.5, 8.5, 19.0))
    assert found["without_ours_ms"]["p50"] == pytest.approx(48 - 8.5)
    assert found["pods"] == 1 and found["intervals"] == len(INTERVALS)


def test_load_reads_every_process_file_and_skips_torn_lines(tmp_path: Path) -> None:
    (tmp_path / "100.tsv").write_text("sandbox\tStart\t5\t9\nttrpc\tTask/Cre")
    (tmp_path / "200.tsv").write_text("runc\tcreate\t1\t4\nruncX\tcreate\tnot-a-number\t4\n")
    (tmp_path / "notes.txt").write_text("sandbox\tStart\t0\t1\n")
    assert load(tmp_path) == [Interval("runc", "create", 1, 4), Interval("sandbox", "Start", 5, 9)]


def test_requests_are_listed_with_their_own_time_less_what_ran_nested() -> None:
    intervals = [*INTERVALS, iv("ttrpc", "Pods/Create", 5.8, 6.6)]  # inside the sandbox's Start
    rows = {(r["kind"], r["method"]): r for r in by_request(MARKS, intervals)}
    # Long-lived Waits and what began after StartContainer returned are not part of a start.
    assert set(rows) == {("sandbox", "Create"), ("ttrpc", "Pods/Create"), ("sandbox", "Start"),
                         ("ttrpc", "Task/Create"), ("runc", "create"), ("ttrpc", "Task/Start"),
                         ("ttrpc", "Task/State")}
    create = rows[("ttrpc", "Task/Create")]
    assert (create["ms"]["p50"], create["own_ms"]["p50"], create["per_start"]) == pytest.approx((22.0, 3.0, 1.0))
    start = rows[("sandbox", "Start")]
    assert start["ms"]["p50"] == pytest.approx(1.5) and start["own_ms"]["p50"] == pytest.approx(0.7)
    assert rows[("ttrpc", "Pods/Create")]["per_start"] == 2
    assert rows[("sandbox", "Create")]["own_ms"]["p50"] == pytest.approx(1.0)  # only overlapped: kept
    assert rows[("ttrpc", "Task/State")]["ms"]["p50"] == pytest.approx(1.0)  # cut where the start ended
    own = [r["own_per_start_ms"] for r in by_request(MARKS, intervals)]
    assert own == sorted(own, reverse=True) and own[0] == pytest.approx(19.0)  # runc create


def test_the_report_lists_the_requests() -> None:
    lines = _attribution({"attribution": attribute(MARKS, INTERVALS)})
    assert any(line.startswith("| ttrpc | Task/Create | 1.0 | 22.00 | 3.00 | 3.00 |") for line in lines)
    assert not any("Wait" in line for line in lines if line.startswith("| "))
