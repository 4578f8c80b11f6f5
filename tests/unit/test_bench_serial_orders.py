"""The serial phase's rotation of stock, ours and the floor, and which floor the floor target uses."""

from __future__ import annotations

from collections import Counter

from benchmarks.startup import FLOOR, SERIAL_ORDERS
from benchmarks.summary import FLOOR_FACTOR, floor_run_ms, floor_target

STEPS = ("stock", "ours", FLOOR)


def test_every_round_runs_each_step_once() -> None:
    assert len(set(SERIAL_ORDERS)) == len(SERIAL_ORDERS)
    assert all(sorted(order) == sorted(STEPS) for order in SERIAL_ORDERS)


def test_each_step_takes_each_place_equally_often() -> None:
    for place in range(len(STEPS)):
        assert Counter(order[place] for order in SERIAL_ORDERS) == Counter({step: 2 for step in STEPS})


def test_each_step_follows_each_step_equally_often_across_rounds() -> None:
    sequence = [step for _ in range(3) for order in SERIAL_ORDERS for step in order]
    pairs = Counter(zip(sequence, sequence[1:], strict=False))
    # Over whole cycles (the wrap from the last round to the first included) every pair is as common.
    cycle = [step for order in SERIAL_ORDERS for step in order]
    wrapped = Counter(zip(cycle, cycle[1:] + cycle[:1], strict=True))
    assert set(wrapped.values()) == {2} and len(wrapped) == len(STEPS) ** 2
    assert max(pairs.values()) - min(pairs.values()) <= 1


def _summary(between: float | None) -> dict:
    return {"serial": {"ours": {"total_ms": {"p50": 42.0}, "create_ms": {"p50": 7.0}}},
            "floor": {"run_ms": {"p50": 25.0}},
            "floor_between": None if between is None else {"run_ms": {"p50": between}}}


def _floor_target(summary: dict) -> dict:
    return vars(floor_target(summary, {}))


def test_the_floor_target_uses_the_lower_of_the_two_floors() -> None:
    for between, lower in ((29.0, 25.0), (21.0, 21.0)):
        summary = _summary(between=between)
        assert floor_run_ms(summary) == lower
        target = _floor_target(summary)
        assert target["limit"] == FLOOR_FACTOR * (lower + 7.0)
        assert target["met"] == (42.0 <= FLOOR_FACTOR * (lower + 7.0))
        assert f"the lower of 25.0 ms in a loop of its own and {between:.1f} ms between" in target["detail"]


def test_results_from_before_the_rotation_use_the_loop() -> None:
    summary = _summary(between=None)
    assert floor_run_ms(summary) == 25.0
    target = _floor_target(summary)
    assert target["limit"] == FLOOR_FACTOR * (25.0 + 7.0) and not target["met"]
    assert "lower" not in target["detail"]


def test_the_floor_target_says_whether_any_sandboxer_could_meet_it() -> None:
    summary = _summary(between=None)  # limit 1.25 x (25 + 7) = 40 ms, ours 42 ms
    reachable = vars(floor_target(summary, {"attribution": {"without_ours_ms": {"p50": 36.0}}}))
    assert "p50 36.0 ms, which leaves our daemons 4.0 ms under the limit (they took 6.0 ms)" in reachable["detail"]
    beyond = vars(floor_target(summary, {"attribution": {"without_ours_ms": {"p50": 41.5}}}))
    assert "p50 41.5 ms, over the limit by itself: no sandboxer could meet it in this run (1.5 ms over)" \
        in beyond["detail"]
    assert "no sandboxer" not in reachable["detail"]
