"""The autoscaling policy on a simulated clock: pure decisions, no providers, no sleeping."""

from __future__ import annotations

import dataclasses

import pytest

from gpubroker.billing.prices import PriceCatalog
from gpubroker.broker.scaling.policy import (
    Autoscaler,
    Decision,
    InstanceSnapshot,
    ScalingPolicy,
    Snapshot,
    hourly_spend,
    worst_case_price_nanousd,
)
from gpubroker.broker.scaling.providers.base import InstanceStatus, LaunchRequest

L4_PER_HOUR = 710_000_000
"""On-demand nvidia-l4, nano-USD per hour."""

POLICY = ScalingPolicy(
    launch_request=LaunchRequest(gpu_types=("nvidia-l4",)),
    launch_price_nanousd=L4_PER_HOUR,
    max_instances=10,
    slots_per_instance=2,
    default_boot_s=90.0,
    min_idle_s=30.0,
    scale_up_cooldown_s=10.0,
    boot_timeout_s=600.0,
    launch_work_boots=0.0,  # these tests count slots; sizing has its own tests below
    default_run_s=3600.0,
)


def _policy(**changes: object) -> ScalingPolicy:
    return dataclasses.replace(POLICY, **changes)  # type: ignore[arg-type]


def _booting(name: str, created: float = 0.0) -> InstanceSnapshot:
    return InstanceSnapshot(
        name=name,
        status=InstanceStatus.RUNNING,
        gpu_type="nvidia-l4",
        spot=False,
        price_per_hour_nanousd=L4_PER_HOUR,
        created_at_s=created,
        running_since_s=created,
    )


def _idle(name: str, idle_since: float, created: float = 0.0) -> InstanceSnapshot:
    return dataclasses.replace(
        _booting(name, created), connected=True, idle_since_s=idle_since, agent_last_seen_s=None
    )


def _busy(name: str, tasks: int = 2, created: float = 0.0) -> InstanceSnapshot:
    return dataclasses.replace(_idle(name, created + 90.0, created), running_tasks=tasks)


def _launched(decision: Decision) -> int:
    return 0 if decision.launch is None else decision.launch.count


# --- scale up --------------------------------------------------------------------------------


def test_a_burst_onto_zero_instances_launches_enough_for_the_whole_queue_at_once() -> None:
    scaler = Autoscaler(POLICY)

    decision = scaler.decide(Snapshot(queue_depth=7), now_s=0.0)

    assert decision.launch is not None
    assert _launched(decision) == 4  # ceil(7 / 2)
    assert decision.launch.request == POLICY.launch_request
    assert "7 queued tasks exceed 0 free and 0 booting slots" in decision.launch.reason
    assert decision.terminations == ()


def test_a_single_task_onto_zero_instances_launches_one_at_once() -> None:
    decision = Autoscaler(POLICY).decide(Snapshot(queue_depth=1), now_s=0.0)

    assert _launched(decision) == 1


def test_more_work_while_instances_boot_does_not_launch_them_twice() -> None:
    scaler = Autoscaler(POLICY)
    assert _launched(scaler.decide(Snapshot(queue_depth=7), now_s=0.0)) == 4

    pending = scaler.decide(Snapshot(queue_depth=8, pending_launches=4), now_s=20.0)
    booting = [_booting(f"vm-{i}", created=5.0) for i in range(4)]
    created = scaler.decide(Snapshot(queue_depth=8, instances=booting), now_s=30.0)
    more = scaler.decide(Snapshot(queue_depth=9, instances=booting), now_s=40.0)

    assert pending.launch is None
    assert created.launch is None
    assert _launched(more) == 1


def test_free_slots_of_connected_agents_absorb_queued_work() -> None:
    instances = [_idle("vm-0", idle_since=90.0)]

    decision = Autoscaler(POLICY).decide(
        Snapshot(queue_depth=2, free_slots=2, instances=instances), now_s=100.0
    )

    assert decision.launch is None
    assert decision.terminations == ()  # queued work keeps idle instances


def test_a_second_scale_up_waits_for_the_cooldown() -> None:
    scaler = Autoscaler(POLICY)
    scaler.decide(Snapshot(queue_depth=2), now_s=0.0)

    early = scaler.decide(Snapshot(queue_depth=4, pending_launches=1), now_s=9.0)
    later = scaler.decide(Snapshot(queue_depth=4, pending_launches=1), now_s=10.0)

    assert early.launch is not None and early.launch.count == 0
    assert "cooldown" in early.launch.reason
    assert _launched(later) == 1


