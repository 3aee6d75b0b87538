"""The durable task queue: task rows in SQL, short transactions, guarded state changes.

Every method is synchronous and runs on the broker's single database thread (see
``gpubroker.broker.storage.committer``, which batches concurrent calls into one transaction). State
changes are
guarded in SQL (``WHERE state = ... AND attempt = ...``) so a result from a lost lease can never
overwrite a newer attempt, and the usage row is written in the same transaction that marks a
task succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, Row

from gpubroker.billing.budget import BudgetStatus, budget_status, monthly_limit, next_month
from gpubroker.billing.driver import DriverInsert
from gpubroker.billing.errors import UnknownPriceError
from gpubroker.billing.ledger import (
    UsageRecord,
    UsageSummary,
    insert_usage,
    priced_usage,
    summaries,
)
from gpubroker.billing.models import tasks, workloads
from gpubroker.billing.prices import PriceCatalog, format_usd
from gpubroker.broker.errors import (
    AgentRefusedError,
    BrokerError,
    BudgetExceededError,
    RequestConflictError,
    StaleAttemptError,
    TaskNotFoundError,
)
from gpubroker.broker.model import AgentInfo, Attempt, AttemptOutcome, Task, TaskSpec, TaskState
from gpubroker.protos.wire import TensorMeta

__all__ = ["TaskStore", "create_engine"]


_LIVE = (TaskState.QUEUED.value, TaskState.RUNNING.value)
_ORPHAN_MESSAGE = "the Run or RunMany call it belonged to ended when the broker stopped"


def _bind(name: str, column: sa.Column[Any]) -> sa.BindParameter[Any]:
    return sa.bindparam(f"b_{name}", type_=column.type)


# The hot statements are built once: building one per call (and its cache key) cost more than
# running it. Bind names carry a ``b_`` prefix because UPDATE reserves the column names.
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

_CLAIMED: dict[str, Any] = {
    "state": TaskState.RUNNING.value,
    "attempt": tasks.c.attempt + 1,
    "agent_id": _bind("agent_id", tasks.c.agent_id),
    "gpu_type": _bind("gpu_type", tasks.c.gpu_type),
    "started_at": _bind("now", tasks.c.started_at),
}
_CLAIM = (
    tasks.update()
    .where(tasks.c.id == _bind("id", tasks.c.id), tasks.c.state == TaskState.QUEUED.value)
    .values(**_CLAIMED)
    .returning(*tasks.c)
)
_CLAIM_MANY = (
    tasks.update()
    .where(
        tasks.c.id.in_(sa.bindparam("b_ids", expanding=True)),
        tasks.c.state == TaskState.QUEUED.value,
    )
    .values(**_CLAIMED)
    .returning(*tasks.c)
)
_FIND_REQUEST = sa.select(tasks).where(
    tasks.c.tenant == _bind("tenant", tasks.c.tenant),
    tasks.c.request_id == _bind("request_id", tasks.c.request_id),
)
_GET = sa.select(tasks).where(tasks.c.id == _bind("id", tasks.c.id))
_SUCCEED_UNREAD = (
    tasks.update()
    .where(
        tasks.c.id == _bind("id", tasks.c.id),
        tasks.c.state == TaskState.RUNNING.value,
        tasks.c.attempt == _bind("attempt", tasks.c.attempt),
        tasks.c.agent_id == _bind("agent_id", tasks.c.agent_id),
    )
    .values(
        state=TaskState.SUCCEEDED.value,
        outputs=_bind("outputs", tasks.c.outputs),
        output_bytes=_bind("output_bytes", tasks.c.output_bytes),
        inline_outputs=_bind("inline_outputs", tasks.c.inline_outputs),
        compute_seconds=_bind("compute_seconds", tasks.c.compute_seconds),
        finished_at=_bind("now", tasks.c.finished_at),
    )
)
"""A success's guarded UPDATE where the caller has the running task (no row to read back)."""
_SUCCEED = _SUCCEED_UNREAD.returning(*tasks.c)


