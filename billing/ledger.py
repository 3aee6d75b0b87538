"""The usage ledger: one priced row per successful task attempt, and summaries of them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gpubroker.billing.driver import DriverInsert
from gpubroker.billing.models import usage
from gpubroker.billing.prices import PriceCatalog, cost_nanousd

__all__ = [
    "GROUPS",
    "UsageRecord",
    "UsageSummary",
    "insert_usage",
    "priced_usage",
    "record_usage",
    "summaries",
    "usage_rows",
]


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What one successful attempt used."""

    task_id: str
    tenant: str
    workload: str
    agent_id: str
    gpu_type: str
    attempt: int
    queue_wait_seconds: float
    compute_seconds: float
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True, slots=True)
class UsageSummary:
    """Usage totals of one group (a tenant, workload, GPU type or day) over a time range."""

    key: str
    """The group: a tenant, a workload, a GPU type, or a UTC day as YYYY-MM-DD."""
    tasks: int
    compute_seconds: float
    queue_wait_seconds: float
    """Mean queue wait."""
    bytes_in: int
    bytes_out: int
    cost_nanousd: int


GROUPS = ("tenant", "workload", "gpu_type", "day")
"""What a summary can be grouped by."""


_USAGE_COLUMNS = tuple(c.name for c in usage.columns if c.name != "id")


_DRIVER_INSERTS: dict[tuple[str, str], DriverInsert] = {}
"""``usage``'s INSERT per (dialect, driver): it runs for every successful task."""


def record_usage(
    conn: Connection, record: UsageRecord, catalog: PriceCatalog, now: datetime
) -> int:
    """Inserts the priced usage row inside the caller's open transaction; returns its cost.

    The caller marks the task succeeded in the same transaction. ``task_id`` is unique, so a
    second row for the same task raises ``IntegrityError`` and rolls the whole transaction back.
    """
    row = priced_usage(record, catalog, now)
    insert_usage(conn, [row])
    return int(row["cost_nanousd"])


def insert_usage(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Inserts priced usage rows (from ``priced_usage``) with one statement, inside the
    caller's open transaction; the same guarantees as ``record_usage``."""
    if not rows:
        return
    dialect = conn.dialect
    insert = _DRIVER_INSERTS.get((dialect.name, dialect.driver))
    if insert is None:
        insert = DriverInsert.compile(usage.insert(), _USAGE_COLUMNS, dialect)
        _DRIVER_INSERTS[dialect.name, dialect.driver] = insert
    insert.insert(conn, rows)


def priced_usage(record: UsageRecord, catalog: PriceCatalog, now: datetime) -> dict[str, Any]:
    """The usage row for ``record``, priced with the catalog, ready for ``insert_usage``."""
    price = catalog.price_for(record.gpu_type)
    cost = cost_nanousd(record.compute_seconds, price, catalog.policy)
    return {
        "task_id": record.task_id,
        "tenant": record.tenant,
        "workload": record.workload,
        "agent_id": record.agent_id,
        "gpu_type": record.gpu_type,
        "attempt": record.attempt,
        "queue_wait_seconds": record.queue_wait_seconds,
        "compute_seconds": record.compute_seconds,
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
        "price_per_hour_nanousd": price.per_hour_nanousd,
        "cost_nanousd": cost,
        "price_version": price.version,
        "created_at": now,
    }


def _in_range(query: Any, since: datetime | None, until: datetime | None) -> Any:
    if since is not None:
        query = query.where(usage.c.created_at >= since)
    if until is not None:
        query = query.where(usage.c.created_at < until)
    return query


def summaries(
    conn: Connection,
    *,
    by: str = "tenant",
    since: datetime | None = None,
    until: datetime | None = None,
    tenant: str | None = None,
) -> list[UsageSummary]:
    """Totals over ``[since, until)`` grouped ``by`` one of ``GROUPS``, sorted by group.

    Columns are summed in SQL; days are cut in Python (UTC), as SQL date functions differ
    between SQLite and PostgreSQL. Money stays in integer nano-dollars, so totals are exact.
    """
    if by not in GROUPS:
        raise ValueError(f"cannot group usage by {by!r}; choose one of {', '.join(GROUPS)}")
    key = sa.func.min(usage.c.created_at) if by == "day" else usage.c[by]
    group = usage.c.created_at if by == "day" else usage.c[by]
    query = sa.select(
        key,
        sa.func.count(),
        sa.func.sum(usage.c.compute_seconds),
        sa.func.sum(usage.c.queue_wait_seconds),
        sa.func.sum(usage.c.bytes_in),
        sa.func.sum(usage.c.bytes_out),
        sa.func.sum(usage.c.cost_nanousd),
    ).group_by(group)
    if tenant is not None:
        query = query.where(usage.c.tenant == tenant)
    rows = conn.execute(_in_range(query, since, until)).all()
    merged: dict[str, list[Any]] = {}
    for row in rows:
        name = row[0].date().isoformat() if by == "day" else str(row[0])
        totals = merged.setdefault(name, [0, 0.0, 0.0, 0, 0, 0])
        for i, value in enumerate(row[1:]):
            totals[i] += value or 0
    return [
        UsageSummary(
            key=name,
            tasks=int(t[0]),
            compute_seconds=float(t[1]),
            queue_wait_seconds=float(t[2]) / t[0] if t[0] else 0.0,
            bytes_in=int(t[3]),
            bytes_out=int(t[4]),
            cost_nanousd=int(t[5]),
        )
        for name, t in sorted(merged.items())
    ]


def usage_rows(
    conn: Connection,
    *,
    tenant: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """The raw usage rows, oldest first."""
    query = sa.select(usage)
    if tenant is not None:
        query = query.where(usage.c.tenant == tenant)
    query = _in_range(query, since, until).order_by(usage.c.id)
    return [dict(row._mapping) for row in conn.execute(query)]
