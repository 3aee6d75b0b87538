"""The queue's state changes on task rows, each guarded in SQL.

Every function runs inside the caller's open transaction. A change to a running task names
its attempt (``WHERE state = ... AND attempt = ...``), so a result from a lost lease can never
overwrite a newer attempt.

Attempts, counted two ways. ``attempt`` numbers every claim (it is the fencing token).
``lost_attempts`` counts the attempts lost to infrastructure (``Cause.LOST``: the agent crashed,
disconnected, drained, went silent past its lease or stopped reporting the attempt, the broker
restarted, or reconciliation found nobody running it); the task's own attempts are the rest.
A workload error fails a task at once (``fail``) and is never retried; an attempt whose result
the broker could not use (``Cause.REJECTED``: a corrupt upload) is retried until the task has
used ``max_attempts`` of its own. A task lost ``max_lost_attempts`` times is failed as a poison
task: it most likely kills whatever agent runs it. An attempt the broker took back before it
started, to give its task to an idle agent (``Cause.RECALLED``), counts with the lost ones but
never fails the task.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gpubroker.billing.models import tasks
from gpubroker.broker.errors import StaleAttemptError, TaskNotFoundError
from gpubroker.broker.model import AgentInfo, Attempt, AttemptOutcome, Task, TaskState
from gpubroker.broker.storage.attempts import end_attempt, end_running, record_claims
from gpubroker.broker.storage.rows import code_to_row, meta_to_json, task_from_row
from gpubroker.protos.states import FailureCode

__all__ = [
    "Cause",
    "LiveRow",
    "Retries",
    "cancel",
    "claim_many",
    "expire",
    "fail",
    "get",
    "live",
    "lost_attempts",
    "mark_succeeded",
    "recover",
    "requeue",
]

_LIVE = (TaskState.QUEUED.value, TaskState.RUNNING.value)
_ORPHAN_MESSAGE = "the Run or RunMany call it belonged to ended when the broker stopped"


class Cause(enum.Enum):
    """Why an attempt goes back to the queue: what its requeue counts against."""

    LOST = "lost"
    """Lost to infrastructure; counts against ``Retries.max_lost_attempts``."""
    REJECTED = "rejected"
    """Its own result could not be used; counts against ``Retries.max_attempts``."""
    RECALLED = "recalled"
    """Taken back before it started, for an idle agent (``broker.core.spread``): counted with
    the lost attempts, as it is not the task's own, but never fails the task."""


@dataclass(frozen=True, slots=True)
class Retries:
    """How many attempts a task may use before a requeue fails it instead."""

    max_attempts: int
    """Attempts of the task's own (claims less those lost to infrastructure)."""
    max_lost_attempts: int
    """Attempts lost to infrastructure; reaching it fails the task as a poison task."""


@dataclass(frozen=True, slots=True)
class LiveRow:
    """Where the database says a live task is (what reconciliation compares with memory)."""

    task_id: str
    state: TaskState
    attempt: int
    agent_id: str | None


def _bind(name: str, column: sa.Column[Any]) -> sa.BindParameter[Any]:
    return sa.bindparam(f"b_{name}", type_=column.type)


# The hot statements are built once: building one per call (and its cache key) cost more than
# running it. Bind names carry a ``b_`` prefix because UPDATE reserves the column names.
_CLAIM_MANY = (
    tasks.update()
    .where(
        tasks.c.id.in_(sa.bindparam("b_ids", expanding=True)),
        tasks.c.state == TaskState.QUEUED.value,
    )
    .values(
        state=TaskState.RUNNING.value,
        attempt=tasks.c.attempt + 1,
        agent_id=_bind("agent_id", tasks.c.agent_id),
        gpu_type=_bind("gpu_type", tasks.c.gpu_type),
        started_at=_bind("now", tasks.c.started_at),
    )
    .returning(*tasks.c)
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
        model_load_seconds=_bind("model_load_seconds", tasks.c.model_load_seconds),
        batch_tasks=_bind("batch_tasks", tasks.c.batch_tasks),
        finished_at=_bind("now", tasks.c.finished_at),
    )
)
"""A success's guarded UPDATE where the caller has the running task (no row to read back)."""
_SUCCEED = _SUCCEED_UNREAD.returning(*tasks.c)


def get(conn: Connection, task_id: str) -> Task:
    """Reads one task; raises ``TaskNotFoundError`` when there is none."""
    row = conn.execute(_GET, {"b_id": task_id}).first()
    if row is None:
        raise TaskNotFoundError(task_id)
    return task_from_row(row)


