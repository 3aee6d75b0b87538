"""The overhead report against hand-built machine and usage rows, on SQLite and PostgreSQL.

VM time runs from RUNNING (or the agent's connection, if seen first) to deletion, with GCE's
60 s minimum and none for ``local`` agents; boot runs from there to the agent's connection. The
report's idle figure must be, to the nano-dollar, the machines' cost less the usage rows' cost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa

from gpubroker.billing.ledger import UsageRecord, record_usage
from gpubroker.billing.models import usage
from gpubroker.billing.prices import PriceCatalog
from gpubroker.billing.report import render_overhead
from gpubroker.billing.vms import (
    MINIMUM_CHARGE,
    EndReason,
    VmLaunch,
    idle_overhead,
    minimum_charge,
    overhead_total,
    record_connected,
    record_created,
    record_deleted,
    record_running,
)
from gpubroker.broker.scaling.loop import load_scaling_config

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
MICROS_PER_HOUR = 3_600_000_000


def at(seconds: float | None) -> datetime | None:
    return None if seconds is None else T0 + timedelta(seconds=seconds)


@dataclass(frozen=True)
class Machine:
    """A machine's life in seconds after T0, and what the report should charge, worked by hand."""

    name: str
    provider: str
    gpu_type: str
    price: int
    created: float
    running: float | None
    connected: float | None
    deleted: float
    charged: tuple[float, float]
    """[begin, end) of its charge, in seconds after T0."""
    boot: tuple[float, float]
    """[begin, end) of its boot."""


MACHINES = (
    # Charged RUNNING to deletion: 959.7 s, rounded up to 960 s; booted 86.75 s.
    Machine("a", "gce", "nvidia-l4", 283_333_333, 0, 40.5, 127.25, 1000.2, (40.5, 1000.5),
            (40.5, 127.25)),
    # Lived 35 s, charged GCE's minute; booted 30 s.
    Machine("b", "gce", "nvidia-l4", 283_333_333, 10, 20, 50, 55, (20, 80), (20, 50)),
    # Its agent connected before the loop saw RUNNING: the charge starts at the connection.
    Machine("f", "gce", "nvidia-l4", 283_333_333, 250, 300, 290, 400, (290, 400), (290, 290)),
    # Stuck: its agent never connected, so its whole charge is boot.
    Machine("c", "gce", "nvidia-tesla-t4", 123_456_789, 0, 30, None, 200, (30, 200), (30, 200)),
    # Local agents: no minimum, whole seconds rounded up.
    Machine("d", "local", "cpu", 7_777_777, 0, 1, 3.5, 20.000001, (1, 21), (1, 3.5)),
    Machine("e", "local", "cpu", 7_777_777, 0, 0, 1, 5, (0, 5), (0, 1)),
)  # fmt: skip

USAGE = (  # task id, GPU type, compute seconds, recorded at (seconds after T0)
    ("t1", "nvidia-l4", 123.456789, 130),
    ("t2", "nvidia-l4", 600.5, 800),
    ("t3", "nvidia-tesla-t4", 17.3, 100),
    ("t4", "cpu", 9.99, 15),
    ("t5", "cpu", 0.25, 4),
)


def build(engine: sa.Engine) -> None:
    """Writes MACHINES as the scaling loop would, and USAGE as the broker does."""
    for m in MACHINES:
        vm = VmLaunch(m.name, m.provider, "zone-a", m.gpu_type, "type", False, m.price, "v1")
        assert record_created(engine, vm, T0 + timedelta(seconds=m.created))
        if m.running is not None:
            assert record_running(engine, m.name, T0 + timedelta(seconds=m.running))
        if m.connected is not None:
            assert record_connected(engine, m.name, T0 + timedelta(seconds=m.connected))
        assert record_deleted(engine, m.name, T0 + timedelta(seconds=m.deleted), EndReason.IDLE)
    catalog = PriceCatalog.load()
    with engine.begin() as conn:
        for task_id, gpu, seconds, when in USAGE:
            record = UsageRecord(task_id, "alpha", "matmul", "agent", gpu, 1, 0.5, seconds, 1, 1)
            record_usage(conn, record, catalog, T0 + timedelta(seconds=when))


def overlap_micros(interval: tuple[float, float], start: float, end: float) -> int:
    low, high = max(interval[0], start), min(interval[1], end)
    return max(round((high - low) * 1_000_000), 0)


def half_up_nanousd(micros: int, price: int) -> int:
    """micros of an hour at price, rounded half up (independent of billing.prices)."""
    whole, rest = divmod(micros * price, MICROS_PER_HOUR)
    return whole + (1 if 2 * rest >= MICROS_PER_HOUR else 0)


def expected(start: float, end: float) -> dict[str, tuple[int, int, int, int, int]]:
    """Per GPU type: (VMs, charged micros, cost, boot micros, boot cost) in [start, end)."""
    sums: dict[str, list[int]] = {}
    for m in MACHINES:
        micros = overlap_micros(m.charged, start, end)
        if micros:
            boot = overlap_micros(m.boot, start, end)
            values = (1, micros, half_up_nanousd(micros, m.price), boot)
            line = sums.setdefault(m.gpu_type, [0] * 5)
            for i, value in enumerate((*values, half_up_nanousd(boot, m.price))):
                line[i] += value
    return {gpu: (s[0], s[1], s[2], s[3], s[4]) for gpu, s in sums.items()}