def test_a_burst_gets_only_the_instances_its_work_is_worth() -> None:
    # 10 tasks of 60 s against 90 s boots, two boots of work per new instance: 600 s of work
    # keeps 3 new instances busy that long (200 s each), not the 5 the slots would ask for.
    scaler = Autoscaler(_policy(launch_work_boots=2.0, default_run_s=60.0))

    decision = scaler.decide(Snapshot(queue_depth=10), now_s=0.0)

    assert _launched(decision) == 3
    assert decision.launch is not None
    assert "3 worth starting for 600 s of queued work" in decision.launch.reason


def test_a_few_short_tasks_get_one_instance_not_one_per_two_tasks() -> None:
    scaler = Autoscaler(_policy(launch_work_boots=2.0, default_run_s=60.0))
    for _ in range(30):
        scaler.observe_run(5.0)  # the tasks turn out to take 5 s

    assert scaler.run_time_s == pytest.approx(5.0, abs=0.1)
    assert _launched(scaler.decide(Snapshot(queue_depth=10), now_s=0.0)) == 1


def test_work_a_connected_instance_drains_within_a_boot_starts_nothing() -> None:
    scaler = Autoscaler(_policy(launch_work_boots=2.0, default_run_s=10.0))
    # One busy instance, 6 queued tasks of 10 s: it drains them in about 60 s, under a boot.
    snapshot = Snapshot(queue_depth=6, instances=[_busy("vm-0")])

    decision = scaler.decide(snapshot, now_s=500.0)

    assert _launched(decision) == 0


def test_a_max_queue_delay_collects_work_then_starts_one_instance() -> None:
    scaler = Autoscaler(_policy(max_queue_delay_s=600.0, launch_work_boots=2.0, default_run_s=20.0))

    early = scaler.decide(Snapshot(queue_depth=3, oldest_queued_age_s=500.0), now_s=0.0)
    due = scaler.decide(Snapshot(queue_depth=6, oldest_queued_age_s=511.0), now_s=20.0)

    assert _launched(early) == 0
    assert early.launch is not None and "a machine starts at 510 s" in early.launch.reason
    assert _launched(due) == 1  # 120 s of work: one instance drains it within the delay


def test_a_max_queue_delay_longer_than_a_boot_keeps_no_idle_instance() -> None:
    scaler = Autoscaler(_policy(max_queue_delay_s=600.0, default_boot_s=90.0))

    assert scaler.idle_grace_s == POLICY.min_idle_s
    assert Autoscaler(POLICY).idle_grace_s == 90.0  # no gaps yet: one boot (keep_factor 1)


def test_busy_instances_with_more_queued_work_get_company() -> None:
    instances = [_busy("vm-0"), _busy("vm-1")]

    decision = Autoscaler(POLICY).decide(
        Snapshot(queue_depth=3, oldest_queued_age_s=1.0, instances=instances), now_s=500.0
    )

    assert _launched(decision) == 2
    assert decision.terminations == ()


def test_max_instances_bounds_a_scale_up_and_says_so() -> None:
    scaler = Autoscaler(_policy(max_instances=3))
    instances = [_busy("vm-0")]

    decision = scaler.decide(Snapshot(queue_depth=20, instances=instances), now_s=100.0)

    assert decision.launch is not None and decision.launch.count == 2
    assert "wanted 10, launching 2: max_instances 3 leaves room for 2" in decision.launch.reason


def test_max_instances_counts_pending_launches() -> None:
    decision = Autoscaler(_policy(max_instances=3)).decide(
        Snapshot(queue_depth=20, pending_launches=3), now_s=0.0
    )

    assert decision.launch is not None and decision.launch.count == 0


def test_the_spend_cap_bounds_a_scale_up_and_says_so() -> None:
    # $1.50/h: one L4 is running ($0.71/h), so one more fits and a second would not.
    scaler = Autoscaler(_policy(max_hourly_spend_nanousd=1_500_000_000))

    decision = scaler.decide(Snapshot(queue_depth=10, instances=[_busy("vm-0")]), now_s=100.0)

    assert decision.launch is not None and decision.launch.count == 1
    assert (
        "the hourly spend cap of $1.5000 allows 1 more at $0.7100/h each, "
        "with $0.7100/h already committed"
    ) in decision.launch.reason


def test_the_spend_cap_refuses_a_scale_up_that_would_exceed_it() -> None:
    scaler = Autoscaler(_policy(max_hourly_spend_nanousd=1_000_000_000))

    decision = scaler.decide(Snapshot(queue_depth=10, instances=[_busy("vm-0")]), now_s=100.0)

    assert decision.launch is not None and decision.launch.count == 0
    assert "wanted 5, launching 0: the hourly spend cap of $1.0000" in decision.launch.reason


def test_min_instances_are_launched_without_work() -> None:
    decision = Autoscaler(_policy(min_instances=2)).decide(Snapshot(), now_s=0.0)

    assert decision.launch is not None and decision.launch.count == 2
    assert "below min_instances 2" in decision.launch.reason