def create_engine(url: str) -> Engine:
    """Creates an engine; SQLite gets WAL and full fsync so an acknowledged task survives."""
    if url.startswith("sqlite") and ":memory:" not in url and url.count("/") >= 3:
        path = url.split("///", 1)[1]
        if path:
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class TaskStore:
    """Reads and changes task rows."""

    def __init__(self, engine: Engine, catalog: PriceCatalog, *, billing: bool = True) -> None:
        self._engine = engine
        self._catalog = catalog
        self._billing = billing
        self._task_insert = _DEDUP_INSERTS.get(engine.dialect.name, _INSERT_TASK)
        self._dedup_on_insert = self._task_insert is not _INSERT_TASK
        self._driver_insert: DriverInsert | None = None
        """``_task_insert`` compiled for the driver on the first create, of that row's columns."""
        self._batch: Connection | None = None
        self._budget_checked: set[str] = set()
        self._usage_rows: list[dict[str, Any]] = []
        """Usage rows of this transaction's successes, inserted with one statement at its end."""

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """The open batch's connection, or a transaction of its own."""
        if self._batch is not None:
            yield self._batch
        else:
            self._budget_checked.clear()
            self._usage_rows.clear()
            with self._engine.begin() as conn:
                yield conn
                insert_usage(conn, self._usage_rows)

    def run_batch(self, ops: Sequence[Callable[[], object]]) -> list[object]:
        """Runs several operations in ONE transaction: one commit (one fsync) for all.

        Every operation checks before it writes, so one that raises a ``BrokerError`` has
        written nothing and the others still commit; its error is returned in its place.
        Anything else rolls the batch back, and each operation is then retried on its own.
        """
        try:
            with self._engine.begin() as conn:
                self._batch = conn
                self._budget_checked.clear()
                self._usage_rows.clear()
                results: list[object] = []
                for op in ops:
                    try:
                        results.append(op())
                    except BrokerError as exc:
                        results.append(exc)
                insert_usage(conn, self._usage_rows)
                self._batch = None
            return results
        except Exception:
            self._batch = None
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
            if not self._dedup_on_insert and (existing := _find_request(conn, tenant, spec)):
                return existing, True
            try:
                self._check_budget(conn, tenant, now)
            except BudgetExceededError:
                if existing := _find_request(conn, tenant, spec):
                    return existing, True  # a retry gets its task even over the budget
                raise
            params = dict(spec.params)
            input_bytes = spec.input_bytes
            row = {
                "id": task_id,
                "tenant": tenant,
                "request_id": spec.request_id,
                "workload": spec.workload,
                "params": params,
                "priority": spec.priority,
                "state": TaskState.QUEUED.value,
                "attempt": 0,
                "inputs": [_meta_to_json(m) for m in spec.inputs],
                "input_bytes": input_bytes,
                "inline_inputs": inline_inputs,
                "output_bytes": 0,
                "created_at": now,
                "deadline_at": deadline,
                "call_bound": call_bound,
            }
            if self._driver_insert is None:
                self._driver_insert = DriverInsert.compile(
                    self._task_insert, tuple(row), conn.dialect
                )
            inserted = self._driver_insert.insert_returning(conn, row)
            seq = inserted[0] if inserted is not None else None
            if seq is None:  # the (tenant, request_id) exists: a retry of an earlier submit
                existing = _find_request(conn, tenant, spec)
                if existing is None:  # cannot happen: the conflicting row is committed
                    raise RuntimeError(f"request_id {spec.request_id!r} conflicted, yet is gone")
                return existing, True
            # The row holds what was just bound; building the snapshot from it spares
            # reading every column back and converting it (JSON, timestamps).
            return (
                Task(
                    id=task_id,
                    tenant=tenant,
                    workload=spec.workload,
                    params=params,
                    priority=spec.priority,
                    state=TaskState.QUEUED,
                    attempt=0,
                    inputs=tuple(spec.inputs),
                    outputs=(),
                    input_bytes=input_bytes,
                    output_bytes=0,
                    created_at=now.astimezone(UTC),
                    seq=seq,
                    request_id=spec.request_id,
                    deadline_at=deadline.astimezone(UTC) if deadline is not None else None,
                    inline_inputs=inline_inputs,
                    call_bound=call_bound,
                ),
                False,
            )

    def _check_budget(self, conn: Connection, tenant: str, now: datetime) -> None:
        """Refuses a tenant over its monthly budget; checked once per tenant per transaction
        (no spend can be committed between the checks of one batch)."""
        if tenant in self._budget_checked:
            return
        _check_budget(conn, tenant, now)
        self._budget_checked.add(tenant)

    def oldest_queued(self) -> datetime | None:
        """When the longest-waiting queued task was created; None when nothing is queued."""
        with self._transaction() as conn:
            oldest: datetime | None = conn.execute(
                sa.select(sa.func.min(tasks.c.created_at)).where(
                    tasks.c.state == TaskState.QUEUED.value
                )
            ).scalar_one()
            return oldest

    @property
    def engine(self) -> Engine:
        """The engine the store writes through (for the billing side's own records)."""
        return self._engine

    def find_request(self, tenant: str, spec: TaskSpec) -> Task | None:
        """Returns the task an earlier submit with the spec's request_id created, if any."""
        with self._transaction() as conn:
            return _find_request(conn, tenant, spec)

    def get(self, task_id: str, tenant: str | None = None) -> Task:
        """Returns a task; another tenant's task is reported as not found."""
        with self._transaction() as conn:
            task = _get(conn, task_id)
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
            return [_task_from_row(row) for row in conn.execute(query)]

    def claim(self, task_id: str, agent: AgentInfo, now: datetime) -> Task | None:
        """Moves a queued task to running on ``agent`` with the next attempt number."""
        with self._transaction() as conn:
            row = conn.execute(
                _CLAIM,
                {
                    "b_id": task_id,
                    "b_agent_id": agent.agent_id,
                    "b_gpu_type": agent.gpu_type,
                    "b_now": now,
                },
            ).first()
            return _task_from_row(row) if row is not None else None

    def claim_many(self, task_ids: Sequence[str], agent: AgentInfo, now: datetime) -> list[Task]:
        """``claim`` for several tasks and one agent, in one statement; returns those claimed
        (a task cancelled or expired while queued is left out)."""
        with self._transaction() as conn:
            rows = conn.execute(
                _CLAIM_MANY,
                {
                    "b_ids": list(task_ids),
                    "b_agent_id": agent.agent_id,
                    "b_gpu_type": agent.gpu_type,
                    "b_now": now,
                },
            )
            return [_task_from_row(row) for row in rows]

    def requeue(self, attempt: Attempt, max_attempts: int, now: datetime, reason: str) -> Task:
        """Gives a lost attempt's task back to the queue, or fails it after ``max_attempts``."""
        with self._transaction() as conn:
            current = _running_attempt(conn, attempt)
            if current.attempt >= max_attempts:
                message = f"gave up after {current.attempt} attempts; last: {reason}"
                return _finish(conn, attempt, TaskState.FAILED, now, "ABORTED", message)
            conn.execute(
                tasks.update()
                .where(tasks.c.id == attempt.task_id)
                .values(state=TaskState.QUEUED.value, agent_id=None, started_at=None)
            )
            return _get(conn, attempt.task_id)

    def succeed(
        self,
        outcome: AttemptOutcome,
        now: datetime,
        inline_outputs: bytes | None = None,
        running: Task | None = None,
    ) -> Task:
        """Marks an attempt succeeded and writes its usage row, in one transaction.

        ``running`` is the task as its claim returned it, where the caller kept it: the
        guarded UPDATE then proves the row is still exactly that attempt, and the succeeded
        snapshot is built from it instead of read back.
        """
        attempt = outcome.attempt
        output_bytes = sum(m.nbytes for m in outcome.outputs)
        if running is not None and (
            running.id != attempt.task_id
            or running.attempt != attempt.number
            or running.agent_id != outcome.agent_id
        ):
            raise ValueError(f"{running.id} attempt {running.attempt} is not {attempt}")
        params = {
            "b_id": attempt.task_id,
            "b_attempt": attempt.number,
            "b_agent_id": outcome.agent_id,
            "b_outputs": [_meta_to_json(m) for m in outcome.outputs],
            "b_output_bytes": output_bytes,
            "b_inline_outputs": inline_outputs,
            "b_compute_seconds": outcome.compute_seconds,
            "b_now": now,
        }
        with self._transaction() as conn:
            # One guarded UPDATE both checks the lease and writes.
            task: Task | None
            if running is None:
                row = conn.execute(_SUCCEED, params).first()
                task = _task_from_row(row) if row is not None else None
            elif conn.execute(_SUCCEED_UNREAD, params).rowcount == 1:
                task = dataclasses.replace(
                    running,
                    state=TaskState.SUCCEEDED,
                    outputs=tuple(outcome.outputs),
                    output_bytes=output_bytes,
                    inline_outputs=inline_outputs,
                    compute_seconds=outcome.compute_seconds,
                    finished_at=now.astimezone(UTC),
                )
            else:
                task = None
            if task is None:
                _running_attempt(conn, attempt, outcome.agent_id)  # raises, naming the state
                raise StaleAttemptError(f"attempt {attempt.number} of {attempt.task_id} is stale")
            if self._billing:  # inserted, with the batch's others, before this transaction ends
                self._usage_rows.append(
                    priced_usage(_usage(task, outcome, output_bytes), self._catalog, now)
                )
            return task

    def fail(
        self, attempt: Attempt, agent_id: str | None, code: str, message: str, now: datetime
    ) -> Task:
        """Marks a running attempt failed (the workload raised or rejected its inputs)."""
        with self._transaction() as conn:
            _running_attempt(conn, attempt, agent_id)
            return _finish(conn, attempt, TaskState.FAILED, now, code, message)

    def cancel(self, task_id: str, tenant: str | None, now: datetime) -> tuple[Task, Task]:
        """Cancels a live task; returns (before, after). A final task stays as it is."""
        with self._transaction() as conn:
            before = _get(conn, task_id)
            if tenant is not None and before.tenant != tenant:
                raise TaskNotFoundError(task_id)
            if before.state.is_final:
                return before, before
            after = _finish(
                conn,
                Attempt(task_id, before.attempt),
                TaskState.CANCELLED,
                now,
                "CANCELLED",
                "cancelled by its owner",
            )
            return before, after

    def expire(self, now: datetime) -> list[tuple[Task, Task]]:
        """Fails every live task whose deadline has passed; returns (before, after) pairs."""
        with self._transaction() as conn:
            rows = conn.execute(
                sa.select(tasks).where(
                    tasks.c.state.in_(_LIVE),
                    tasks.c.deadline_at.is_not(None),
                    tasks.c.deadline_at <= now,
                )
            ).all()
            expired = []
            for row in rows:
                before = _task_from_row(row)
                after = _finish(
                    conn,
                    Attempt(before.id, before.attempt),
                    TaskState.FAILED,
                    now,
                    "DEADLINE_EXCEEDED",
                    "the task's deadline passed before it finished",
                )
                expired.append((before, after))
            return expired

    def recover(self, now: datetime) -> tuple[list[Task], list[Task]]:
        """On start: running tasks lost their agents with the old process; queue them again.
        Live call-bound tasks lost their calls with it: they are cancelled.

        Returns every queued task, oldest first, for the scheduler to load, and the tasks
        cancelled (whose payload files can go).
        """
        with self._transaction() as conn:
            orphans = conn.execute(
                tasks.update()
                .where(tasks.c.call_bound, tasks.c.state.in_(_LIVE))
                .values(
                    state=TaskState.CANCELLED.value,
                    error_code="CANCELLED",
                    error_message=_ORPHAN_MESSAGE,
                    finished_at=now,
                )
                .returning(*tasks.c)
            )
            cancelled = [_task_from_row(row) for row in orphans]
            conn.execute(
                tasks.update()
                .where(tasks.c.state == TaskState.RUNNING.value)
                .values(state=TaskState.QUEUED.value, agent_id=None, started_at=None)
            )
            rows = conn.execute(
                sa.select(tasks)
                .where(tasks.c.state == TaskState.QUEUED.value)
                .order_by(tasks.c.seq)
            )
            return [_task_from_row(row) for row in rows], cancelled

    def usage(
        self, tenant: str, since: datetime | None, until: datetime | None, now: datetime
    ) -> tuple[UsageSummary, BudgetStatus]:
        """A tenant's billed usage over ``[since, until)``, and its month against its budget."""
        with self._transaction() as conn:
            found = summaries(conn, since=since, until=until, tenant=tenant)
            budget = budget_status(conn, tenant, now)
        return (found[0] if found else UsageSummary(tenant, 0, 0.0, 0.0, 0, 0, 0)), budget

    def add_workloads(self, names: Iterable[str], now: datetime) -> None:
        """Remembers workload names an agent advertised."""
        with self._transaction() as conn:
            known = set(conn.execute(sa.select(workloads.c.name)).scalars())
            new = [{"name": n, "first_seen_at": now} for n in set(names) - known]
            if new:
                conn.execute(workloads.insert(), new)

    def check_priced(self, gpu_type: str) -> None:
        """Raises ``AgentRefusedError`` unless the price catalog can bill ``gpu_type``."""
        try:
            self._catalog.price_for(gpu_type)
        except UnknownPriceError as exc:
            raise AgentRefusedError(f"cannot bill work on this agent: {exc}") from exc

    def known_workloads(self) -> frozenset[str]:
        """Every workload name any agent has advertised."""
        with self._transaction() as conn:
            return frozenset(conn.execute(sa.select(workloads.c.name)).scalars())


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