def claim_many(
    conn: Connection, task_ids: Sequence[str], agent: AgentInfo, now: datetime
) -> list[Task]:
    """Moves queued tasks to running on ``agent``, each at its next attempt, in one statement;
    returns those claimed (a task cancelled or expired while queued is left out). Each claimed
    attempt gets its ``task_attempts`` row."""
    rows = conn.execute(
        _CLAIM_MANY,
        {
            "b_ids": list(task_ids),
            "b_agent_id": agent.agent_id,
            "b_gpu_type": agent.gpu_type,
            "b_now": now,
        },
    )
    claimed = [task_from_row(row) for row in rows]
    record_claims(conn, claimed, now)
    return claimed


def requeue(
    conn: Connection, attempt: Attempt, retries: Retries, now: datetime, reason: str, cause: Cause
) -> Task:
    """Gives an attempt's task back to the queue, or fails it once ``cause``'s cap is reached
    (see the module's docstring)."""
    current = _running_attempt(conn, attempt)
    lost = lost_attempts(conn, attempt.task_id)
    if cause is Cause.RECALLED:
        lost += 1
    elif cause is Cause.LOST:
        lost += 1
        if lost >= retries.max_lost_attempts:
            message = (
                f"poison task: its agent was lost {lost} times (crash, disconnect, silence, "
                f"drain or broker restart; the limit is {retries.max_lost_attempts}); "
                f"last: {reason}"
            )
            return _finish(conn, attempt, TaskState.FAILED, now, FailureCode.ABORTED, message)
    elif (own := current.attempt - lost) >= retries.max_attempts:
        message = f"gave up after {own} attempts whose results could not be used; last: {reason}"
        return _finish(conn, attempt, TaskState.FAILED, now, FailureCode.ABORTED, message)
    conn.execute(
        tasks.update()
        .where(tasks.c.id == attempt.task_id)
        .values(state=TaskState.QUEUED.value, agent_id=None, started_at=None, lost_attempts=lost)
    )
    end_attempt(conn, attempt, now, cause.value, reason)
    return get(conn, attempt.task_id)


def lost_attempts(conn: Connection, task_id: str) -> int:
    """How many of the task's attempts were lost to infrastructure."""
    found = conn.execute(sa.select(tasks.c.lost_attempts).where(tasks.c.id == task_id))
    return int(found.scalar_one())


def live(conn: Connection) -> list[LiveRow]:
    """Every queued or running task: its state, attempt and agent, oldest first."""
    query = (
        sa.select(tasks.c.id, tasks.c.state, tasks.c.attempt, tasks.c.agent_id)
        .where(tasks.c.state.in_(_LIVE))
        .order_by(tasks.c.seq)
    )
    return [LiveRow(r.id, TaskState(r.state), r.attempt, r.agent_id) for r in conn.execute(query)]


def mark_succeeded(
    conn: Connection,
    outcome: AttemptOutcome,
    now: datetime,
    inline_outputs: bytes | None,
    running: Task | None,
) -> Task:
    """Marks a running attempt succeeded with its outputs; returns the succeeded task.

    ``running`` is the task as its claim returned it, where the caller kept it: the guarded
    UPDATE then proves the row is still exactly that attempt, and the succeeded snapshot is
    built from it instead of read back.
    """
    attempt = outcome.attempt
    if running is not None and (
        running.id != attempt.task_id
        or running.attempt != attempt.number
        or running.agent_id != outcome.agent_id
    ):
        raise ValueError(f"{running.id} attempt {running.attempt} is not {attempt}")
    output_bytes = sum(m.nbytes for m in outcome.outputs)
    # Only a model call has a load time and a batch; an operator workload's stay NULL.
    model_call = outcome.batch_tasks > 0 or outcome.model_load_seconds > 0
    model_load_seconds = outcome.model_load_seconds if model_call else None
    batch_tasks = max(outcome.batch_tasks, 1) if model_call else None
    params = {
        "b_id": attempt.task_id,
        "b_attempt": attempt.number,
        "b_agent_id": outcome.agent_id,
        "b_outputs": [meta_to_json(m) for m in outcome.outputs],
        "b_output_bytes": output_bytes,
        "b_inline_outputs": inline_outputs,
        "b_compute_seconds": outcome.compute_seconds,
        "b_model_load_seconds": model_load_seconds,
        "b_batch_tasks": batch_tasks,
        "b_now": now,
    }
    # One guarded UPDATE both checks the lease and writes.
    task: Task | None = None
    if running is None:
        row = conn.execute(_SUCCEED, params).first()
        task = task_from_row(row) if row is not None else None
    elif conn.execute(_SUCCEED_UNREAD, params).rowcount == 1:
        task = dataclasses.replace(
            running,
            state=TaskState.SUCCEEDED,
            outputs=tuple(outcome.outputs),
            output_bytes=output_bytes,
            inline_outputs=inline_outputs,
            compute_seconds=outcome.compute_seconds,
            model_load_seconds=model_load_seconds,
            batch_tasks=batch_tasks,
            finished_at=now.astimezone(UTC),
        )
    if task is None:
        _running_attempt(conn, attempt, outcome.agent_id)  # raises, naming the state
        raise StaleAttemptError(f"attempt {attempt.number} of {attempt.task_id} is stale")
    return task


