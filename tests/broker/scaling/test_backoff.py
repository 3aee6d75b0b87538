"""Launch backoff, pure: holds that double per failure, cap, reset, and one log per hold."""

from __future__ import annotations

import pytest

from gpubroker.broker.scaling.backoff import BackoffPolicy, LaunchBackoff


def test_each_failure_after_a_hold_doubles_it_up_to_the_cap() -> None:
    backoff: LaunchBackoff[str] = LaunchBackoff(BackoffPolicy(initial_s=30, max_s=900))
    now, holds = 0.0, []

    for _ in range(7):
        hold = backoff.fail("nvidia-l4", now, "stuck")
        holds.append(hold.until_s - now)
        now = hold.until_s  # the next launch goes ahead once the hold is over, and fails

    assert holds == [30, 60, 120, 240, 480, 900, 900]


def test_a_held_key_waits_and_other_keys_do_not() -> None:
    backoff: LaunchBackoff[str] = LaunchBackoff(BackoffPolicy(initial_s=30))

    backoff.fail("nvidia-l4", 100.0, "no capacity")

    assert backoff.remaining_s("nvidia-l4", 110.0) == 20.0
    assert backoff.remaining_s("nvidia-l4", 130.0) == 0.0
    assert backoff.remaining_s("nvidia-tesla-t4", 110.0) == 0.0


def test_failures_during_a_hold_do_not_lengthen_it() -> None:
    backoff: LaunchBackoff[str] = LaunchBackoff(BackoffPolicy(initial_s=30))
    first = backoff.fail("nvidia-l4", 0.0, "vm-1 stuck")

    # Two more machines of the same scale-up are found stuck a moment later.
    again = backoff.fail("nvidia-l4", 1.0, "vm-2 stuck")
    backoff.fail("nvidia-l4", 2.0, "vm-3 stuck")

    assert again == first
    assert backoff.remaining_s("nvidia-l4", 2.0) == 28.0
    assert backoff.fail("nvidia-l4", 30.0, "vm-4 stuck").failures == 2


def test_a_success_forgets_the_failures() -> None:
    backoff: LaunchBackoff[str] = LaunchBackoff(BackoffPolicy(initial_s=30))
    backoff.fail("nvidia-l4", 0.0, "stuck")
    backoff.fail("nvidia-l4", 30.0, "stuck")

    assert backoff.succeed("nvidia-l4")

    assert backoff.remaining_s("nvidia-l4", 31.0) == 0.0
    assert backoff.holds() == []
    assert backoff.fail("nvidia-l4", 100.0, "stuck").until_s == 130.0
    assert not backoff.succeed("nvidia-tesla-t4")


def test_a_refusal_is_announced_once_per_hold() -> None:
    backoff: LaunchBackoff[tuple[str, str]] = LaunchBackoff(BackoffPolicy(initial_s=30))
    key = ("nvidia-l4", "us-central1-a")

    assert not backoff.announce(key)  # nothing held
    backoff.fail(key, 0.0, "stockout")
    announced = [backoff.announce(key) for _ in range(3)]
    backoff.fail(key, 30.0, "stockout")

    assert announced == [True, False, False]
    assert backoff.announce(key)


def test_holds_lists_every_key_with_failures_and_its_cause() -> None:
    backoff: LaunchBackoff[str] = LaunchBackoff(BackoffPolicy(initial_s=10))
    backoff.fail("nvidia-l4", 0.0, "vm-1 stuck")
    backoff.fail("nvidia-tesla-t4", 5.0, "no capacity")

    holds = {h.key: (h.failures, h.remaining_s(8.0), h.cause) for h in backoff.holds()}

    assert holds == {
        "nvidia-l4": (1, 2.0, "vm-1 stuck"),
        "nvidia-tesla-t4": (1, 7.0, "no capacity"),
    }


@pytest.mark.parametrize(
    ("initial_s", "max_s", "factor"), [(-1.0, 10.0, 2.0), (20.0, 10.0, 2.0), (1.0, 10.0, 0.5)]
)
def test_a_policy_that_would_not_back_off_is_refused(
    initial_s: float, max_s: float, factor: float
) -> None:
    with pytest.raises(ValueError, match="initial_s"):
        BackoffPolicy(initial_s=initial_s, max_s=max_s, factor=factor)


def test_a_thousand_failures_stay_at_the_cap() -> None:
    assert BackoffPolicy(initial_s=30, max_s=900).delay_s(1000) == 900
