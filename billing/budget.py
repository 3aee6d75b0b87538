"""Per-tenant monthly budgets: a limit in nano-dollars and the month-to-date spend against it.

Months are calendar months in UTC. Spend is what the ledger billed: measured compute time only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gpubroker.billing.models import budgets, usage

__all__ = [
    "BudgetStatus",
    "budget_status",
    "month_start",
    "monthly_limit",
    "next_month",
    "remove_budget",
    "set_budget",
]


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """A tenant's month so far."""

    tenant: str
    limit_nanousd: int | None
    """None when the tenant has no budget."""
    spent_nanousd: int
    month_start: datetime

    @property
    def is_exhausted(self) -> bool:
        """True once the month's spend has reached the limit."""
        return self.limit_nanousd is not None and self.spent_nanousd >= self.limit_nanousd


def month_start(now: datetime) -> datetime:
    """Midnight UTC on the first day of ``now``'s month."""
    now = now.astimezone(UTC)
    return datetime(now.year, now.month, 1, tzinfo=UTC)


def next_month(now: datetime) -> datetime:
    """Midnight UTC on the first day of the month after ``now``'s."""
    start = month_start(now)
    return datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)


def set_budget(conn: Connection, tenant: str, limit_nanousd: int, now: datetime) -> None:
    """Sets (or replaces) a tenant's monthly limit."""
    if limit_nanousd < 0:
        raise ValueError(f"a budget cannot be negative ({limit_nanousd} nano-USD)")
    conn.execute(sa.delete(budgets).where(budgets.c.tenant == tenant))
    conn.execute(
        sa.insert(budgets).values(
            tenant=tenant, monthly_limit_nanousd=limit_nanousd, updated_at=now
        )
    )


def remove_budget(conn: Connection, tenant: str) -> bool:
    """Removes a tenant's limit; returns whether it had one."""
    return conn.execute(sa.delete(budgets).where(budgets.c.tenant == tenant)).rowcount > 0


_LIMIT = sa.select(budgets.c.monthly_limit_nanousd).where(
    budgets.c.tenant == sa.bindparam("tenant")
)


def monthly_limit(conn: Connection, tenant: str) -> int | None:
    """The tenant's monthly limit in nano-USD, or None when it has none (a cheap lookup)."""
    limit = conn.execute(_LIMIT, {"tenant": tenant}).scalar_one_or_none()
    return None if limit is None else int(limit)


def budget_status(conn: Connection, tenant: str, now: datetime) -> BudgetStatus:
    """The tenant's limit and what it has spent since the start of the month."""
    start = month_start(now)
    limit = conn.execute(
        sa.select(budgets.c.monthly_limit_nanousd).where(budgets.c.tenant == tenant)
    ).scalar_one_or_none()
    spent = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(usage.c.cost_nanousd), 0)).where(
            usage.c.tenant == tenant, usage.c.created_at >= start
        )
    ).scalar_one()
    return BudgetStatus(tenant, None if limit is None else int(limit), int(spent), start)
