"""The usage ledger: one priced row per successful task attempt, and summaries of them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from billing.models import usage
from billing.prices import PriceCatalog, cost_nanousd

__all__ = ["TenantSummary", "UsageRecord", "record_usage", "tenant_summaries", "usage_rows"]


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
class TenantSummary:
    """One tenant's usage over a time range."""

    tenant: str
    tasks: int
    compute_seconds: float
    queue_wait_seconds: float
    """Mean queue wait."""
    bytes_in: int
    bytes_out: int
    cost_nanousd: int


def record_usage(
    conn: Connection, record: UsageRecord, catalog: PriceCatalog, now: datetime
) -> int:
    """Inserts the priced usage row inside the caller's open transaction; returns its cost.

    The caller marks the task succeeded in the same transaction. ``task_id`` is unique, so a
    second row for the same task raises ``IntegrityError`` and rolls the whole transaction back.
    """
    price = catalog.price_for(record.gpu_type)
    cost = cost_nanousd(record.compute_seconds, price)
    conn.execute(
        usage.insert().values(
            task_id=record.task_id,
            tenant=record.tenant,
            workload=record.workload,
            agent_id=record.agent_id,
            gpu_type=record.gpu_type,
            attempt=record.attempt,
            queue_wait_seconds=record.queue_wait_seconds,
            compute_seconds=record.compute_seconds,
            bytes_in=record.bytes_in,
            bytes_out=record.bytes_out,
            price_per_hour_nanousd=price.per_hour_nanousd,
            cost_nanousd=cost,
            price_version=price.version,
            created_at=now,
        )
    )
    return cost


def _in_range(query: Any, since: datetime | None, until: datetime | None) -> Any:
    if since is not None:
        query = query.where(usage.c.created_at >= since)
    if until is not None:
        query = query.where(usage.c.created_at < until)
    return query


def tenant_summaries(
    conn: Connection,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    tenant: str | None = None,
) -> list[TenantSummary]:
    """Per-tenant totals over ``[since, until)``, aggregated in SQL, sorted by tenant."""
    query = sa.select(
        usage.c.tenant,
        sa.func.count(),
        sa.func.sum(usage.c.compute_seconds),
        sa.func.avg(usage.c.queue_wait_seconds),
        sa.func.sum(usage.c.bytes_in),
        sa.func.sum(usage.c.bytes_out),
        sa.func.sum(usage.c.cost_nanousd),
    ).group_by(usage.c.tenant)
    if tenant is not None:
        query = query.where(usage.c.tenant == tenant)
    rows = conn.execute(_in_range(query, since, until).order_by(usage.c.tenant)).all()
    return [
        TenantSummary(
            tenant=row[0],
            tasks=int(row[1]),
            compute_seconds=float(row[2] or 0.0),
            queue_wait_seconds=float(row[3] or 0.0),
            bytes_in=int(row[4] or 0),
            bytes_out=int(row[5] or 0),
            cost_nanousd=int(row[6] or 0),
        )
        for row in rows
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
