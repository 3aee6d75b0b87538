"""Launch sizing: work against boots, and the max-queue-delay knob."""

from __future__ import annotations

from gpubroker.broker.scaling.sizing import (
    Fleet,
    first_start_due,
    needed_for_delay,
    worth_starting,
)


def test_the_first_machine_for_unserved_work_is_always_worth_it() -> None:
    assert worth_starting(Fleet(queued=1, run_s=1.0, boot_s=90.0), 1, 2.0) == 1


def test_no_work_or_no_want_starts_nothing() -> None:
    assert worth_starting(Fleet(queued=0, run_s=60.0, boot_s=90.0), 3, 2.0) == 0
    assert worth_starting(Fleet(queued=9, run_s=60.0, boot_s=90.0), 0, 2.0) == 0


def test_each_new_machine_must_get_its_boots_of_work() -> None:
    fleet = Fleet(queued=50, run_s=32.5, boot_s=90.0)  # 1625 s of work
    assert worth_starting(fleet, 25, 2.0) == 9  # 1625 / 9 = 181 s each >= 180
    assert worth_starting(fleet, 4, 2.0) == 4
    assert worth_starting(fleet, 25, 4.0) == 4  # 406 s each >= 360


def test_serving_machines_take_their_share_first() -> None:
    # Two connected machines work 180 s of the 600 s while new ones boot; the other 420 s
    # shared by 3 machines is 140 s each, by 4 machines 105 s each.
    fleet = Fleet(queued=10, run_s=60.0, boot_s=90.0, connected=2)
    assert worth_starting(fleet, 5, 1.0) == 2
    assert worth_starting(fleet, 5, 1.2) == 1
    assert worth_starting(fleet, 5, 2.0) == 0


def test_the_first_start_waits_for_the_delay_less_a_boot() -> None:
    assert first_start_due(0.0, 90.0, 0.0)
    assert not first_start_due(500.0, 90.0, 600.0)
    assert first_start_due(510.0, 90.0, 600.0)


def test_machines_needed_for_the_delay() -> None:
    # 600 s of work, one machine serving: its last task starts after 600 s.
    serving = Fleet(queued=10, run_s=60.0, boot_s=90.0, connected=1)
    assert needed_for_delay(serving, 900.0) == 0
    assert needed_for_delay(serving, 390.0) == 1  # two machines: a boot then 300 s each
    alone = Fleet(queued=10, run_s=60.0, boot_s=90.0)
    assert needed_for_delay(alone, 60.0) == 10  # not even a boot fits: as many as tasks
