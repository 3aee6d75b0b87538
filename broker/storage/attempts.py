"""Which agent ran each attempt of a task, and how the attempt ended (``task_attempts``).

A claim writes one row per task it claims; a requeue ends the requeued attempt's row with its
cause (``lost``, ``rejected``, ``recalled``). The task's last attempt ends with the task, so a
success, failure, cancellation or deadline writes nothing here: ``attempts_of`` reads that end
from the task's own row. That keeps the success path at the one guarded UPDATE it had.

Every function runs inside the caller's open transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gpubroker.billing.models import task_attempts, tasks, vm_instances
from gpubroker.broker.model import Attempt, AttemptRecord, Task, TaskState

__all__ = ["attempts_of", "end_attempt", "end_running", "record_claims"]

_RUNNING = "running"
_UNKNOWN_END = "lost"
"""An attempt neither ended here nor the task's last: the broker lost track of it."""

_INSERT = sa.insert(task_attempts)


def record_claims(conn: Connection, claimed: Sequence[Task], now: datetime) -> None:
    """Writes a row for the attempt of each task a claim just took."""
    if not claimed:
        return
    conn.execute(
        _INSERT,
        [
            {
                "task_id": task.id,
                "attempt": task.attempt,
                "agent_id": task.agent_id or "",
                "gpu_type": task.gpu_type or "",
                "started_at": now,
            }
            for task in claimed
        ],
    )


def end_attempt(
    conn: Connection, attempt: Attempt, now: datetime, outcome: str, detail: str
) -> None:
    """Ends an attempt that went back to the queue, naming why."""
    conn.execute(
        sa.update(task_attempts)
        .where(
            task_attempts.c.task_id == attempt.task_id,
            task_attempts.c.attempt == attempt.number,
            task_attempts.c.ended_at.is_(None),
        )
        .values(ended_at=now, outcome=outcome, detail=detail)
    )


def end_running(conn: Connection, now: datetime, outcome: str, detail: str) -> None:
    """Ends the current attempt of every running task (a broker restart lost them all)."""
    current = (
        sa.select(tasks.c.id)
        .where(
            tasks.c.id == task_attempts.c.task_id,
            tasks.c.attempt == task_attempts.c.attempt,
            tasks.c.state == TaskState.RUNNING.value,
        )
        .exists()
    )
    conn.execute(
        sa.update(task_attempts)
        .where(task_attempts.c.ended_at.is_(None), current)
        .values(ended_at=now, outcome=outcome, detail=detail)
    )


def attempts_of(conn: Connection, found: Iterable[Task]) -> dict[str, tuple[AttemptRecord, ...]]:
    """Every attempt of each task, oldest first, by task id (none for a task never claimed).

    An agent's machine is named when a provider started a machine of its id.
    """
    by_id = {task.id: task for task in found if task.attempt > 0}
    if not by_id:
        return {}
    query = (
        sa.select(task_attempts, vm_instances.c.name.label("machine_name"))
        .outerjoin(vm_instances, vm_instances.c.name == task_attempts.c.agent_id)
        .where(task_attempts.c.task_id.in_(list(by_id)))
        .order_by(task_attempts.c.task_id, task_attempts.c.attempt)
    )
    records: dict[str, list[AttemptRecord]] = {}
    for row in conn.execute(query):
        records.setdefault(row.task_id, []).append(_record(row, by_id[row.task_id]))
    return {task_id: tuple(found) for task_id, found in records.items()}


def _record(row: Any, task: Task) -> AttemptRecord:
    ended_at, outcome, detail = row.ended_at, row.outcome, row.detail or ""
    if ended_at is None:
        if row.attempt != task.attempt:
            outcome = _UNKNOWN_END
        elif task.state.is_final:
            ended_at, outcome = task.finished_at, task.state.value
            detail = task.error_message or ""
        else:
            outcome = _RUNNING
    return AttemptRecord(
        number=row.attempt,
        agent_id=row.agent_id,
        gpu_type=row.gpu_type,
        started_at=row.started_at,
        ended_at=ended_at,
        outcome=outcome or _UNKNOWN_END,
        detail=detail,
        machine_name=row.machine_name or "",
    )
