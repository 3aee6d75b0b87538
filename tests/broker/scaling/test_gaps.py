"""The idle-gap learner: the keep time that would have cost least, and how gaps are observed."""

from __future__ import annotations

import random

import pytest

from gpubroker.broker.scaling.gaps import GapLearner, best_keep_s

BOOT = 90.0


def _cost(gaps: list[float], keep: float) -> float:
    return sum(g if g <= keep else keep + BOOT for g in gaps)


def test_gaps_longer_than_a_boot_stop_at_once() -> None:
    assert best_keep_s([600.0, 1200.0, 400.0], BOOT) == 0.0


def test_gaps_shorter_than_a_boot_keep_through_the_longest_of_them() -> None:
    assert best_keep_s([70.0, 70.0, 65.0, 72.0], BOOT) == 72.0


def test_a_mix_keeps_when_short_gaps_are_common_enough() -> None:
    # Keeping 30 s: 3 x 30 + 1 x (30 + 90) = 210; stopping at once: 4 x 90 = 360.
    assert best_keep_s([30.0, 30.0, 30.0, 900.0], BOOT) == 30.0
    # One short gap among many long ones: keeping costs every long gap 30 s more than it saves.
    assert best_keep_s([30.0, 900.0, 900.0, 900.0, 900.0], BOOT) == 0.0


@pytest.mark.parametrize("seed", range(20))
def test_the_chosen_keep_time_costs_no_more_than_any_other(seed: int) -> None:
    rng = random.Random(seed)
    gaps = [rng.choice([rng.uniform(0, 200), rng.uniform(200, 3000)]) for _ in range(12)]
    chosen = _cost(gaps, best_keep_s(gaps, BOOT))
    for keep in [i * 2.5 for i in range(200)]:
        assert chosen <= _cost(gaps, keep) + 1e-6


def test_until_enough_gaps_the_fallback_holds() -> None:
    learner = GapLearner(min_samples=2)
    assert learner.keep_s(BOOT, fallback_s=BOOT) == BOOT
    learner.observe({"a": 0.0}, [], 0, now_s=1.0, horizon_s=180.0)
    learner.observe({}, ["a"], 0, now_s=50.0, horizon_s=180.0)  # busy again after 50 s idle
    assert list(learner.gaps) == [50.0]
    assert learner.keep_s(BOOT, fallback_s=BOOT) == BOOT
    learner.observe({"a": 60.0}, [], 0, now_s=61.0, horizon_s=180.0)
    learner.observe({}, ["a"], 0, now_s=100.0, horizon_s=180.0)
    assert list(learner.gaps) == [50.0, 40.0]
    assert learner.keep_s(BOOT, fallback_s=BOOT) == 50.0


def test_a_stopped_machine_s_gap_ends_when_work_needs_a_machine_again() -> None:
    learner = GapLearner(min_samples=1)
    learner.observe({"a": 0.0, "b": 10.0}, [], 0, now_s=20.0, horizon_s=1e9)
    learner.stopped("a", now_s=20.0)
    learner.stopped("b", now_s=20.0)
    learner.observe({}, [], 1, now_s=300.0, horizon_s=1e9)  # one machine's worth of work
    assert list(learner.gaps) == [290.0]  # the most recently idle one would have served it
    learner.observe({}, [], 3, now_s=400.0, horizon_s=1e9)
    assert list(learner.gaps) == [290.0, 400.0]


def test_a_stopped_machine_s_gap_is_capped_at_the_horizon() -> None:
    learner = GapLearner(min_samples=1)
    learner.observe({"a": 0.0}, [], 0, now_s=5.0, horizon_s=180.0)
    learner.stopped("a", now_s=5.0)
    learner.observe({}, [], 0, now_s=181.0, horizon_s=180.0)
    assert list(learner.gaps) == [180.0]
    assert learner.keep_s(BOOT, fallback_s=BOOT) == 0.0