def _run_alone(op: Callable[[], object]) -> object:
    try:
        return op()
    except Exception as exc:
        return exc


def _find_request(conn: Connection, tenant: str, spec: TaskSpec) -> Task | None:
    if not spec.request_id:
        return None
    row = conn.execute(_FIND_REQUEST, {"b_tenant": tenant, "b_request_id": spec.request_id}).first()
    if row is None:
        return None
    existing = _task_from_row(row)
    if existing.workload != spec.workload or existing.inputs != spec.inputs:
        raise RequestConflictError(
            f"request_id {spec.request_id!r} was already used for task {existing.id} "
            "with different work"
        )
    return existing


def _get(conn: Connection, task_id: str) -> Task:
    row = conn.execute(_GET, {"b_id": task_id}).first()
    if row is None:
        raise TaskNotFoundError(task_id)
    return _task_from_row(row)


def _running_attempt(conn: Connection, attempt: Attempt, agent_id: str | None = None) -> Task:
    current = _get(conn, attempt.task_id)
    if (
        current.state is not TaskState.RUNNING
        or current.attempt != attempt.number
        or (agent_id is not None and current.agent_id != agent_id)
    ):
        raise StaleAttemptError(
            f"attempt {attempt.number} of task {attempt.task_id} is not current: the task is "
            f"{current.state.value} at attempt {current.attempt}"
        )
    return current


