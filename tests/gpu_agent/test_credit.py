"""The agent's prefetch policy: many tiny tasks held, one per slot ready for long ones."""

from __future__ import annotations

import pytest

from gpubroker.gpu_agent.credit import CreditPolicy


def test_before_any_task_time_it_holds_one_extra_task_per_slot() -> None:
    assert CreditPolicy(slots=2, max_prefetch=32, horizon_s=0.05).capacity == 4


def test_tiny_tasks_raise_the_prefetch_to_its_maximum() -> None:
    policy = CreditPolicy(slots=2, max_prefetch=32, horizon_s=0.05)
    for _ in range(50):
        policy.observe(0.0005)
    assert policy.prefetch == 32
    assert policy.capacity == 34


def test_long_tasks_get_one_task_ready_per_slot() -> None:
    # Its inputs arrive while the slot computes, so the device never waits on the network.
    policy = CreditPolicy(slots=2, max_prefetch=32, horizon_s=0.05)
    for _ in range(50):
        policy.observe(2.0)
    assert policy.prefetch == 2
    assert policy.capacity == 4
    assert CreditPolicy(slots=2, max_prefetch=1, horizon_s=0.05).prefetch == 1  # the cap holds


def test_the_prefetch_covers_the_horizon_in_between() -> None:
    policy = CreditPolicy(slots=2, max_prefetch=32, horizon_s=0.05, smoothing=1.0)
    policy.observe(0.01)  # 2 slots * 50 ms / 10 ms
    assert policy.prefetch == 10


def test_a_zero_maximum_or_horizon_turns_prefetch_off() -> None:
    assert CreditPolicy(slots=3, max_prefetch=0, horizon_s=0.05).capacity == 3
    assert CreditPolicy(slots=3, max_prefetch=8, horizon_s=0.0).capacity == 3


@pytest.mark.parametrize(
    "args", [(0, 1, 0.05, 0.2), (1, -1, 0.05, 0.2), (1, 1, -1.0, 0.2), (1, 1, 0.05, 0.0)]
)
def test_nonsense_settings_are_refused(args: tuple[int, int, float, float]) -> None:
    with pytest.raises(ValueError):
        CreditPolicy(*args)


def test_a_batching_model_raises_the_prefetch_to_its_batch_up_to_the_maximum() -> None:
    policy = CreditPolicy(slots=2, max_prefetch=64, horizon_s=0.05)

    assert policy.capacity_for_batch(0) == policy.capacity == 4
    assert policy.capacity_for_batch(32) == 34
    assert policy.capacity_for_batch(500) == 66
