"""The usage ledger on SQLite and PostgreSQL, against hand-computed figures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
import sqlalchemy as sa

from gpubroker.billing.errors import UnknownPriceError
from gpubroker.billing.ledger import (
    UsageRecord,
    insert_usage,
    priced_usage,
    record_usage,
    summaries,
    usage_rows,
)
from gpubroker.billing.models import usage, workloads
from gpubroker.billing.prices import PriceCatalog

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def _record(
    task_id: str, tenant: str = "t1", seconds: float = 90.0, gpu: str = "nvidia-l4"
) -> UsageRecord:
    return UsageRecord(
        task_id=task_id, tenant=tenant, workload="matmul", agent_id="a1", gpu_type=gpu,
        attempt=1, queue_wait_seconds=2.0, compute_seconds=seconds, bytes_in=100, bytes_out=10,
    )  # fmt: skip


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


def test_the_drivers_insert_stores_what_sqlalchemys_insert_stores(engine: sa.Engine) -> None:
    # insert_usage and record_usage bypass SQLAlchemy's per-row parameter handling; every
    # column, the timestamp's stored form included, must come out as from a plain Core insert.
    catalog = PriceCatalog.load()
    eastern = timezone(timedelta(hours=-5))
    times = [NOW, datetime(2026, 11, 24, 7, 0, 0, 123456, tzinfo=eastern)]
    fast = [priced_usage(_record(f"fast-{i}"), catalog, t) for i, t in enumerate(times)]
    core = [priced_usage(_record(f"core-{i}"), catalog, t) for i, t in enumerate(times)]
    with engine.begin() as conn:
        insert_usage(conn, fast)
        conn.execute(usage.insert(), core)
        for i, t in enumerate(times):
            record_usage(conn, _record(f"one-{i}"), catalog, t)
        stored = {
            row.task_id: (row.created_at, row.cost_nanousd)
            for row in conn.execute(
                sa.select(
                    usage.c.task_id, sa.cast(usage.c.created_at, sa.String), usage.c.cost_nanousd
                )
            )
        }
        rows = {r["task_id"]: r for r in usage_rows(conn)}

    for i, t in enumerate(times):
        for fast_id in (f"fast-{i}", f"one-{i}"):
            assert stored[fast_id] == stored[f"core-{i}"]  # same text / timestamp in the database
            fast_row, core_row = rows[fast_id], rows[f"core-{i}"]
            assert {k: v for k, v in fast_row.items() if k not in ("id", "task_id")} == {
                k: v for k, v in core_row.items() if k not in ("id", "task_id")
            }
            assert fast_row["created_at"] == t.astimezone(UTC)
    with engine.connect() as conn:  # range queries see both alike, to the microsecond
        before = summaries(conn, since=times[0], until=times[1])
        through = summaries(conn, since=times[0], until=times[1] + timedelta(microseconds=1))
    assert [s.tasks for s in before] == [3] and [s.tasks for s in through] == [6]


def test_a_second_row_for_the_same_task_is_refused_and_rolls_back(engine: sa.Engine) -> None:
    catalog = PriceCatalog.load()
    with engine.begin() as conn:
        record_usage(conn, _record("task-1"), catalog, NOW)

    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        # The broker marks the task succeeded in the same transaction; a workloads row stands in.
        conn.execute(workloads.insert().values(name="task-2-marker", first_seen_at=NOW))
        record_usage(conn, _record("task-2"), catalog, NOW)
        record_usage(conn, _record("task-1"), catalog, NOW)

    with engine.connect() as conn:
        assert [r["task_id"] for r in usage_rows(conn)] == ["task-1"]
        assert conn.execute(sa.select(sa.func.count()).select_from(workloads)).scalar_one() == 0


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


def test_usage_on_an_unpriced_gpu_is_refused_before_anything_is_written(engine: sa.Engine) -> None:
    with pytest.raises(UnknownPriceError), engine.begin() as conn:
        record_usage(conn, _record("t", gpu="nvidia-rtx-9090"), PriceCatalog.load(), NOW)

    with engine.connect() as conn:
        assert usage_rows(conn) == []


def test_tenant_summaries_average_queue_wait_and_sum_bytes(engine: sa.Engine) -> None:
    catalog = PriceCatalog.load()
    waits_and_bytes = [(1.0, 100, 7), (2.0, 2**40, 0), (6.0, 1, 2**33)]
    with engine.begin() as conn:
        for i, (wait, bytes_in, bytes_out) in enumerate(waits_and_bytes):
            record = UsageRecord(
                f"w{i}", "t1", "matmul", "a", "cpu", 1, wait, 1.0, bytes_in, bytes_out
            )
            record_usage(conn, record, catalog, NOW)

    with engine.connect() as conn:
        (summary,) = summaries(conn)

    assert summary.queue_wait_seconds == pytest.approx(3.0)
    assert (summary.bytes_in, summary.bytes_out) == (2**40 + 101, 2**33 + 7)


def test_a_time_range_includes_since_and_excludes_until(engine: sa.Engine) -> None:
    catalog = PriceCatalog.load()
    with engine.begin() as conn:
        for i in range(3):
            record_usage(conn, _record(f"h{i}"), catalog, NOW + timedelta(hours=i))

    with engine.connect() as conn:
        rows = usage_rows(conn, since=NOW, until=NOW + timedelta(hours=2))
        none = summaries(conn, since=NOW + timedelta(days=1))

    assert [r["task_id"] for r in rows] == ["h0", "h1"]
    assert none == []


def test_usage_rows_can_be_limited_to_one_tenant(engine: sa.Engine) -> None:
    catalog = PriceCatalog.load()
    with engine.begin() as conn:
        record_usage(conn, _record("a", "alpha"), catalog, NOW)
        record_usage(conn, _record("b", "beta"), catalog, NOW)

    with engine.connect() as conn:
        rows = usage_rows(conn, tenant="beta")

    assert [(r["task_id"], r["tenant"]) for r in rows] == [("b", "beta")]