# --- the idle rule ---------------------------------------------------------------------------


def test_an_idle_instance_is_kept_for_one_boot_time_then_stopped() -> None:
    # Booted in 90 s, ran a task, idle since t=200; grace = max(30, 90 x 1) = 90 s.
    scaler = Autoscaler(POLICY)
    snapshot = Snapshot(free_slots=2, instances=[_idle("vm-0", idle_since=200.0)])

    kept = scaler.decide(snapshot, now_s=289.9)
    stopped = scaler.decide(snapshot, now_s=290.0)

    assert scaler.idle_grace_s == 90.0
    assert scaler.stop_time_s(snapshot.instances[0]) == 290.0
    assert kept.terminations == ()
    assert stopped.terminated_names == ("vm-0",)
    assert "idle for 90 s, past the 90 s grace" in stopped.terminations[0].reason
    assert stopped.terminations[0].kind == "idle"


def test_an_idle_instance_is_never_stopped_within_its_billed_minute() -> None:
    # A 5 s grace would stop it at t=106, but its first 60 s (from t=100) are paid anyway.
    scaler = Autoscaler(_policy(default_boot_s=5.0, min_idle_s=5.0))
    instance = _idle("vm-0", idle_since=101.0, created=100.0)
    snapshot = Snapshot(free_slots=2, instances=[instance])

    before = scaler.decide(snapshot, now_s=159.9)
    after = scaler.decide(snapshot, now_s=160.0)

    assert scaler.stop_time_s(instance) == 160.0
    assert before.terminations == ()
    assert after.terminated_names == ("vm-0",)


def test_the_idle_grace_never_drops_below_min_idle() -> None:
    scaler = Autoscaler(_policy(default_boot_s=10.0, min_idle_s=30.0))

    assert scaler.idle_grace_s == 30.0


def test_busy_and_booting_instances_are_not_idle() -> None:
    scaler = Autoscaler(POLICY)
    instances = [_busy("vm-0"), _booting("vm-1", created=10_000.0)]

    decision = scaler.decide(Snapshot(instances=instances), now_s=10_100.0)

    assert decision.terminations == ()
    assert all(scaler.stop_time_s(i) is None for i in instances)


def test_idle_stops_keep_min_instances_and_stop_the_longest_idle_first() -> None:
    scaler = Autoscaler(_policy(min_instances=1))
    instances = [_idle("vm-a", idle_since=300.0), _idle("vm-b", idle_since=200.0)]

    decision = scaler.decide(Snapshot(free_slots=4, instances=instances), now_s=1_000.0)

    assert decision.launch is None
    assert decision.terminated_names == ("vm-b",)


def test_the_boot_estimate_follows_observations_and_moves_the_grace() -> None:
    scaler = Autoscaler(_policy(boot_smoothing=0.5))
    instance = _idle("vm-0", idle_since=200.0)

    scaler.observe_boot(190.0)  # 0.5 x 190 + 0.5 x 90
    first = scaler.boot_time_s
    scaler.observe_boot(40.0)  # 0.5 x 40 + 0.5 x 140

    assert first == 140.0
    assert scaler.boot_time_s == 90.0
    assert scaler.idle_grace_s == 90.0
    scaler.observe_boot(290.0)  # 0.5 x 290 + 0.5 x 90
    assert scaler.idle_grace_s == 190.0
    assert scaler.stop_time_s(instance) == 390.0
    assert scaler.decide(Snapshot(instances=[instance]), now_s=389.0).terminations == ()
    assert scaler.decide(Snapshot(instances=[instance]), now_s=390.0).terminated_names == ("vm-0",)


def test_a_negative_boot_observation_is_refused() -> None:
    with pytest.raises(ValueError, match="-1"):
        Autoscaler(POLICY).observe_boot(-1.0)


# --- broken instances ------------------------------------------------------------------------


def test_an_instance_whose_agent_never_connects_is_stopped_after_the_boot_timeout() -> None:
    scaler = Autoscaler(POLICY)
    stuck = _booting("vm-0", created=0.0)

    waiting = scaler.decide(Snapshot(instances=[stuck]), now_s=600.0)
    timed_out = scaler.decide(Snapshot(instances=[stuck]), now_s=601.0)

    assert waiting.terminations == ()
    assert timed_out.terminated_names == ("vm-0",)
    assert "never connected for 601 s, over the 600 s boot timeout" in (
        timed_out.terminations[0].reason
    )
    assert timed_out.terminations[0].kind == "stuck"


def test_a_stuck_instance_is_replaced_when_work_waits() -> None:
    scaler = Autoscaler(POLICY)

    decision = scaler.decide(
        Snapshot(queue_depth=2, instances=[_booting("vm-0", created=0.0)]), now_s=700.0
    )

    assert decision.terminated_names == ("vm-0",)
    assert _launched(decision) == 1


