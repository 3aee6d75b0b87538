"""The cost simulator's accounting, and that it drives the broker's real autoscaler."""

from __future__ import annotations

import pytest

from bench.cost.__main__ import setup, simulate
from bench.cost.policies import Autostop, Ours
from bench.cost.sim import SimConfig, Simulation, percentile
from bench.cost.traces import TRACES, SimTask, Trace, make_trace

PRICE = 0.36  # USD per hour: 0.0001 per second


def _one_task(boot_s: float, run_s: float) -> Simulation:
    config = SimConfig(interval_s=5.0, boot_range_s=(boot_s, boot_s), price_per_hour_usd=PRICE)
    trace = Trace("one", (SimTask(0.0, run_s),))
    return Simulation(trace, Autostop(0.0), config, seed=0)


def test_one_task_on_one_vm_costs_boot_run_and_idle_until_the_stopping_tick() -> None:
    # Launched at the tick at 0, connected at 100, runs 100..133; the tick at 135 stops it.
    result = _one_task(boot_s=100.0, run_s=33.0).run()
    assert result.launches == 1
    assert result.vm_seconds == pytest.approx(100.0 + 33.0 + 2.0)
    assert result.vm_cost_usd == pytest.approx(135 * 0.0001)
    assert result.billed_usd == pytest.approx(33 * 0.0001)
    assert list(result.waits_s) == pytest.approx([100.0])
    assert result.never_ran == 0


def test_a_vm_stopped_sooner_is_billed_the_60_s_minimum() -> None:
    result = _one_task(boot_s=10.0, run_s=5.0).run()  # stopped at 15 s
    assert result.vm_seconds == pytest.approx(60.0)
    assert result.billed_usd == pytest.approx(5 * 0.0001)


def test_two_tasks_sharing_a_device_share_it_and_bill_its_busy_time_once() -> None:
    # Both start when the VM connects at 10 s and run at half speed: they end together at 90 s.
    config = SimConfig(boot_range_s=(10.0, 10.0), price_per_hour_usd=PRICE)
    trace = Trace("pair", (SimTask(0.0, 40.0), SimTask(0.0, 40.0)))
    result = Simulation(trace, Autostop(0.0), config, seed=0).run()
    assert result.launches == 1
    assert result.task_seconds == pytest.approx(80.0)
    assert result.busy_seconds == pytest.approx(80.0)
    assert result.vm_seconds == pytest.approx(90.0)
    assert list(result.waits_s) == pytest.approx([10.0, 10.0])


def test_a_task_joining_a_busy_device_slows_the_one_running() -> None:
    # A runs alone 10..20 (10 of its 30 s done), then shares with B (10 s): B ends at 40,
    # A has 10 s left and ends at 50.
    config = SimConfig(boot_range_s=(10.0, 10.0), price_per_hour_usd=PRICE)
    trace = Trace("join", (SimTask(0.0, 30.0), SimTask(20.0, 10.0)))
    sim = Simulation(trace, Autostop(0.0), config, seed=0)
    result = sim.run()
    assert result.launches == 1
    assert result.busy_seconds == pytest.approx(40.0)
    assert sim.vms[0].ended_s == pytest.approx(50.0)


def test_the_real_policy_launches_nothing_for_no_work() -> None:
    policy, config, price = setup()
    result = Simulation(Trace("empty", ()), Ours(policy, price), config, seed=0).run()
    assert result.launches == 0
    assert result.vm_seconds == 0


def test_the_real_policy_runs_with_the_deployed_parameters_and_learns_boots() -> None:
    policy, config, price = setup()
    assert (config.slots, config.max_instances, config.interval_s) == (2, 4, 5.0)
    assert policy.default_boot_s == 300.0
    ours = Ours(policy, price)
    trace = Trace("one", (SimTask(0.0, 20.0),))
    result = Simulation(trace, ours, config, seed=0).run()
    assert result.launches == 1
    assert result.busy_seconds == pytest.approx(20.0)
    assert ours.autoscaler.boot_time_s < 300.0  # observed a 60-120 s boot


def test_runs_are_deterministic_per_seed() -> None:
    assert make_trace("bursty-day", 1) == make_trace("bursty-day", 1)
    assert make_trace("bursty-day", 1) != make_trace("bursty-day", 2)
    slow = make_trace("bursty-day-slow-boot", 1)
    assert slow.slow_boot and slow.tasks == make_trace("bursty-day", 1).tasks
    assert simulate("small-bursts", "ours", [0]) == simulate("small-bursts", "ours", [0])


@pytest.mark.parametrize("trace", TRACES)
def test_every_trace_finishes_all_its_tasks_under_every_baseline(trace: str) -> None:
    policy, config, price = setup()
    for controller in (Ours(policy, price), Autostop(0.0)):
        sim = Simulation(make_trace(trace, 0), controller, config, seed=0)
        result = sim.run()
        assert sim.all_done
        assert len(result.waits_s) == len(sim.trace.tasks)
        assert result.busy_seconds <= result.vm_seconds


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.95) == 0.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
