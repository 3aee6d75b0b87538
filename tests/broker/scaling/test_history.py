"""The boots and run times earlier brokers recorded, read back for the policy (both backends)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from gpubroker.billing.models import usage
from gpubroker.billing.vms import VmLaunch, record_connected, record_created
from gpubroker.broker.scaling.history import recorded_boots, recorded_runs

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def _machine(
    engine: sa.Engine, name: str, gpu_type: str, created_min: float, boot_s: float | None,
    provider: str = "gce",
) -> None:  # fmt: skip
    created = T0 + timedelta(minutes=created_min)
    vm = VmLaunch(name, provider, "us-central1-a", gpu_type, "g2-standard-4", False, 1, "v1")
    assert record_created(engine, vm, created)
    if boot_s is not None:
        assert record_connected(engine, name, created + timedelta(seconds=boot_s))


def test_boots_come_back_oldest_first_per_provider_and_within_the_timeout(
    engine: sa.Engine,
) -> None:
    _machine(engine, "vm-1", "nvidia-l4", 0, 80.0)
    _machine(engine, "vm-2", "nvidia-h100-80gb", 1, 310.0)
    _machine(engine, "vm-3", "nvidia-l4", 2, None)  # never connected: no boot to learn
    _machine(engine, "vm-4", "nvidia-l4", 3, 7_200.0)  # seen two hours late: not a boot
    _machine(engine, "local-1", "cpu", 4, 3.0, provider="local")
    _machine(engine, "vm-5", "nvidia-l4", 5, 100.5)

    assert recorded_boots(engine, "gce", longest_s=600.0) == [
        ("nvidia-l4", 80.0),
        ("nvidia-h100-80gb", 310.0),
        ("nvidia-l4", 100.5),
    ]
    assert recorded_boots(engine, "local", longest_s=600.0) == [("cpu", 3.0)]


def test_only_the_last_boots_of_each_type_are_read(engine: sa.Engine) -> None:
    for i in range(6):
        _machine(engine, f"l4-{i}", "nvidia-l4", i, 60.0 + i)
    _machine(engine, "h100-0", "nvidia-h100-80gb", 0, 300.0)  # older than most, still read

    boots = recorded_boots(engine, "gce", longest_s=600.0, per_type=2)

    assert boots == [("nvidia-h100-80gb", 300.0), ("nvidia-l4", 64.0), ("nvidia-l4", 65.0)]


def test_run_times_are_the_last_succeeded_tasks_oldest_first(engine: sa.Engine) -> None:
    rows = [
        {
            "task_id": f"t{i}", "tenant": "a", "workload": "w", "agent_id": "ag",
            "gpu_type": "cpu", "attempt": 1, "queue_wait_seconds": 0.0,
            "compute_seconds": float(i), "bytes_in": 0, "bytes_out": 0,
            "price_per_hour_nanousd": 1, "cost_nanousd": 0, "price_version": "v1",
            "created_at": T0,
        }
        for i in range(1, 6)
    ]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(usage.insert(), rows)

    assert recorded_runs(engine, limit=3) == [3.0, 4.0, 5.0]
    assert recorded_runs(engine) == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_an_empty_history_teaches_nothing(engine: sa.Engine) -> None:
    assert recorded_boots(engine, "gce", longest_s=600.0) == []
    assert recorded_runs(engine) == []