def test_an_instance_whose_agent_was_lost_is_stopped_a_boot_timeout_after_last_seen() -> None:
    lost = dataclasses.replace(_booting("vm-0"), agent_last_seen_s=1_000.0, idle_since_s=900.0)
    scaler = Autoscaler(POLICY)

    assert scaler.decide(Snapshot(instances=[lost]), now_s=1_600.0).terminations == ()
    assert scaler.decide(Snapshot(instances=[lost]), now_s=1_601.0).terminated_names == ("vm-0",)


def test_a_terminated_instance_is_deleted_and_no_longer_counts() -> None:
    preempted = dataclasses.replace(_busy("vm-0"), status=InstanceStatus.TERMINATED)

    decision = Autoscaler(POLICY).decide(
        Snapshot(queue_depth=2, instances=[preempted]), now_s=100.0
    )

    assert decision.terminated_names == ("vm-0",)
    assert "TERMINATED" in decision.terminations[0].reason
    assert decision.terminations[0].kind == "terminated"
    assert _launched(decision) == 1


def test_stopping_instances_are_left_alone() -> None:
    stopping = dataclasses.replace(_booting("vm-0"), status=InstanceStatus.STOPPING)

    decision = Autoscaler(POLICY).decide(Snapshot(instances=[stopping]), now_s=10_000.0)

    assert decision.terminations == ()
    assert decision.launch is None


# --- helpers and config ----------------------------------------------------------------------


def test_hourly_spend_sums_live_instances_only() -> None:
    instances = [
        _busy("vm-0"),
        _booting("vm-1"),
        dataclasses.replace(_busy("vm-2"), status=InstanceStatus.TERMINATED),
    ]

    assert hourly_spend(instances) == 2 * L4_PER_HOUR


def test_the_worst_case_price_is_the_dearest_on_demand_offering() -> None:
    catalog = PriceCatalog.load()
    request = LaunchRequest(gpu_types=("nvidia-tesla-t4", "nvidia-l4"), spot=True)

    assert worst_case_price_nanousd(catalog, request) == L4_PER_HOUR


@pytest.mark.parametrize(
    "changes",
    [{"min_instances": 5, "max_instances": 2}, {"slots_per_instance": 0}, {"boot_smoothing": 0}],
)
def test_an_inconsistent_policy_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _policy(**changes)


def test_a_launch_is_sized_with_its_gpu_types_boots_not_the_fleets() -> None:
    # 10 tasks of 60 s, two boots of work per new instance. L4s have booted in 60 s (3 boots
    # of work each: 5 worth starting); a fleet-wide estimate pulled up by slow H100 boots
    # would have started fewer.
    scaler = Autoscaler(_policy(launch_work_boots=2.0, default_run_s=60.0, boot_smoothing=1.0))
    scaler.observe_boot(400.0, "nvidia-h100-80gb")
    scaler.observe_boot(60.0, "nvidia-l4")
    scaler.observe_boot(400.0, "nvidia-h100-80gb")

    decision = scaler.decide(Snapshot(queue_depth=10), now_s=0.0)

    assert scaler.boot_time_s == 400.0
    assert _launched(decision) == 5
    fleetwide = Autoscaler(_policy(launch_work_boots=2.0, default_run_s=60.0, boot_smoothing=1.0))
    fleetwide.observe_boot(400.0)  # the same fleet, boots not told apart by type
    assert _launched(fleetwide.decide(Snapshot(queue_depth=10), now_s=0.0)) == 1


def test_a_launch_whose_first_type_is_held_is_sized_with_the_boots_of_the_type_launched() -> None:
    # The loop drops held types from a launch (backoff): an L4 launch held after a stuck boot
    # goes to T4, which boots in 400 s, so it is sized with T4's boots, not L4's 60 s.
    policy = _policy(
        launch_request=LaunchRequest(gpu_types=("nvidia-l4", "nvidia-tesla-t4")),
        launch_work_boots=2.0,
        default_run_s=60.0,
        boot_smoothing=1.0,
    )

    def learned() -> Autoscaler:
        scaler = Autoscaler(policy)
        scaler.observe_boot(60.0, "nvidia-l4")
        scaler.observe_boot(400.0, "nvidia-tesla-t4")
        return scaler

    free = Snapshot(queue_depth=10)
    held = Snapshot(queue_depth=10, held_types=frozenset({"nvidia-l4"}))

    assert _launched(learned().decide(free, now_s=0.0)) == 5  # 60 s boots: 5 worth starting
    assert _launched(learned().decide(held, now_s=0.0)) == 1  # 400 s boots: only the first
