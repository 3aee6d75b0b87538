"""The usage ledger and the price catalog, against hand-computed figures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from billing.errors import PriceCatalogError, UnknownPriceError
from billing.ledger import UsageRecord, record_usage, summaries, usage_rows
from billing.models import usage
from billing.prices import BillingPolicy, Price, PriceCatalog, cost_nanousd, format_usd

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def _record(
    task_id: str, tenant: str = "t1", seconds: float = 90.0, gpu: str = "nvidia-l4"
) -> UsageRecord:
    return UsageRecord(
        task_id=task_id, tenant=tenant, workload="matmul", agent_id="a1", gpu_type=gpu,
        attempt=1, queue_wait_seconds=2.0, compute_seconds=seconds, bytes_in=100, bytes_out=10,
    )  # fmt: skip


def test_90_seconds_on_an_l4_cost_exactly_a_fortieth_of_its_hourly_price() -> None:
    price = PriceCatalog.load().price_for("nvidia-l4")

    cost = cost_nanousd(90.0, price)

    assert price.per_hour_nanousd == 710_000_000
    assert cost == 17_750_000
    assert format_usd(cost) == "$0.017750000"
    assert format_usd(0) == "$0.000000000"


def test_costs_round_half_up_to_a_whole_nanodollar() -> None:
    price = Price("x", per_hour_nanousd=3600 * 3, spot=False, version="v")  # 3 nano-USD per second

    assert cost_nanousd(0.5, price) == 2  # 1.5 rounds up
    assert cost_nanousd(0.1, price) == 0  # 0.3 rounds down
    assert cost_nanousd(2.5, Price("y", 3600, False, "v")) == 3  # 2.5 rounds up, not to even


def test_spot_and_on_demand_prices_differ_and_carry_the_catalog_version() -> None:
    catalog = PriceCatalog.load()

    on_demand = catalog.price_for("nvidia-tesla-a100")
    spot = catalog.price_for("nvidia-tesla-a100", spot=True)

    assert (on_demand.per_hour_nanousd, spot.per_hour_nanousd) == (3_670_000_000, 1_800_000_000)
    assert on_demand.version == spot.version == catalog.version


def test_an_unknown_gpu_type_has_no_price() -> None:
    with pytest.raises(UnknownPriceError, match="nvidia-rtx-9090"):
        PriceCatalog.load().price_for("nvidia-rtx-9090")


def test_a_catalog_with_float_prices_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text('version = "1"\n[gpu.cpu]\non_demand_per_hour = 0.1\nspot_per_hour = "0.05"\n')

    with pytest.raises(PriceCatalogError, match="decimal string"):
        PriceCatalog.load(path)


def test_a_usage_row_records_price_cost_and_version(engine: sa.Engine) -> None:
    catalog = PriceCatalog.load()

    with engine.begin() as conn:
        cost = record_usage(conn, _record("task-1"), catalog, NOW)
    with engine.connect() as conn:
        (row,) = usage_rows(conn)

    assert cost == row["cost_nanousd"] == 17_750_000
    assert row["price_per_hour_nanousd"] == 710_000_000
    assert row["price_version"] == catalog.version
    assert row["created_at"] == NOW


def test_a_second_row_for_the_same_task_is_refused_and_rolls_back(engine: sa.Engine) -> None:
    catalog = PriceCatalog.load()
    with engine.begin() as conn:
        record_usage(conn, _record("task-1"), catalog, NOW)

    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        record_usage(conn, _record("task-2"), catalog, NOW)
        record_usage(conn, _record("task-1"), catalog, NOW)

    with engine.connect() as conn:
        assert [r["task_id"] for r in usage_rows(conn)] == ["task-1"]


def test_tenant_summaries_add_up_exactly(engine: sa.Engine) -> None:
    catalog = PriceCatalog.load()
    with engine.begin() as conn:
        for i, seconds in enumerate([90.0, 30.0, 3600.0]):
            record_usage(conn, _record(f"a{i}", "alpha", seconds), catalog, NOW)
        record_usage(conn, _record("b0", "beta", 7.2, gpu="cpu"), catalog, NOW)

    with engine.connect() as conn:
        alpha, beta = summaries(conn)

    # 3720 s of L4 at $0.71/h = $0.733666666...; per row: 17,750,000 + 5,916,667 + 710,000,000
    assert (alpha.key, alpha.tasks, alpha.cost_nanousd) == ("alpha", 3, 733_666_667)
    assert alpha.compute_seconds == pytest.approx(3720.0)
    # 7.2 s of CPU at $0.05/h = exactly $0.0001
    assert (beta.key, beta.cost_nanousd) == ("beta", 100_000)
    assert Decimal(beta.cost_nanousd) / Decimal(10**9) == Decimal("0.0001")


def test_summaries_respect_the_time_range(engine: sa.Engine) -> None:
    catalog = PriceCatalog.load()
    with engine.begin() as conn:
        record_usage(conn, _record("old"), catalog, NOW - timedelta(days=2))
        record_usage(conn, _record("new"), catalog, NOW)

    with engine.connect() as conn:
        (summary,) = summaries(conn, since=NOW - timedelta(hours=1))
        count = conn.execute(sa.select(sa.func.count()).select_from(usage)).scalar_one()

    assert summary.tasks == 1
    assert count == 2


def test_usage_groups_by_workload_gpu_type_and_utc_day(engine: sa.Engine) -> None:
    catalog = PriceCatalog.load()
    with engine.begin() as conn:
        record_usage(conn, _record("a", "t1", 90.0), catalog, NOW)
        record_usage(conn, _record("b", "t2", 7.2, gpu="cpu"), catalog, NOW + timedelta(hours=1))
        record_usage(conn, _record("c", "t1", 30.0), catalog, NOW + timedelta(days=1))

    with engine.connect() as conn:
        by_gpu = {s.key: s.cost_nanousd for s in summaries(conn, by="gpu_type")}
        by_day = {s.key: s.tasks for s in summaries(conn, by="day")}
        by_workload = summaries(conn, by="workload", tenant="t1")

    assert by_gpu == {"cpu": 100_000, "nvidia-l4": 17_750_000 + 5_916_667}
    assert by_day == {"2026-11-24": 2, "2026-11-25": 1}
    assert [(s.key, s.tasks) for s in by_workload] == [("matmul", 2)]
    with pytest.raises(ValueError, match="cannot group"), engine.connect() as conn:
        summaries(conn, by="color")


def test_the_policy_bills_started_increments_with_a_minimum() -> None:
    l4 = PriceCatalog.load().price_for("nvidia-l4")  # 710,000,000 nano-USD per hour
    per_second = BillingPolicy(granularity_seconds=Decimal(1))
    with_minimum = BillingPolicy(minimum_nanousd=1_000_000)

    assert cost_nanousd(90.2, l4, per_second) == cost_nanousd(91.0, l4) == 17_947_222
    assert cost_nanousd(0.001, l4, with_minimum) == 1_000_000
    assert cost_nanousd(90.0, l4, with_minimum) == 17_750_000


def test_the_packaged_policy_bills_per_millisecond_with_no_minimum() -> None:
    catalog = PriceCatalog.load()
    l4 = catalog.price_for("nvidia-l4")

    assert catalog.policy == BillingPolicy(granularity_seconds=Decimal("0.001"))
    assert cost_nanousd(0.0001, l4, catalog.policy) == cost_nanousd(0.001, l4)


def test_a_catalog_that_charges_lost_attempts_is_refused() -> None:
    data = {"version": "1", "policy": {"charge_lost_attempts": True}, "gpu": {}}

    with pytest.raises(PriceCatalogError, match="lost attempts are free"):
        PriceCatalog.from_mapping(data)