def billed_by_usage_rows(engine: sa.Engine, start: float, end: float) -> dict[str, int]:
    """The usage rows' cost per GPU type in [start, end), summed straight from the table."""
    query = (
        sa.select(usage.c.gpu_type, sa.func.sum(usage.c.cost_nanousd))
        .where(usage.c.created_at >= at(start), usage.c.created_at < at(end))
        .group_by(usage.c.gpu_type)
    )
    with engine.connect() as conn:
        return {gpu: int(total) for gpu, total in conn.execute(query).all()}


@pytest.mark.parametrize("start, end", [(0, 3600), (50, 150), (2, 25)])
def test_idle_is_vm_cost_less_billed_compute_to_the_nano_dollar(
    engine: sa.Engine, start: float, end: float
) -> None:
    build(engine)
    machines, billed = expected(start, end), billed_by_usage_rows(engine, start, end)

    lines = idle_overhead(engine, at(start), at(end), now=at(5000))
    total = overhead_total(lines)

    assert [line.gpu_type for line in lines] == sorted(machines.keys() | billed.keys())
    for line in lines:
        vms, micros, cost, boot_micros, boot_cost = machines.get(line.gpu_type, (0, 0, 0, 0, 0))
        assert (line.vms, line.vm_cost_nanousd) == (vms, cost)
        assert line.vm_seconds * 1_000_000 == micros
        assert line.boot_seconds * 1_000_000 == boot_micros
        assert line.boot_cost_nanousd == boot_cost
        assert line.billed_nanousd == billed.get(line.gpu_type, 0)
        assert line.idle_nanousd == cost - billed.get(line.gpu_type, 0)
    vm_total = sum(m[2] for m in machines.values())
    assert total.vm_cost_nanousd == vm_total
    assert total.boot_cost_nanousd == sum(m[4] for m in machines.values())
    assert total.idle_nanousd == vm_total - sum(billed.values())

    report = json.loads(render_overhead(lines, "json"))
    assert report["total"]["idle_overhead_nanousd"] == vm_total - sum(billed.values())
    assert report["total"]["boot_cost_nanousd"] == total.boot_cost_nanousd
    assert {g["gpu_type"]: g["idle_overhead_nanousd"] for g in report["groups"]} == {
        line.gpu_type: line.idle_nanousd for line in lines
    }


def test_the_whole_day_charges_each_machine_by_the_rules(engine: sa.Engine) -> None:
    build(engine)

    lines = {line.gpu_type: line for line in idle_overhead(engine, now=at(5000))}

    # l4: 960 s + 60 s (minimum) + 110 s; boot 86.75 s + 30 s + 0 s.
    l4 = lines["nvidia-l4"]
    assert (l4.vm_seconds, l4.boot_seconds) == (Decimal(1130), Decimal("116.75"))
    # t4: never connected, all 170 s are boot.
    t4 = lines["nvidia-tesla-t4"]
    assert (t4.vm_seconds, t4.boot_seconds) == (Decimal(170), Decimal(170))
    # local: 20 s + 5 s, no minimum; boot 2.5 s + 1 s.
    assert (lines["cpu"].vm_seconds, lines["cpu"].boot_seconds) == (Decimal(25), Decimal("3.5"))


def test_the_csv_and_table_show_the_boot_columns(engine: sa.Engine) -> None:
    build(engine)
    lines = idle_overhead(engine, now=at(5000))

    header, *rows = render_overhead(lines, "csv").splitlines()
    table = render_overhead(lines, "table")

    assert header.split(",")[:6] == ["gpu_type", "vms", "vm_s", "boot_s", "vm_cost_usd",
                                     "boot_cost_usd"]  # fmt: skip
    assert rows[-1].startswith("TOTAL,6,1325.000000,290.250000,")
    assert "boot s" in table and "RUNNING to agent connected" in table


@pytest.mark.parametrize("provider", ["local", "gce"])
def test_the_policy_and_the_report_use_the_same_billing_minimum(provider: str) -> None:
    policy = load_scaling_config(None, provider, PriceCatalog.load()).policy

    assert policy.billing_minimum_s == minimum_charge(provider).total_seconds()


def test_gce_and_unknown_providers_have_a_minute_local_none() -> None:
    assert (
        minimum_charge("gce") == minimum_charge("other") == MINIMUM_CHARGE == timedelta(seconds=60)
    )
    assert minimum_charge("local") == timedelta(0)


def test_only_the_first_connection_of_a_live_machine_is_recorded(engine: sa.Engine) -> None:
    vm = VmLaunch("vm", "gce", "zone-a", "nvidia-l4", "type", True, 1, "v1")
    record_created(engine, vm, T0)

    assert record_connected(engine, "vm", T0 + timedelta(seconds=90))
    assert not record_connected(engine, "vm", T0 + timedelta(seconds=95))
    assert not record_connected(engine, "nope", T0)
    record_deleted(engine, "vm", T0 + timedelta(seconds=100), EndReason.IDLE)
    (line,) = idle_overhead(engine, now=at(5000))
    assert line.boot_seconds == 90  # from creation: RUNNING was never seen
