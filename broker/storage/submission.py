"""New task rows: one INSERT per submit, deduplicated by request id, within the tenant's budget."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect

from gpubroker.billing.budget import budget_status, monthly_limit, next_month
from gpubroker.billing.driver import DriverInsert
from gpubroker.billing.models import tasks
from gpubroker.billing.prices import format_usd
from gpubroker.broker.errors import BudgetExceededError, ModelNotFoundError, RequestConflictError
from gpubroker.broker.model import Task, TaskSpec
from gpubroker.broker.storage import models
from gpubroker.broker.storage.rows import new_task, new_task_row, task_from_row

__all__ = ["Submissions", "find_request"]

_INSERT_TASK = tasks.insert().returning(tasks.c.seq)
_DEDUP_INSERTS: dict[str, Any] = {
    name: module.insert(tasks)
    .on_conflict_do_nothing(index_elements=[tasks.c.tenant, tasks.c.request_id])
    .returning(tasks.c.seq)
    for name, module in (("sqlite", sqlite), ("postgresql", postgresql))
}
"""The task INSERT where the database has ``ON CONFLICT DO NOTHING``: a duplicate ``(tenant,
request_id)`` inserts nothing and returns no row, so a first submit costs one statement;
elsewhere (``_INSERT_TASK``) a SELECT looks for the request first. Either runs through the
driver (``gpubroker.billing.driver``): it runs for every task."""

_FIND_REQUEST = sa.select(tasks).where(
    tasks.c.tenant == sa.bindparam("b_tenant", type_=tasks.c.tenant.type),
    tasks.c.request_id == sa.bindparam("b_request_id", type_=tasks.c.request_id.type),
)


class Submissions:
    """Inserts submitted tasks for one database; remembers, per transaction, whose budget
    was checked."""

    def __init__(self, dialect: Dialect) -> None:
        self._insert = _DEDUP_INSERTS.get(dialect.name, _INSERT_TASK)
        self._dedup_on_insert = self._insert is not _INSERT_TASK
        self._driver_insert: DriverInsert | None = None
        """``_insert`` compiled for the driver on the first create, of that row's columns."""
        self._budget_checked: set[str] = set()

    def begin(self) -> None:
        """A new transaction starts: spend may have been committed since the last checks."""
        self._budget_checked.clear()

    def create(
        self,
        conn: Connection,
        task_id: str,
        tenant: str,
        spec: TaskSpec,
        now: datetime,
        deadline: datetime | None,
        inline_inputs: bytes | None,
        call_bound: bool,
    ) -> tuple[Task, bool]:
        """Inserts a queued task; returns it and whether its request_id already existed."""
        if not self._dedup_on_insert and (existing := find_request(conn, tenant, spec)):
            return existing, True
        model_id = spec.model_id
        if model_id is not None and not models.exists(conn, tenant, model_id):
            # Checked in the transaction that inserts: a delete of the model either committed
            # before (and the task is refused) or runs after (and sees the task).
            if existing := find_request(conn, tenant, spec):
                return existing, True
            raise ModelNotFoundError(model_id)
        try:
            self._check_budget(conn, tenant, now)
        except BudgetExceededError:
            if existing := find_request(conn, tenant, spec):
                return existing, True  # a retry gets its task even over the budget
            raise
        row = new_task_row(task_id, tenant, spec, now, deadline, inline_inputs, call_bound)
        if self._driver_insert is None:
            self._driver_insert = DriverInsert.compile(self._insert, tuple(row), conn.dialect)
        inserted = self._driver_insert.insert_returning(conn, row)
        if inserted is None:  # the (tenant, request_id) exists: a retry of an earlier submit
            existing = find_request(conn, tenant, spec)
            if existing is None:  # cannot happen: the conflicting row is committed
                raise RuntimeError(f"request_id {spec.request_id!r} conflicted, yet is gone")
            return existing, True
        return new_task(row, spec, inserted[0]), False

    def _check_budget(self, conn: Connection, tenant: str, now: datetime) -> None:
        """Refuses a tenant over its monthly budget; checked once per tenant per transaction
        (no spend can be committed between the checks of one batch)."""
        if tenant in self._budget_checked:
            return
        _check_budget(conn, tenant, now)
        self._budget_checked.add(tenant)


def find_request(conn: Connection, tenant: str, spec: TaskSpec) -> Task | None:
    """The tenant's task made for ``spec.request_id``, if any; a conflict if its work differs."""
    if not spec.request_id:
        return None
    row = conn.execute(_FIND_REQUEST, {"b_tenant": tenant, "b_request_id": spec.request_id}).first()
    if row is None:
        return None
    existing = task_from_row(row)
    if existing.workload != spec.workload or existing.inputs != spec.inputs:
        raise RequestConflictError(
            f"request_id {spec.request_id!r} was already used for task {existing.id} "
            "with different work"
        )
    return existing


def _check_budget(conn: Connection, tenant: str, now: datetime) -> None:
    if monthly_limit(conn, tenant) is None:
        return  # no budget: no need to add up the month's spend
    status = budget_status(conn, tenant, now)
    if status.is_exhausted:
        assert status.limit_nanousd is not None
        raise BudgetExceededError(
            f"tenant {tenant!r} has spent {format_usd(status.spent_nanousd)} of its monthly "
            f"budget of {format_usd(status.limit_nanousd)} since "
            f"{status.month_start:%Y-%m-%d}; new tasks are refused until "
            f"{next_month(now):%Y-%m-%d} or until the budget is raised"
        )
