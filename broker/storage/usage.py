"""What the broker bills: a succeeded attempt's usage row, and a tenant's billed usage."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection

from gpubroker.billing.budget import BudgetStatus, budget_status
from gpubroker.billing.errors import UnknownPriceError
from gpubroker.billing.ledger import (
    UsageRecord,
    UsageSummary,
    insert_usage,
    priced_usage,
    record_usage,
    summaries,
)
from gpubroker.billing.prices import PriceCatalog
from gpubroker.broker.errors import AgentRefusedError
from gpubroker.broker.model import AttemptOutcome, Task

__all__ = ["Bills", "check_priced", "tenant_usage", "usage_record"]


def usage_record(task: Task, outcome: AttemptOutcome) -> UsageRecord:
    """What the succeeded ``task`` used in the attempt ``outcome`` reports."""
    started = task.started_at or task.created_at
    return UsageRecord(
        task_id=task.id,
        tenant=task.tenant,
        workload=task.workload,
        agent_id=outcome.agent_id,
        gpu_type=task.gpu_type or "unknown",
        attempt=outcome.attempt.number,
        queue_wait_seconds=max(0.0, (started - task.created_at).total_seconds()),
        compute_seconds=outcome.compute_seconds,
        bytes_in=task.input_bytes,
        bytes_out=task.output_bytes,
    )


class Bills:
    """Writes each succeeded attempt's priced usage row in the transaction that marks it
    succeeded: the ledger's unique ``task_id`` makes a second row for a task roll that whole
    transaction back, so a task is billed exactly once.

    In a transaction of its own, a success's row is written at once. Inside a batch (the group
    commit of ``TaskStore.run_batch``) the rows of the batch's successes are written together,
    by one INSERT that the batch runs just before it commits: the same transaction, a fraction
    of the cost per row.
    """

    def __init__(self, catalog: PriceCatalog) -> None:
        self._catalog = catalog
        self._pending: list[dict[str, Any]] | None = None

    def open_batch(self) -> None:
        """Holds the rows of the successes that follow until ``write_batch``."""
        self._pending = []

    def bill(self, conn: Connection, task: Task, outcome: AttemptOutcome, now: datetime) -> None:
        """Bills the succeeded ``task`` for the attempt ``outcome`` reports."""
        record = usage_record(task, outcome)
        if self._pending is None:
            record_usage(conn, record, self._catalog, now)
        else:
            self._pending.append(priced_usage(record, self._catalog, now))

    def write_batch(self, conn: Connection) -> None:
        """Writes the batch's rows (in its transaction, before it commits) and ends the batch."""
        pending, self._pending = self._pending, None
        if pending:
            insert_usage(conn, pending)

    def drop_batch(self) -> None:
        """Forgets the rows of a batch that rolled back."""
        self._pending = None


def tenant_usage(
    conn: Connection, tenant: str, since: datetime | None, until: datetime | None, now: datetime
) -> tuple[UsageSummary, BudgetStatus]:
    """A tenant's billed usage over ``[since, until)``, and its month against its budget."""
    found = summaries(conn, since=since, until=until, tenant=tenant)
    budget = budget_status(conn, tenant, now)
    return (found[0] if found else UsageSummary(tenant, 0, 0.0, 0.0, 0, 0, 0)), budget


def check_priced(catalog: PriceCatalog, gpu_type: str) -> None:
    """Raises ``AgentRefusedError`` unless the price catalog can bill ``gpu_type``."""
    try:
        catalog.price_for(gpu_type)
    except UnknownPriceError as exc:
        raise AgentRefusedError(f"cannot bill work on this agent: {exc}") from exc
