"""The pipeline scenario's busy fraction (``bench.pipeline.busy_fraction``), on made-up spans."""

from __future__ import annotations

import random

import pytest

from bench.pipeline import TaskSpan, busy_fraction


def test_tasks_back_to_back_keep_the_device_busy_all_the_time() -> None:
    # All assigned at once; each computes 1 s right after the one before.
    spans = [TaskSpan(started=0.0, finished=1.0 + i, compute_s=1.0) for i in range(4)]

    busy = busy_fraction(spans)

    assert busy.steady == pytest.approx(1.0)
    assert busy.whole == pytest.approx(1.0)
    assert busy.span_s == pytest.approx(4.0)
    assert busy.prefetched == 3


def test_a_transfer_before_each_task_is_idle_time() -> None:
    # Each task is assigned when the one before is done, waits 3 s for its input, computes 1 s.
    spans = [TaskSpan(started=4.0 * i, finished=4.0 * i + 4.0, compute_s=1.0) for i in range(5)]

    busy = busy_fraction(spans)

    assert busy.steady == pytest.approx(4 / 16)
    assert busy.whole == pytest.approx(5 / 20)
    assert busy.prefetched == 0


def test_the_first_inputs_transfer_counts_only_in_the_whole_run() -> None:
    # 2 s to get the first input in, then three 1 s tasks back to back.
    spans = [TaskSpan(started=0.0, finished=3.0 + i, compute_s=1.0) for i in range(3)]

    busy = busy_fraction(spans)

    assert busy.steady == pytest.approx(1.0)
    assert busy.whole == pytest.approx(3 / 5)


def test_the_order_the_statuses_come_in_does_not_matter() -> None:
    spans = [
        TaskSpan(started=0.5 * i, finished=2.0 + 1.5 * i, compute_s=1.0 + 0.1 * i) for i in range(6)
    ]
    shuffled = spans[:]
    random.Random(7).shuffle(shuffled)

    assert busy_fraction(shuffled) == busy_fraction(spans)
    assert busy_fraction(spans).steady == pytest.approx(sum(s.compute_s for s in spans[1:]) / 7.5)


def test_one_task_has_no_steady_state() -> None:
    with pytest.raises(ValueError, match="at least two"):
        busy_fraction([TaskSpan(0.0, 1.0, 1.0)])
