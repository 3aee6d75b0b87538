"""Slot busy time, the agent's /metrics utilization counter: windows summed, not shared."""

from __future__ import annotations

from gpubroker.gpu_agent.meter import DeviceMeter
from tests.gpu_agent.test_meter import FakeClock


def test_overlapping_windows_count_once_each_in_slot_time_and_once_in_device_time() -> None:
    clock = FakeClock()
    meter = DeviceMeter(clock)

    first = meter.enter()
    clock.at(2)
    second = meter.enter()
    clock.at(6)
    meter.leave(first)
    clock.at(7)
    meter.leave(second)
    clock.at(20)  # idle time counts for neither

    assert meter.slot_seconds == 6 + 5
    assert meter.busy_seconds == 7
    assert meter.billed_seconds == 7
