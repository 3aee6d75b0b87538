"""Reads what a status is built from: the queue and agents in memory, the database for the
rest. ``core.status`` builds it.

The recent tasks and their attempts come through the task store (its database thread); the
spend and the live machines are billing's figures (``billing.ledger.summaries``,
``billing.vms.idle_overhead`` and ``live_machines``), read on a worker thread so the event
loop never waits on SQL.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from sqlalchemy.engine import Engine

from gpubroker.billing.budget import month_start
from gpubroker.billing.ledger import summaries
from gpubroker.billing.vms import LiveMachine, idle_overhead, live_machines, overhead_total
from gpubroker.broker.access.roles import Caller
from gpubroker.broker.core.registry import AgentRegistry
from gpubroker.broker.core.scheduler import FairQueue
from gpubroker.broker.core.status import (
    Spend,
    Status,
    TaskLine,
    agent_lines,
    build_status,
    machine_lines,
    queue_lines,
    recent_limit,
)
from gpubroker.broker.storage.async_store import AsyncTaskStore

__all__ = ["StatusSource", "read_spend"]


def _no_machines_stopping() -> Iterable[str]:
    return ()


class StatusSource:
    """Builds the status a caller may see, from the broker's live objects and its database.

    ``stopping`` names the machines the autoscaler is deleting now (none without one; the
    broker sets it once its autoscaler exists).
    """

    def __init__(
        self,
        store: AsyncTaskStore,
        engine: Engine,
        queue: FairQueue,
        registry: AgentRegistry,
        stopping: Callable[[], Iterable[str]] = _no_machines_stopping,
    ) -> None:
        self._store = store
        self._engine = engine
        self._queue = queue
        self._registry = registry
        self.stopping = stopping

    async def status(self, caller: Caller, recent_tasks: int = 0) -> Status:
        """The status ``caller`` may see, with up to ``recent_tasks`` recent tasks (0: 20)."""
        now = datetime.now(UTC)
        operator = caller.is_operator
        scope = None if operator else caller.tenant
        waiting, mono = self._queue.waiting(), time.monotonic()
        sessions = self._registry.sessions()
        running = Counter(lease.tenant for s in sessions for lease in s.leases.values())
        stopping = tuple(self.stopping())
        spend, machines = await asyncio.to_thread(self._read_database, scope, now)
        recent = await self._store.recent(scope, recent_limit(recent_tasks))
        attempts = await self._store.attempts(recent)
        return build_status(
            now=now,
            tenant=caller.tenant,
            operator=operator,
            queue=queue_lines(waiting, mono, scope),
            running=running,
            agents=agent_lines(sessions, (m.name for m in machines)),
            machines=machine_lines(machines, (s.agent_id for s in sessions), stopping, now),
            spend=spend,
            recent=[TaskLine(task, attempts.get(task.id, ())) for task in recent],
        )

    def _read_database(self, tenant: str | None, now: datetime) -> tuple[Spend, list[LiveMachine]]:
        return read_spend(self._engine, tenant, now), live_machines(self._engine, now)


def read_spend(engine: Engine, tenant: str | None, now: datetime) -> Spend:
    """Billed compute today and this month (UTC) of ``tenant``, or of everyone with the
    machines' cost and the idle overhead (None). Blocking: run it on a worker thread."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    month = month_start(now)
    with engine.connect() as conn:
        today = summaries(conn, by="tenant", since=day, tenant=tenant)
        this_month = summaries(conn, by="tenant", since=month, tenant=tenant)
        billed = Spend(
            today_nanousd=sum(s.cost_nanousd for s in today),
            month_nanousd=sum(s.cost_nanousd for s in this_month),
            today_tasks=sum(s.tasks for s in today),
            month_tasks=sum(s.tasks for s in this_month),
        )
        if tenant is not None:
            return billed
        day_total = overhead_total(idle_overhead(conn, day, None, now=now))
        month_total = overhead_total(idle_overhead(conn, month, None, now=now))
    return Spend(
        today_nanousd=billed.today_nanousd,
        month_nanousd=billed.month_nanousd,
        today_tasks=billed.today_tasks,
        month_tasks=billed.month_tasks,
        machines_today_nanousd=day_total.vm_cost_nanousd,
        machines_month_nanousd=month_total.vm_cost_nanousd,
        idle_today_nanousd=day_total.idle_nanousd,
        idle_month_nanousd=month_total.idle_nanousd,
    )
