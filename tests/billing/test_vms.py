"""VM uptime on SQLite and PostgreSQL: recording, cost against hand-computed figures, reports."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from gpubroker.billing.__main__ import cli
from gpubroker.billing.ledger import UsageRecord, record_usage
from gpubroker.billing.migrate import current_revision, downgrade, upgrade
from gpubroker.billing.models import vm_instances
from gpubroker.billing.prices import PriceCatalog
from gpubroker.billing.report import render_overhead
from gpubroker.billing.vms import (
    EndReason,
    VmCostLine,
    VmLaunch,
    idle_overhead,
    record_connected,
    record_created,
    record_deleted,
    record_running,
    vm_cost,
)

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
SPOT_L4 = 280_000_000
"""$0.28 an hour."""
ON_DEMAND_L4 = 710_000_000
"""$0.71 an hour, the catalog's tenant price for nvidia-l4 too."""
TENTH_OF_A_MILLI_PER_S = 360_000_000
"""$0.36 an hour: exactly 100,000 nano-dollars a second."""


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def launch(name: str, price: int = SPOT_L4, gpu: str = "nvidia-l4") -> VmLaunch:
    return VmLaunch(
        name=name, provider="gce", zone="us-central1-a", gpu_type=gpu,
        machine_type="g2-standard-4", spot=price == SPOT_L4, price_per_hour_nanousd=price,
        price_version="2026-11-01",
    )  # fmt: skip


def machine(
    engine: sa.Engine,
    name: str,
    running: timedelta | None,
    deleted: timedelta | None,
    *,
    price: int = SPOT_L4,
    gpu: str = "nvidia-l4",
) -> None:
    """A machine created at T0 that ran from T0 + ``running`` until T0 + ``deleted``."""
    record_created(engine, launch(name, price, gpu), T0)
    if running is not None:
        record_running(engine, name, T0 + running)
    if deleted is not None:
        record_deleted(engine, name, T0 + deleted, EndReason.IDLE)


def row(engine: sa.Engine, name: str) -> dict[str, object]:
    with engine.connect() as conn:
        found = conn.execute(sa.select(vm_instances).where(vm_instances.c.name == name)).one()
    return dict(found._mapping)


# Schema ---------------------------------------------------------------------------------------


def test_migration_0004_creates_and_drops_the_vm_instances_table(empty_engine: sa.Engine) -> None:
    upgrade(empty_engine, "0004")
    columns = {c["name"] for c in sa.inspect(empty_engine).get_columns("vm_instances")}

    downgrade(empty_engine, "0003")

    later = {"connected_at", "agent_started_at"}  # 0010, 0011
    assert columns == {c.name for c in vm_instances.columns} - later
    assert current_revision(empty_engine) == "0003"
    assert not sa.inspect(empty_engine).has_table("vm_instances")


# Recording ------------------------------------------------------------------------------------


def test_a_machine_life_is_recorded_and_repeated_calls_move_nothing(engine: sa.Engine) -> None:
    assert record_created(engine, launch("vm-1"), T0)
    assert record_running(engine, "vm-1", T0 + s(30))
    assert record_deleted(engine, "vm-1", T0 + s(600), EndReason.PREEMPTED)

    assert not record_created(engine, launch("vm-1", price=ON_DEMAND_L4), T0 + s(5))
    assert not record_running(engine, "vm-1", T0 + s(40))
    assert not record_deleted(engine, "vm-1", T0 + s(700), EndReason.IDLE)

    assert row(engine, "vm-1") == {
        "name": "vm-1", "provider": "gce", "zone": "us-central1-a", "gpu_type": "nvidia-l4",
        "machine_type": "g2-standard-4", "spot": True, "price_per_hour_nanousd": SPOT_L4,
        "price_version": "2026-11-01", "created_at": T0, "running_at": T0 + s(30),
        "deleted_at": T0 + s(600), "end_reason": "preempted", "connected_at": None,
        "agent_started_at": None,
    }  # fmt: skip


def test_migration_0011_adds_when_the_agent_started_and_keeps_the_rows(
    empty_engine: sa.Engine,
) -> None:
    upgrade(empty_engine, "0010")
    record_created(empty_engine, launch("vm-1"), T0)  # names only the columns 0010 has

    upgrade(empty_engine, "0011")
    record_connected(empty_engine, "vm-1", T0 + s(90), T0 + s(80))
    after = row(empty_engine, "vm-1")
    downgrade(empty_engine, "0010")

    assert (after["agent_started_at"], after["connected_at"]) == (T0 + s(80), T0 + s(90))
    columns = {c["name"] for c in sa.inspect(empty_engine).get_columns("vm_instances")}
    assert "agent_started_at" not in columns and "connected_at" in columns


def test_unknown_or_deleted_machines_are_not_marked_running(engine: sa.Engine) -> None:
    machine(engine, "vm-1", running=None, deleted=s(10))

    assert not record_running(engine, "vm-1", T0 + s(20))
    assert not record_running(engine, "nope", T0)
    assert not record_deleted(engine, "nope", T0, EndReason.ORPHAN)
    assert row(engine, "vm-1")["running_at"] is None