def _finish(
    conn: Connection, attempt: Attempt, state: TaskState, now: datetime, code: str, message: str
) -> Task:
    conn.execute(
        tasks.update()
        .where(tasks.c.id == attempt.task_id)
        .values(state=state.value, error_code=code, error_message=message, finished_at=now)
    )
    return _get(conn, attempt.task_id)


def _usage(task: Task, outcome: AttemptOutcome, output_bytes: int) -> UsageRecord:
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
        bytes_out=output_bytes,
    )


def _meta_to_json(meta: TensorMeta) -> dict[str, Any]:
    return {
        "name": meta.name,
        "dtype": meta.dtype,
        "shape": list(meta.shape),
        "nbytes": meta.nbytes,
        "crc32c": meta.crc32c,
    }


def _meta_from_json(data: dict[str, Any]) -> TensorMeta:
    return TensorMeta(
        dtype=data["dtype"],
        shape=tuple(data["shape"]),
        nbytes=data["nbytes"],
        crc32c=data["crc32c"],
        name=data.get("name", ""),
    )


def _task_from_row(row: Row[Any]) -> Task:
    m = row._mapping
    return Task(
        id=m["id"],
        tenant=m["tenant"],
        workload=m["workload"],
        params=m["params"] or {},
        priority=m["priority"],
        state=TaskState(m["state"]),
        attempt=m["attempt"],
        inputs=tuple(_meta_from_json(d) for d in m["inputs"]),
        outputs=tuple(_meta_from_json(d) for d in m["outputs"] or ()),
        input_bytes=m["input_bytes"],
        output_bytes=m["output_bytes"],
        created_at=m["created_at"],
        seq=m["seq"],
        request_id=m["request_id"],
        agent_id=m["agent_id"],
        gpu_type=m["gpu_type"],
        compute_seconds=m["compute_seconds"],
        error_code=m["error_code"],
        error_message=m["error_message"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        deadline_at=m["deadline_at"],
        inline_inputs=m["inline_inputs"],
        inline_outputs=m["inline_outputs"],
        call_bound=m["call_bound"],
    )
