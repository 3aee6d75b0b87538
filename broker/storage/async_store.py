"""The task store for the event loop: one database thread, with group commit.

The task core reaches SQL only through here (the API keys and the VM log have SQL of their
own, in ``gpubroker.broker.access.tenants`` and ``gpubroker.billing``). Calls from the event loop
queue up while the thread is busy; the next round runs all of them in one transaction
(``TaskStore.run_batch``), so eight concurrent submits cost one commit and one fsync instead of
eight. A caller's future resolves only after its batch has committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar, cast

from gpubroker.billing.budget import BudgetStatus
from gpubroker.billing.ledger import UsageSummary
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
from gpubroker.broker.storage.store import TaskStore
from gpubroker.broker.storage.transitions import Cause, LiveRow, Retries
from gpubroker.protos.states import FailureCode

__all__ = ["MAX_BATCH", "AsyncTaskStore"]

_T = TypeVar("_T")

MAX_BATCH = 256
"""Most operations in one transaction: bounds how long one commit holds the others."""


class AsyncTaskStore:
    """``TaskStore``'s operations as coroutines, run on one dedicated thread in batches.

    Each method takes the arguments of the ``TaskStore`` method of the same name and returns
    once the batch it ran in has committed.
    """

    def __init__(self, store: TaskStore) -> None:
        self._store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-store")
        self._pending: list[tuple[Callable[[], object], asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    async def create(
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
        s = self._store
        return await self._run(
            functools.partial(
                s.create, task_id, tenant, spec, now, deadline, inline_inputs, call_bound=call_bound
            )
        )

    async def find_request(self, tenant: str, spec: TaskSpec) -> Task | None:
        """The tenant's task made for ``spec.request_id``, if any."""
        return await self._run(functools.partial(self._store.find_request, tenant, spec))

    async def get(self, task_id: str, tenant: str | None = None) -> Task:
        """Returns a task; another tenant's task is reported as not found."""
        return await self._run(functools.partial(self._store.get, task_id, tenant))

    async def page(
        self, tenant: str, states: Sequence[TaskState], limit: int, before_seq: int | None
    ) -> list[Task]:
        """Returns a tenant's tasks, newest first."""
        return await self._run(
            functools.partial(self._store.page, tenant, states, limit, before_seq)
        )

    async def recent(self, tenant: str | None, limit: int) -> list[Task]:
        """The ``limit`` newest tasks (of one tenant, or of all), newest first."""
        return await self._run(functools.partial(self._store.recent, tenant, limit))

    async def attempts(self, found: Iterable[Task]) -> dict[str, tuple[AttemptRecord, ...]]:
        """Every attempt of each task, oldest first, by task id."""
        return await self._run(functools.partial(self._store.attempts, list(found)))

    async def oldest_queued(self) -> datetime | None:
        """When the longest-waiting queued task was created; None when nothing is queued."""
        return await self._run(self._store.oldest_queued)

    async def claim_many(
        self, task_ids: Sequence[str], agent: AgentInfo, now: datetime
    ) -> list[Task]:
        """Moves queued tasks to running on ``agent``; returns those claimed."""
        return await self._run(functools.partial(self._store.claim_many, task_ids, agent, now))

    async def requeue(
        self, attempt: Attempt, retries: Retries, now: datetime, reason: str, cause: Cause
    ) -> Task:
        """Gives an attempt's task back to the queue, or fails it once the cap of ``cause`` is
        reached."""
        return await self._run(
            functools.partial(self._store.requeue, attempt, retries, now, reason, cause)
        )

    async def live(self) -> list[LiveRow]:
        """Every queued or running task's state, attempt and agent (for reconciliation)."""
        return await self._run(self._store.live)

    async def lost_attempts(self, task_id: str) -> int:
        """How many of the task's attempts were lost to infrastructure."""
        return await self._run(functools.partial(self._store.lost_attempts, task_id))

    async def succeed(
        self,
        outcome: AttemptOutcome,
        now: datetime,
        inline_outputs: bytes | None = None,
        running: Task | None = None,
    ) -> Task:
        """Marks an attempt succeeded and writes its usage row, in one transaction."""
        return await self._run(
            functools.partial(self._store.succeed, outcome, now, inline_outputs, running)
        )

    async def fail(
        self,
        attempt: Attempt,
        agent_id: str | None,
        code: FailureCode,
        message: str,
        now: datetime,
    ) -> Task:
        """Marks a running attempt failed."""
        return await self._run(
            functools.partial(self._store.fail, attempt, agent_id, code, message, now)
        )

    async def cancel(self, task_id: str, tenant: str | None, now: datetime) -> tuple[Task, Task]:
        """Cancels a live task; returns (before, after)."""
        return await self._run(functools.partial(self._store.cancel, task_id, tenant, now))

    async def expire(self, now: datetime) -> list[tuple[Task, Task]]:
        """Fails every live task whose deadline has passed; returns (before, after) pairs."""
        return await self._run(functools.partial(self._store.expire, now))

    async def recover(self, now: datetime) -> tuple[list[Task], list[Task]]:
        """Requeues running tasks and cancels live call-bound ones (a broker's start)."""
        return await self._run(functools.partial(self._store.recover, now))

    async def usage(
        self, tenant: str, since: datetime | None, until: datetime | None, now: datetime
    ) -> tuple[UsageSummary, BudgetStatus]:
        """A tenant's billed usage over ``[since, until)``, and its month against its budget."""
        return await self._run(functools.partial(self._store.usage, tenant, since, until, now))

    async def add_workloads(self, names: Iterable[str], now: datetime) -> None:
        """Remembers workload names an agent advertised."""
        await self._run(functools.partial(self._store.add_workloads, names, now))

    async def known_workloads(self) -> frozenset[str]:
        """Every workload name any agent has advertised."""
        return await self._run(self._store.known_workloads)

    def check_priced(self, gpu_type: str) -> None:
        """Raises ``AgentRefusedError`` unless ``gpu_type`` can be billed: a pure lookup in
        the price catalog, so it needs no database thread."""
        self._store.check_priced(gpu_type)

    async def models(self) -> list[ModelRecord]:
        """Every tenant's models, oldest first."""
        return await self._run(self._store.models)

    async def add_model(self, record: ModelRecord) -> None:
        """Adds a model the tenant does not hold yet."""
        await self._run(functools.partial(self._store.add_model, record))

    async def update_model(self, record: ModelRecord) -> None:
        """Writes a held model's name and options."""
        await self._run(functools.partial(self._store.update_model, record))

    async def delete_model(self, tenant: str, model_id: str) -> tuple[ModelRecord, bool]:
        """Deletes a model no live task names; returns it and whether its file is unreferenced."""
        return await self._run(functools.partial(self._store.delete_model, tenant, model_id))

    async def close(self) -> None:
        """Finishes queued calls, then stops the database thread."""
        if self._writer is not None:
            while self._pending:
                await asyncio.sleep(0.01)
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        self._executor.shutdown(wait=True)

    async def _run(self, op: Callable[[], _T]) -> _T:
        """Runs ``op`` (a bound ``TaskStore`` call) in the next batch; returns after commit."""
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop(), name="task-store")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        self._wake.set()
        return cast(_T, await future)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                ops = [op for op, _ in batch]
                try:
                    results = await loop.run_in_executor(self._executor, self._store.run_batch, ops)
                except Exception as exc:  # a lone operation failed: hand it its error
                    results = [exc]
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
