"""Per-requirement scale-up: the cheapest configured type that fits, booting machines counted
only for what they fit. Pure decisions on a made-up clock, plus the config loader's prices."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from gpubroker.billing.prices import PriceCatalog
from gpubroker.broker.model import GpuRequirement
from gpubroker.broker.scaling.config import load_scaling_config, offers_of
from gpubroker.broker.scaling.demand import Demand, GpuChoice
from gpubroker.broker.scaling.policy import Autoscaler, InstanceSnapshot, ScalingPolicy, Snapshot
from gpubroker.broker.scaling.providers.base import InstanceStatus, LaunchRequest

GIB = 1 << 30
CHOICES = (
    GpuChoice("nvidia-tesla-a100", 40 * GIB, 1_800_000_000, 3_670_000_000),
    GpuChoice("nvidia-l4", 24 * GIB, 280_000_000, 710_000_000),
    GpuChoice("nvidia-tesla-t4", 16 * GIB, 215_000_000, 540_000_000),
)
POLICY = ScalingPolicy(
    launch_request=LaunchRequest(gpu_types=tuple(c.gpu_type for c in CHOICES), spot=True),
    launch_price_nanousd=3_670_000_000,
    choices=CHOICES,
    max_instances=10,
    slots_per_instance=2,
    launch_work_boots=0.0,  # count slots only: sizing is tested in test_policy.py
)


def _booting(name: str, gpu_type: str) -> InstanceSnapshot:
    return InstanceSnapshot(name, InstanceStatus.RUNNING, gpu_type, True, 0, created_at_s=0.0)


def test_tasks_needing_memory_launch_the_cheapest_type_that_fits_with_fallbacks_by_price() -> None:
    demand = Demand(GpuRequirement(None, 20 * GIB), queued=3)

    decision = Autoscaler(POLICY).decide(Snapshot(queue_depth=3, demands=[demand]), now_s=0.0)

    assert decision.launch is not None
    assert decision.launch.count == 2
    assert tuple(decision.launch.request.gpu_types) == ("nvidia-l4", "nvidia-tesla-a100")
    assert decision.launch.request.spot
    assert "3 queued tasks needing any GPU with at least 20.0 GiB" in decision.launch.reason


def test_each_requirement_short_of_slots_gets_its_own_launch() -> None:
    demands = [
        Demand(GpuRequirement("nvidia-tesla-a100"), queued=1),
        Demand(GpuRequirement("nvidia-tesla-t4"), queued=1),
    ]

    decision = Autoscaler(POLICY).decide(Snapshot(queue_depth=2, demands=demands), now_s=0.0)

    launched = {tuple(launch.request.gpu_types): launch.count for launch in decision.launches}
    assert launched == {("nvidia-tesla-a100",): 1, ("nvidia-tesla-t4",): 1}


def test_a_booting_machine_serves_only_the_requirements_its_type_fits() -> None:
    booting_t4 = [_booting("vm-0", "nvidia-tesla-t4")]
    fits = Demand(GpuRequirement(None, 8 * GIB), queued=2)
    does_not_fit = Demand(GpuRequirement("nvidia-l4"), queued=2)

    absorbed = Autoscaler(POLICY).decide(
        Snapshot(queue_depth=2, demands=[fits], instances=booting_t4), now_s=0.0
    )
    launched = Autoscaler(POLICY).decide(
        Snapshot(queue_depth=2, demands=[does_not_fit], instances=booting_t4), now_s=0.0
    )

    assert absorbed.launch is None
    assert launched.launch is not None and launched.launch.count == 1
    assert tuple(launched.launch.request.gpu_types) == ("nvidia-l4",)


def test_work_no_connected_agent_may_run_is_demand_even_beside_idle_agents() -> None:
    # Given free slots elsewhere, but none that may run this workload (free_slots=0 for it)
    demand = Demand(GpuRequirement(), queued=1, free_slots=0)

    decision = Autoscaler(POLICY).decide(
        Snapshot(queue_depth=1, free_slots=4, demands=[demand]), now_s=0.0
    )

    assert decision.launch is not None and decision.launch.count == 1
    assert decision.launch.request == POLICY.launch_request  # unconstrained: the operator's order


def test_free_slots_that_may_run_the_work_launch_nothing() -> None:
    demand = Demand(GpuRequirement("nvidia-l4"), queued=2, free_slots=2)

    decision = Autoscaler(POLICY).decide(Snapshot(queue_depth=2, demands=[demand]), now_s=0.0)

    assert decision.launches == ()


def test_the_spend_cap_counts_earlier_launches_of_the_same_decision() -> None:
    policy = dataclasses.replace(POLICY, max_hourly_spend_nanousd=4_000_000_000)
    demands = [
        Demand(GpuRequirement("nvidia-tesla-a100"), queued=1),
        Demand(GpuRequirement("nvidia-l4"), queued=1),
    ]

    decision = Autoscaler(policy).decide(Snapshot(queue_depth=2, demands=demands), now_s=0.0)

    counts = {tuple(launch.request.gpu_types): launch.count for launch in decision.launches}
    assert counts == {("nvidia-tesla-a100",): 1, ("nvidia-l4",): 0}


def test_the_loader_prices_each_configured_type_and_knows_its_memory(tmp_path: Path) -> None:
    path = tmp_path / "scaling.toml"
    path.write_text('[policy]\ngpu_types = ["nvidia-tesla-a100", "nvidia-l4"]\nspot = true\n')

    config = load_scaling_config(path, "gce", PriceCatalog.load())

    assert config.policy.choices == (
        GpuChoice("nvidia-tesla-a100", 40 * GIB, 1_800_000_000, 3_670_000_000),
        GpuChoice("nvidia-l4", 24 * GIB, 280_000_000, 710_000_000),
    )
    assert [str(o) for o in offers_of(config)] == [
        "nvidia-tesla-a100 (40 GiB)",
        "nvidia-l4 (24 GiB)",
    ]


def test_the_local_providers_cpu_agents_offer_this_hosts_memory() -> None:
    config = load_scaling_config(None, "local", PriceCatalog.load())

    (offer,) = offers_of(config)

    assert offer.gpu_type == "cpu"
    assert offer.memory_bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
