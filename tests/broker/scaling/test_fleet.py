"""Machine states and machine time per tick: what the spend and machine gauges are fed."""

from __future__ import annotations

from datetime import UTC, datetime

from gpubroker.broker.scaling.fleet import FleetClock
from gpubroker.broker.scaling.providers.base import Instance, InstanceStatus

HOURLY = 3_600_000_000_000  # 3600 USD an hour: a nano-dollar per micro-second, a dollar a second


def _vm(name: str, status: InstanceStatus, gpu_type: str = "nvidia-l4") -> Instance:
    return Instance(name, "z", gpu_type, "g2", False, status, datetime(2026, 1, 1, tzinfo=UTC))


def test_running_machines_are_charged_between_ticks_and_booting_ones_are_not() -> None:
    clock = FleetClock(lambda instance: HOURLY)
    up = _vm("up", InstanceStatus.RUNNING)
    booting = _vm("boot", InstanceStatus.PROVISIONING)
    connected = {"up"}.__contains__

    first = clock.tick([up, booting], connected, now_s=100.0)
    second = clock.tick([up, booting], connected, now_s=102.5)
    third = clock.tick([booting], connected, now_s=110.0)

    assert first.machines == {("running", "nvidia-l4"): 1, ("booting", "nvidia-l4"): 1}
    assert not first.seconds and not first.nanousd
    assert second.seconds == {"nvidia-l4": 2.5}
    assert second.nanousd == {"nvidia-l4": 2_500_000_000}  # 2.5 s at a dollar a second
    assert third.machines == {("booting", "nvidia-l4"): 1} and not third.seconds


def test_a_running_machine_without_its_agent_is_booting_and_a_stopping_one_still_costs() -> None:
    clock = FleetClock(lambda instance: HOURLY)
    silent = _vm("silent", InstanceStatus.RUNNING)
    stopping = _vm("stopping", InstanceStatus.STOPPING)
    gone = _vm("gone", InstanceStatus.TERMINATED)
    nobody = set[str]().__contains__

    clock.tick([silent, stopping, gone], nobody, now_s=0.0)
    tick = clock.tick([silent, stopping, gone], nobody, now_s=1.0)

    assert tick.machines == {("booting", "nvidia-l4"): 1, ("stopping", "nvidia-l4"): 1}
    assert tick.seconds == {"nvidia-l4": 2.0}