def fail(
    conn: Connection,
    attempt: Attempt,
    agent_id: str | None,
    code: FailureCode,
    message: str,
    now: datetime,
) -> Task:
    """Marks a running attempt failed (the workload raised or rejected its inputs)."""
    _running_attempt(conn, attempt, agent_id)
    return _finish(conn, attempt, TaskState.FAILED, now, code, message)


def cancel(conn: Connection, task_id: str, tenant: str | None, now: datetime) -> tuple[Task, Task]:
    """Cancels a live task; returns (before, after). A final task stays as it is."""
    before = get(conn, task_id)
    if tenant is not None and before.tenant != tenant:
        raise TaskNotFoundError(task_id)
    if before.state.is_final:
        return before, before
    after = _finish(
        conn,
        Attempt(task_id, before.attempt),
        TaskState.CANCELLED,
        now,
        FailureCode.CANCELLED,
        "cancelled by its owner",
    )
    return before, after


def expire(conn: Connection, now: datetime) -> list[tuple[Task, Task]]:
    """Fails every live task whose deadline has passed; returns (before, after) pairs."""
    rows = conn.execute(
        sa.select(tasks).where(
            tasks.c.state.in_(_LIVE),
            tasks.c.deadline_at.is_not(None),
            tasks.c.deadline_at <= now,
        )
    ).all()
    expired = []
    for row in rows:
        before = task_from_row(row)
        after = _finish(
            conn,
            Attempt(before.id, before.attempt),
            TaskState.FAILED,
            now,
            FailureCode.DEADLINE_EXCEEDED,
            "the task's deadline passed before it finished",
        )
        expired.append((before, after))
    return expired


def recover(conn: Connection, now: datetime) -> tuple[list[Task], list[Task]]:
    """On start: running tasks lost their agents with the old process; queue them again, the
    attempt counted as lost (never as one of the task's own). Live call-bound tasks lost their
    calls with it: they are cancelled.

    Returns every queued task, oldest first, for the scheduler to load, and the tasks
    cancelled (whose payload files can go).
    """
    orphans = conn.execute(
        tasks.update()
        .where(tasks.c.call_bound, tasks.c.state.in_(_LIVE))
        .values(
            state=TaskState.CANCELLED.value,
            error_code=code_to_row(FailureCode.CANCELLED),
            error_message=_ORPHAN_MESSAGE,
            finished_at=now,
        )
        .returning(*tasks.c)
    )
    cancelled = [task_from_row(row) for row in orphans]
    end_running(conn, now, Cause.LOST.value, "the broker restarted")
    conn.execute(
        tasks.update()
        .where(tasks.c.state == TaskState.RUNNING.value)
        .values(
            state=TaskState.QUEUED.value,
            agent_id=None,
            started_at=None,
            lost_attempts=tasks.c.lost_attempts + 1,
        )
    )
    rows = conn.execute(
        sa.select(tasks).where(tasks.c.state == TaskState.QUEUED.value).order_by(tasks.c.seq)
    )
    return [task_from_row(row) for row in rows], cancelled


def _running_attempt(conn: Connection, attempt: Attempt, agent_id: str | None = None) -> Task:
    current = get(conn, attempt.task_id)
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
    conn: Connection,
    attempt: Attempt,
    state: TaskState,
    now: datetime,
    code: FailureCode,
    message: str,
) -> Task:
    conn.execute(
        tasks.update()
        .where(tasks.c.id == attempt.task_id)
        .values(
            state=state.value, error_code=code_to_row(code), error_message=message, finished_at=now
        )
    )
    return get(conn, attempt.task_id)