def test_recording_on_a_connection_joins_the_callers_transaction(engine: sa.Engine) -> None:
    with pytest.raises(RuntimeError), engine.begin() as conn:
        record_created(conn, launch("vm-1"), T0)
        raise RuntimeError("roll back")

    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(vm_instances)).scalar() == 0


# Cost -----------------------------------------------------------------------------------------


def test_a_spot_l4_for_90_seconds_costs_exactly_seven_million_nanousd(engine: sa.Engine) -> None:
    machine(engine, "vm-1", running=s(10), deleted=s(100))

    cost = vm_cost(engine)

    assert cost.total.cost_nanousd == 7_000_000
    assert cost.total.charged_seconds == Decimal(90)
    assert [(line.gpu_type, line.vms) for line in cost.lines] == [("nvidia-l4", 1)]


def test_a_machine_alive_20_seconds_is_charged_a_minute(engine: sa.Engine) -> None:
    machine(engine, "vm-1", running=s(0), deleted=s(20))

    cost = vm_cost(engine)

    assert cost.total.charged_seconds == Decimal(60)
    assert cost.total.cost_nanousd == 4_666_667  # 280,000,000 * 60 / 3600, half-up


def test_part_of_a_second_is_charged_as_a_whole_second(engine: sa.Engine) -> None:
    machine(engine, "vm-1", running=s(0), deleted=s(90.2))

    cost = vm_cost(engine)

    assert cost.total.charged_seconds == Decimal(91)
    assert cost.total.cost_nanousd == 7_077_778  # 280,000,000 * 91 / 3600 = 7,077,777.8


def test_the_charge_is_clipped_at_the_range_edges(engine: sa.Engine) -> None:
    machine(engine, "vm-1", running=s(0), deleted=s(3600), price=ON_DEMAND_L4)

    middle = vm_cost(engine, T0 + s(900), T0 + s(2700))
    before = vm_cost(engine, T0 - s(3600), T0 + s(900))
    after = vm_cost(engine, T0 + s(2700), T0 + s(7200))
    outside = vm_cost(engine, T0 + s(3600), T0 + s(7200))

    assert middle.total.cost_nanousd == 355_000_000
    assert before.total.cost_nanousd == after.total.cost_nanousd == 177_500_000
    assert outside.total == VmCostLine("TOTAL", 0, Decimal(0), 0)
    assert outside.lines == ()


def test_the_minimum_minute_falls_after_the_life_and_ranges_split_it(engine: sa.Engine) -> None:
    machine(engine, "vm-1", running=s(0), deleted=s(20), price=TENTH_OF_A_MILLI_PER_S)

    first = vm_cost(engine, T0, T0 + s(30))
    second = vm_cost(engine, T0 + s(30), T0 + s(300))
    later = vm_cost(engine, T0 + s(60), T0 + s(300))

    assert first.total.cost_nanousd == second.total.cost_nanousd == 3_000_000
    assert later.total.vms == 0


def test_a_running_machine_is_charged_up_to_now_or_the_range_end(engine: sa.Engine) -> None:
    machine(engine, "vm-1", running=s(0), deleted=None, price=TENTH_OF_A_MILLI_PER_S)
    now = T0 + s(600)

    assert vm_cost(engine, now=now).total.cost_nanousd == 60_000_000
    assert vm_cost(engine, T0, T0 + s(300), now=now).total.cost_nanousd == 30_000_000
    assert vm_cost(engine, T0, T0 + s(3600), now=now).total.cost_nanousd == 60_000_000
    # Twenty seconds in, it already owes its first minute.
    assert vm_cost(engine, now=T0 + s(20)).total.cost_nanousd == 6_000_000


def test_a_machine_never_seen_running_is_charged_from_its_creation(engine: sa.Engine) -> None:
    machine(engine, "vm-1", running=None, deleted=s(120), price=TENTH_OF_A_MILLI_PER_S)

    assert vm_cost(engine).total.cost_nanousd == 12_000_000


def test_costs_are_totalled_per_gpu_type_and_overall(engine: sa.Engine) -> None:
    machine(engine, "l4-a", running=s(0), deleted=s(90))
    machine(engine, "l4-b", running=s(0), deleted=s(20))
    machine(engine, "t4", running=s(0), deleted=s(100), price=TENTH_OF_A_MILLI_PER_S, gpu="t4")

    cost = vm_cost(engine)

    assert [(x.gpu_type, x.vms, x.charged_seconds, x.cost_nanousd) for x in cost.lines] == [
        ("nvidia-l4", 2, Decimal(150), 7_000_000 + 4_666_667),
        ("t4", 1, Decimal(100), 10_000_000),
    ]
    assert (cost.total.vms, cost.total.cost_nanousd) == (3, 21_666_667)


