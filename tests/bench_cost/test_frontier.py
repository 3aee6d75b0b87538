"""The delay knob's frontier: the best setting within a baseline's wait, and the verdict."""

from __future__ import annotations

from bench.cost.frontier import Point, best_within, frontier_table

OURS = {
    "ours": Point(0.22, 0.0),
    "ours-delay-150s": Point(0.30, 112.0),
    "ours-delay-300s": Point(0.49, 308.0),
}


def test_the_best_setting_within_the_baselines_wait_is_chosen() -> None:
    beat = best_within("autostop-0s", Point(0.288, 114.0), OURS)

    assert beat.setting == "ours-delay-150s"
    assert beat.beats
    assert beat.verdict == "beaten"


def test_a_setting_that_waits_less_but_costs_more_does_not_beat() -> None:
    beat = best_within("autostop-0s", Point(0.35, 114.0), OURS)

    assert beat.setting == "ours-delay-150s"
    assert not beat.beats
    assert beat.verdict == "not beaten"


def test_a_baseline_that_waits_less_than_every_setting_is_not_beaten() -> None:
    beat = best_within("autostop-5min", Point(0.21, 0.0), {"ours-delay-150s": Point(0.3, 112.0)})

    assert beat.setting is None
    assert beat.reached is None
    assert not beat.beats
    assert beat.verdict == "not beaten"


def test_a_wait_within_one_decision_interval_counts_as_the_same_wait() -> None:
    ours = {"ours": Point(0.2232, 0.2)}

    assert best_within("autostop-5min", Point(0.2187, 0.0), ours).verdict == "beaten"
    assert best_within("autostop-5min", Point(0.2187, 0.0), ours, slack_s=0.0).setting is None
    assert best_within("autostop-0s", Point(0.2230, 4.0), ours).verdict == "tied"
    assert (
        best_within("autostop-0s", Point(0.2232, 0.2), {"ours": Point(0.25, 5.3)}).setting is None
    )


def test_of_settings_as_good_the_first_one_is_chosen() -> None:
    ours = {"deployed": Point(0.5, 100.0), "other": Point(0.5003, 50.0), "worse": Point(0.4, 9)}

    beat = best_within("autostop-0s", Point(0.5, 100.0), ours)

    assert beat.setting == "deployed"
    assert beat.beats
    assert beat.verdict == "tied"


def test_the_table_has_a_row_per_trace_and_baseline() -> None:
    beats = {
        "trickle": [
            best_within("autostop-0s", Point(0.288, 114.0), OURS),
            best_within("autostop-5min", Point(0.30, 0.0), OURS),
        ]
    }

    table = frontier_table(beats)

    assert table.row_count == 2
