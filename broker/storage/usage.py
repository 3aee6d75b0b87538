"""What the broker bills: a succeeded attempt's usage row, and a tenant's billed usage."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.engine import Connection

from gpubroker.billing.budget import BudgetStatus, budget_status
from gpubroker.billing.errors import UnknownPriceError
from gpubroker.billing.ledger import UsageRecord, UsageSummary, record_usage, summaries
from gpubroker.billing.prices import PriceCatalog
from gpubroker.broker.errors import AgentRefusedError
from gpubroker.broker.model import AttemptOutcome, Task

__all__ = ["bill_success", "check_priced", "tenant_usage", "usage_record"]


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


def bill_success(
    conn: Connection, task: Task, outcome: AttemptOutcome, catalog: PriceCatalog, now: datetime
) -> None:
    """Writes the succeeded attempt's priced usage row in the caller's transaction, the one
    that marked it succeeded: the ledger's unique ``task_id`` makes a second row for the task
    roll that whole transaction back, so a task is billed exactly once."""
    record_usage(conn, usage_record(task, outcome), catalog, now)


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
