"""The durable task queue: task rows in SQL, short transactions, guarded state changes.

Every method is synchronous and runs on the broker's single database thread (see
``gpubroker.broker.storage.async_store``, which batches concurrent calls into one transaction).
What each writes lives in a module of its own: new rows in ``submission``, the queue's guarded
state changes in ``transitions``, the usage row of a success in ``usage`` (written in the
transaction that marks the task succeeded), row <-> snapshot in ``rows``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from gpubroker.billing.budget import BudgetStatus
from gpubroker.billing.ledger import UsageSummary
from gpubroker.billing.models import tasks, workloads
from gpubroker.billing.prices import PriceCatalog
from gpubroker.broker.errors import BrokerError, TaskNotFoundError
from gpubroker.broker.model import (
    AgentInfo,
    Attempt,
    AttemptOutcome,
    AttemptRecord,
    ModelRecord,
    Task,
    TaskSpec,
    TaskState,
)
from gpubroker.broker.storage import attempts, models, transitions
from gpubroker.broker.storage.rows import task_from_row
from gpubroker.broker.storage.submission import Submissions, find_request
from gpubroker.broker.storage.transitions import Cause, LiveRow, Retries
from gpubroker.broker.storage.usage import Bills, check_priced, tenant_usage
from gpubroker.protos.states import FailureCode

__all__ = ["TaskStore"]


class TaskStore:
    """Reads and changes task rows."""

    def __init__(self, engine: Engine, catalog: PriceCatalog, *, billing: bool = True) -> None:
        self._engine = engine
        self._catalog = catalog
        self._bills = Bills(catalog) if billing else None
        self._submissions = Submissions(engine.dialect)
        self._batch: Connection | None = None

    @property
    def engine(self) -> Engine:
        """The engine the store writes through (for the billing side's own records)."""
        return self._engine

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """The open batch's connection, or a transaction of its own."""
        if self._batch is not None:
            yield self._batch
        else:
            self._submissions.begin()
            with self._engine.begin() as conn:
                yield conn

    def run_batch(self, ops: Sequence[Callable[[], object]]) -> list[object]:
        """Runs several operations in ONE transaction: one commit (one fsync) for all.

        Every operation checks before it writes, so one that raises a ``BrokerError`` has
        written nothing and the others still commit; its error is returned in its place.
        Anything else rolls the batch back, and each operation is then retried on its own.
        """
        try:
            with self._engine.begin() as conn:
                self._batch = conn
                self._submissions.begin()
                if self._bills is not None:
                    self._bills.open_batch()
                results: list[object] = []
                for op in ops:
                    try:
                        results.append(op())
                    except BrokerError as exc:
                        results.append(exc)
                if self._bills is not None:
                    self._bills.write_batch(conn)  # the batch's successes, one INSERT
                self._batch = None
            return results
        except Exception:
            self._batch = None
            if self._bills is not None:
                self._bills.drop_batch()
            if len(ops) == 1:
                raise
            return [_run_alone(op) for op in ops]
        finally:
            self._batch = None

    def create(
        self,
        task_id: str,
        tenant: str,
        spec: TaskSpec,
        now: datetime,
        deadline: datetime | None,
        inline_inputs: bytes | None = None,
        *,
        call_bound: bool = False,
    ) -> tuple[Task, bool]:
        """Inserts a queued task; returns it and whether its request_id already existed."""
        with self._transaction() as conn:
            return self._submissions.create(
                conn, task_id, tenant, spec, now, deadline, inline_inputs, call_bound
            )

    def find_request(self, tenant: str, spec: TaskSpec) -> Task | None:
        """The tenant's task made for ``spec.request_id``, if any (see ``create``)."""
        with self._transaction() as conn:
            return find_request(conn, tenant, spec)

    def get(self, task_id: str, tenant: str | None = None) -> Task:
        """Returns a task; another tenant's task is reported as not found."""
        with self._transaction() as conn:
            task = transitions.get(conn, task_id)
        if tenant is not None and task.tenant != tenant:
            raise TaskNotFoundError(task_id)
        return task

    def page(
        self, tenant: str, states: Sequence[TaskState], limit: int, before_seq: int | None
    ) -> list[Task]:
        """Returns a tenant's tasks, newest first."""
        query = sa.select(tasks).where(tasks.c.tenant == tenant)
        if states:
            query = query.where(tasks.c.state.in_([s.value for s in states]))
        if before_seq is not None:
            query = query.where(tasks.c.seq < before_seq)
        query = query.order_by(tasks.c.seq.desc()).limit(limit)
        with self._transaction() as conn:
            return [task_from_row(row) for row in conn.execute(query)]

    def recent(self, tenant: str | None, limit: int) -> list[Task]:
        """The ``limit`` newest tasks (of one tenant, or of all), newest first."""
        query = sa.select(tasks).order_by(tasks.c.seq.desc()).limit(limit)
        if tenant is not None:
            query = query.where(tasks.c.tenant == tenant)
        with self._transaction() as conn:
            return [task_from_row(row) for row in conn.execute(query)]

    def attempts(self, found: Iterable[Task]) -> dict[str, tuple[AttemptRecord, ...]]:
        """Every attempt of each task, oldest first, by task id (``storage.attempts``)."""
        with self._transaction() as conn:
            return attempts.attempts_of(conn, found)

    def oldest_queued(self) -> datetime | None:
        """When the longest-waiting queued task was created; None when nothing is queued."""
        with self._transaction() as conn:
            oldest: datetime | None = conn.execute(
                sa.select(sa.func.min(tasks.c.created_at)).where(
                    tasks.c.state == TaskState.QUEUED.value
                )
            ).scalar_one()
            return oldest

    def claim_many(self, task_ids: Sequence[str], agent: AgentInfo, now: datetime) -> list[Task]:
        """Moves queued tasks to running on ``agent`` with their next attempt numbers, in one
        statement; returns those claimed (a task cancelled or expired while queued is left
        out)."""
        with self._transaction() as conn:
            return transitions.claim_many(conn, task_ids, agent, now)

    def requeue(
        self, attempt: Attempt, retries: Retries, now: datetime, reason: str, cause: Cause
    ) -> Task:
        """Gives an attempt's task back to the queue, or fails it once the cap of ``cause`` is
        reached (see ``transitions``)."""
        with self._transaction() as conn:
            return transitions.requeue(conn, attempt, retries, now, reason, cause)

    def live(self) -> list[LiveRow]:
        """Every queued or running task's state, attempt and agent (for reconciliation)."""
        with self._transaction() as conn:
            return transitions.live(conn)

    def lost_attempts(self, task_id: str) -> int:
        """How many of the task's attempts were lost to infrastructure."""
        with self._transaction() as conn:
            return transitions.lost_attempts(conn, task_id)

    def succeed(
        self,
        outcome: AttemptOutcome,
        now: datetime,
        inline_outputs: bytes | None = None,
        running: Task | None = None,
    ) -> Task:
        """Marks an attempt succeeded and writes its usage row, in one transaction.

        ``running`` is the task as its claim returned it, where the caller kept it (see
        ``transitions.mark_succeeded``).
        """
        with self._transaction() as conn:
            task = transitions.mark_succeeded(conn, outcome, now, inline_outputs, running)
            if self._bills is not None:
                self._bills.bill(conn, task, outcome, now)
            return task

    def fail(
        self,
        attempt: Attempt,
        agent_id: str | None,
        code: FailureCode,
        message: str,
        now: datetime,
    ) -> Task:
        """Marks a running attempt failed (the workload raised or rejected its inputs)."""
        with self._transaction() as conn:
            return transitions.fail(conn, attempt, agent_id, code, message, now)

    def cancel(self, task_id: str, tenant: str | None, now: datetime) -> tuple[Task, Task]:
        """Cancels a live task; returns (before, after). A final task stays as it is."""
        with self._transaction() as conn:
            return transitions.cancel(conn, task_id, tenant, now)

    def expire(self, now: datetime) -> list[tuple[Task, Task]]:
        """Fails every live task whose deadline has passed; returns (before, after) pairs."""
        with self._transaction() as conn:
            return transitions.expire(conn, now)

    def recover(self, now: datetime) -> tuple[list[Task], list[Task]]:
        """On start: requeues running tasks and cancels live call-bound ones; returns every
        queued task, oldest first, and the tasks cancelled (see ``transitions.recover``)."""
        with self._transaction() as conn:
            return transitions.recover(conn, now)

    def usage(
        self, tenant: str, since: datetime | None, until: datetime | None, now: datetime
    ) -> tuple[UsageSummary, BudgetStatus]:
        """A tenant's billed usage over ``[since, until)``, and its month against its budget."""
        with self._transaction() as conn:
            return tenant_usage(conn, tenant, since, until, now)

    def add_workloads(self, names: Iterable[str], now: datetime) -> None:
        """Remembers workload names an agent advertised."""
        with self._transaction() as conn:
            known = set(conn.execute(sa.select(workloads.c.name)).scalars())
            new = [{"name": n, "first_seen_at": now} for n in set(names) - known]
            if new:
                conn.execute(workloads.insert(), new)

    def known_workloads(self) -> frozenset[str]:
        """Every workload name any agent has advertised."""
        with self._transaction() as conn:
            return frozenset(conn.execute(sa.select(workloads.c.name)).scalars())

    def check_priced(self, gpu_type: str) -> None:
        """Raises ``AgentRefusedError`` unless the price catalog can bill ``gpu_type``."""
        check_priced(self._catalog, gpu_type)

    def models(self) -> list[ModelRecord]:
        """Every tenant's models, oldest first."""
        with self._transaction() as conn:
            return models.load_all(conn)

    def add_model(self, record: ModelRecord) -> None:
        """Adds a model the tenant does not hold yet."""
        with self._transaction() as conn:
            models.insert(conn, record)

    def update_model(self, record: ModelRecord) -> None:
        """Writes a held model's name and options."""
        with self._transaction() as conn:
            models.update(conn, record)

    def delete_model(self, tenant: str, model_id: str) -> tuple[ModelRecord, bool]:
        """Deletes a model no live task names; returns it and whether its file is unreferenced
        (see ``models.delete``)."""
        with self._transaction() as conn:
            return models.delete(conn, tenant, model_id)


def _run_alone(op: Callable[[], object]) -> object:
    try:
        return op()
    except Exception as exc:
        return exc