# Reports --------------------------------------------------------------------------------------


def billed(engine: sa.Engine) -> None:
    """One L4 hour of machine time (0.71/h), 90 s of boot, 900 s billed; 7.2 s of CPU, no VM."""
    machine(engine, "vm-1", running=s(0), deleted=None, price=ON_DEMAND_L4)
    record_connected(engine, "vm-1", T0 + s(90))
    record_deleted(engine, "vm-1", T0 + s(3600), EndReason.IDLE)
    catalog = PriceCatalog.load()
    with engine.begin() as conn:
        for task_id, gpu, seconds in (("a", "nvidia-l4", 600.0), ("b", "nvidia-l4", 300.0)):
            record = UsageRecord(task_id, "alpha", "matmul", "vm-1", gpu, 1, 1.0, seconds, 1, 1)
            record_usage(conn, record, catalog, T0 + s(60))
        record = UsageRecord("c", "beta", "matmul", "local", "cpu", 1, 1.0, 7.2, 1, 1)
        record_usage(conn, record, catalog, T0 + s(60))


def test_the_overhead_sets_vm_cost_beside_billed_compute(engine: sa.Engine) -> None:
    billed(engine)

    lines = idle_overhead(engine, T0, T0 + s(3600))

    cpu, l4 = lines
    assert (l4.vm_cost_nanousd, l4.billed_nanousd, l4.idle_nanousd) == (
        710_000_000, 177_500_000, 532_500_000,
    )  # fmt: skip
    assert l4.idle_percent == Decimal(75)
    assert (cpu.vms, cpu.vm_cost_nanousd, cpu.idle_nanousd) == (0, 0, -100_000)
    assert cpu.idle_percent is None


def test_the_overhead_table_shows_exact_totals_and_the_percentage(engine: sa.Engine) -> None:
    billed(engine)

    table = render_overhead(idle_overhead(engine, T0, T0 + s(3600)), "table")

    (l4,) = [line for line in table.splitlines() if "nvidia-l4" in line]
    (total,) = [line for line in table.splitlines() if "TOTAL" in line]
    assert "$0.710000000" in l4 and "$0.532500000" in l4 and "75.00" in l4
    assert "$0.177600000" in total and "$0.532400000" in total and "74.99" in total


def overhead(engine: sa.Engine, *args: str) -> Result:
    url = engine.url.render_as_string(hide_password=False)
    since_until = ["--since", "2026-11-24T12:00:00", "--until", "2026-11-24T13:00:00"]
    return CliRunner().invoke(cli, ["overhead", "--database-url", url, *since_until, *args])


def test_the_overhead_json_has_exact_money_and_percentages(engine: sa.Engine) -> None:
    billed(engine)

    result = overhead(engine, "--format", "json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [g["gpu_type"] for g in report["groups"]] == ["cpu", "nvidia-l4"]
    assert report["groups"][0]["idle_overhead_pct"] is None
    assert report["groups"][0]["idle_overhead_usd"] == "-0.000100000"
    assert report["total"] == {
        "gpu_type": "TOTAL", "vms": 1, "vm_s": 3600.0,
        "vm_cost_usd": "0.710000000", "vm_cost_nanousd": 710_000_000,
        "boot_s": 90.0, "boot_cost_usd": "0.017750000", "boot_cost_nanousd": 17_750_000,
        "tasks": 3, "compute_s": 907.2,
        "billed_usd": "0.177600000", "billed_nanousd": 177_600_000,
        "idle_overhead_usd": "0.532400000", "idle_overhead_nanousd": 532_400_000,
        "idle_overhead_pct": "74.99",  # 532.4 / 710 = 74.9859...
    }  # fmt: skip


def test_the_overhead_csv_has_a_row_per_gpu_type_and_a_total(engine: sa.Engine) -> None:
    billed(engine)

    result = overhead(engine, "--format", "csv")

    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert [
        (r["gpu_type"], r["vm_cost_usd"], r["billed_usd"], r["idle_overhead_pct"]) for r in rows
    ] == [
        ("cpu", "0.000000000", "0.000100000", ""),
        ("nvidia-l4", "0.710000000", "0.177500000", "75.00"),
        ("TOTAL", "0.710000000", "0.177600000", "74.99"),
    ]
    assert rows[-1]["vm_s"] == "3600.000000"


def test_the_overhead_of_a_range_with_nothing_in_it_is_zero(engine: sa.Engine) -> None:
    billed(engine)

    result = overhead(engine, "--format", "csv", "--since", "2027-01-01")

    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1:] == [
        "TOTAL,0,0.000000,0.000000,0.000000000,0.000000000,0,0.000000,0.000000000,0.000000000,"
    ]


def test_a_database_without_the_vm_table_is_a_clear_error(engine: sa.Engine) -> None:
    vm_instances.drop(engine)

    result = overhead(engine)
    vm_instances.create(engine)

    assert result.exit_code == 1
    assert "has no vm_instances table" in result.output
