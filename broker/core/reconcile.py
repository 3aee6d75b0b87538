"""Reconciliation: the database's queued and running tasks against the queue and the leases.

The database is the truth; the queue and the agents' leases are what the dispatcher acts on.
Every path that changes both commits first and then changes memory inside ``Dispatcher.settle``,
so they should never disagree; this is the net under that rule. Every ``interval_s`` the
reconciler reads each live row and compares:

- a queued row the queue does not hold (and no agent leases) is pushed back;
- a running row that no agent's session leases at its attempt is requeued, through the same
  path as a lost agent (the attempt counts as lost to infrastructure);
- a queued task or a lease the database no longer has live (final, or another attempt) is
  dropped; a dropped lease is also revoked at its agent.

A difference is repaired only when two passes in a row saw it, for a task no commit of the
dispatcher is working on: a submit between its commit and its push, or a claim between its
commit and its lease, looks like a difference for a moment. Each repair is logged at WARNING
and counted (``gpubroker_reconciled_tasks_total{kind}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from gpubroker.broker.core.registry import AgentRegistry
from gpubroker.broker.core.scheduler import FairQueue
from gpubroker.broker.errors import TaskNotFoundError
from gpubroker.broker.model import Attempt, Task, TaskState
from gpubroker.broker.storage.async_store import AsyncTaskStore
from gpubroker.broker.storage.transitions import LiveRow
from gpubroker.logformat import task_fields

__all__ = ["Drift", "Finding", "InFlight", "Reconciler", "Repairs", "compare"]

logger = logging.getLogger(__name__)


class Drift(enum.Enum):
    """A kind of difference between the database and memory (the metric's ``kind`` label)."""

    QUEUED_MISSING = "queued_missing"
    """A queued row the queue does not hold: pushed back."""
    RUNNING_UNLEASED = "running_unleased"
    """A running row no session leases at its attempt: requeued as lost."""
    QUEUED_STALE = "queued_stale"
    """The queue holds a task whose row is no longer queued: dropped from the queue."""
    LEASE_STALE = "lease_stale"
    """A session leases an attempt its row no longer runs there: released and revoked."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One difference: which task, at which attempt, and what differed."""

    drift: Drift
    task_id: str
    attempt: int
    agent_id: str | None = None
    """The agent of the row (running) or of the stale lease."""
    detail: str = field(default="", compare=False)
    """What differed, in words (for the log)."""


Leases = Mapping[str, tuple[str, int]]
"""task id -> (agent id, attempt) of every lease the sessions hold."""


def compare(
    rows: Iterable[LiveRow], queued: Collection[str], leases: Leases, busy: Collection[str]
) -> list[Finding]:
    """The differences between the live rows and memory, leaving out ``busy`` tasks."""
    found: list[Finding] = []
    live: set[str] = set()
    for row in rows:
        live.add(row.task_id)
        if row.task_id not in busy:
            found += _row_drift(row, row.task_id in queued, leases.get(row.task_id))
    for task_id in queued:
        if task_id not in live and task_id not in busy:
            found.append(Finding(Drift.QUEUED_STALE, task_id, 0, None, "row is not live"))
    for task_id, (agent_id, attempt) in leases.items():
        if task_id not in live and task_id not in busy:
            detail = f"{agent_id} leases attempt {attempt}; the row is not live"
            found.append(Finding(Drift.LEASE_STALE, task_id, attempt, agent_id, detail))
    return found


def _row_drift(row: LiveRow, queued: bool, lease: tuple[str, int] | None) -> list[Finding]:
    found: list[Finding] = []
    held = lease == (row.agent_id, row.attempt)
    if lease is not None and not held:
        detail = f"{lease[0]} leases attempt {lease[1]}; the row is {row.state.value} at "
        detail += f"attempt {row.attempt} on {row.agent_id}"
        found.append(Finding(Drift.LEASE_STALE, row.task_id, lease[1], lease[0], detail))
    if row.state is TaskState.QUEUED and not queued:
        detail = "the row is queued; the queue does not hold it"
        found.append(Finding(Drift.QUEUED_MISSING, row.task_id, row.attempt, None, detail))
    elif row.state is TaskState.RUNNING and not held:
        detail = f"the row runs attempt {row.attempt} on {row.agent_id}; no session leases it"
        found.append(
            Finding(Drift.RUNNING_UNLEASED, row.task_id, row.attempt, row.agent_id, detail)
        )
    if row.state is TaskState.RUNNING and queued:
        detail = f"the row runs attempt {row.attempt}; the queue holds it too"
        found.append(Finding(Drift.QUEUED_STALE, row.task_id, row.attempt, None, detail))
    return found


class InFlight:
    """Tasks with a commit in flight (and the in-memory change that follows it)."""

    def __init__(self) -> None:
        self._count: Counter[str] = Counter()

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._count

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._count))

    def __len__(self) -> int:
        return len(self._count)

    def add(self, task_ids: Iterable[str]) -> None:
        """Marks tasks busy (once more each: marks nest)."""
        self._count.update(task_ids)

    def discard(self, task_ids: Iterable[str]) -> None:
        """Takes back one mark of each task."""
        for task_id in task_ids:
            self._count[task_id] -= 1
            if self._count[task_id] <= 0:
                del self._count[task_id]

    @contextlib.contextmanager
    def working(self, task_ids: Iterable[str]) -> Iterator[None]:
        """Marks tasks busy for the duration of the block."""
        ids = list(task_ids)
        self.add(ids)
        try:
            yield
        finally:
            self.discard(ids)


class Repairs(Protocol):
    """What the reconciler asks of the dispatcher, which owns the queue and the leases."""

    @property
    def in_flight(self) -> InFlight:
        """Tasks with a commit of the dispatcher in flight."""

    def restore(self, task: Task) -> None:
        """Pushes a queued task back into the queue."""

    async def requeue_lost(self, attempt: Attempt, reason: str) -> None:
        """Requeues a running attempt as lost to infrastructure."""

    def revoke(self, agent_id: str, attempt: Attempt, reason: str) -> None:
        """Releases a lease and tells its agent to stop the attempt."""


class Reconciler:
    """Compares the database with memory every ``interval_s`` and repairs what differs."""

    def __init__(
        self,
        store: AsyncTaskStore,
        queue: FairQueue,
        registry: AgentRegistry,
        repairs: Repairs,
        interval_s: float,
        on_repair: Callable[[Drift], None] = lambda drift: None,
    ) -> None:
        self._store = store
        self._queue = queue
        self._registry = registry
        self._repairs = repairs
        self._interval_s = interval_s
        self._on_repair = on_repair
        self._suspects: set[Finding] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts the periodic pass (none when ``interval_s`` is 0)."""
        if self._interval_s > 0:
            self._task = asyncio.create_task(self._loop(), name="reconcile")

    async def stop(self) -> None:
        """Stops the periodic pass."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def reconcile(self) -> list[Finding]:
        """One pass: repairs what this pass and the one before both found; returns it."""
        rows = await self._store.live()
        leases = {
            task_id: (session.agent_id, lease.attempt)
            for session in self._registry.sessions()
            for task_id, lease in session.leases.items()
        }
        found = compare(rows, self._queue.ids(), leases, self._repairs.in_flight)
        confirmed = [f for f in found if f in self._suspects]
        self._suspects = set(found) - set(confirmed)
        repaired = [f for f in confirmed if await self._repair(f)]
        return repaired

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.reconcile()
            except Exception:  # one failed pass (database away) must not end the next ones
                logger.exception("reconciliation pass failed")

    async def _repair(self, finding: Finding) -> bool:
        """Applies one repair, after reading the row again; False when it no longer applies."""
        try:
            task: Task | None = await self._store.get(finding.task_id)
        except TaskNotFoundError:
            task = None
        if finding.task_id in self._repairs.in_flight or not await self._apply(finding, task):
            return False
        logger.warning(
            "reconciled task %s (%s): %s", finding.task_id, finding.drift.value, finding.detail,
            extra=task_fields(finding.task_id),
        )  # fmt: skip
        self._on_repair(finding.drift)
        return True

    async def _apply(self, finding: Finding, task: Task | None) -> bool:
        state = task.state if task is not None else None
        if finding.drift is Drift.QUEUED_MISSING:
            if task is None or state is not TaskState.QUEUED or task.id in self._queue:
                return False
            self._repairs.restore(task)
        elif finding.drift is Drift.RUNNING_UNLEASED:
            if task is None or state is not TaskState.RUNNING or self._leased(task):
                return False
            attempt = Attempt(task.id, task.attempt)
            await self._repairs.requeue_lost(attempt, "reconciliation found no agent leasing it")
        elif finding.drift is Drift.QUEUED_STALE:
            return state is not TaskState.QUEUED and self._queue.remove(finding.task_id)
        else:
            where = (finding.agent_id, finding.attempt)
            if task is not None and state is TaskState.RUNNING and where == _runs_at(task):
                return False
            attempt = Attempt(finding.task_id, finding.attempt)
            self._repairs.revoke(finding.agent_id or "", attempt, "not the task's current attempt")
        return True

    def _leased(self, task: Task) -> bool:
        session = self._registry.get(task.agent_id or "")
        return session is not None and session.holds(Attempt(task.id, task.attempt))


def _runs_at(task: Task) -> tuple[str | None, int]:
    return task.agent_id, task.attempt
