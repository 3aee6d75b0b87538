"""A RunMany call that hangs up while one of its tasks commits leaves nothing running.

The commit carries on after the caller's cancellation (the dispatcher settles it), so the task
is created after the call has gone; it must then be cancelled, or it runs and is billed for
nobody. The task service here is a stand-in whose submit waits for the test to let it commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

from gpubroker.broker.core.batch import InlineTask, TaskBatch
from gpubroker.broker.core.events import TaskEvents
from gpubroker.broker.model import Task, TaskSpec, TaskState
from tests.support.waiting import wait_for


class _SlowCommits:
    """Submits commit only when ``commit`` is set; cancels are recorded."""

    def __init__(self) -> None:
        self.commit = asyncio.Event()
        self.started = 0
        self.cancelled: list[str] = []
        self._events = TaskEvents()

    def follow(self, sink: asyncio.Queue[Task | None]) -> object:
        return self._events.subscription(sink)

    async def pace(self, tenant: str, tasks: int) -> None:
        return None

    async def submit(
        self, tenant: str, spec: TaskSpec, chunks: AsyncIterator[bytes], **_: object
    ) -> tuple[Task, bool]:
        self.started += 1
        await self.commit.wait()
        task = Task(
            id=f"t{self.started}", tenant=tenant, workload=spec.workload, params={}, priority=0,
            state=TaskState.QUEUED, attempt=0, inputs=(), outputs=(), input_bytes=0,
            output_bytes=0, created_at=datetime.now(UTC),
        )  # fmt: skip
        return task, False

    async def cancel_quietly(self, task_id: str) -> None:
        self.cancelled.append(task_id)


async def _requests(items: Sequence[InlineTask]) -> AsyncIterator[Sequence[InlineTask]]:
    yield items
    await asyncio.Event().wait()  # the caller keeps the call open


async def test_a_task_committed_after_the_caller_hung_up_is_cancelled() -> None:
    service = _SlowCommits()
    batch = TaskBatch(service, "tenant-a")  # type: ignore[arg-type]
    item = InlineTask(0, TaskSpec("echo", ()), b"")

    async def consume() -> None:
        async for _ in batch.run(_requests([item])):
            pass

    call = asyncio.create_task(consume())
    await wait_for(lambda: service.started == 1, 5, "the submit to start")
    call.cancel()  # the caller hangs up while the commit is in progress
    await asyncio.gather(call, return_exceptions=True)
    service.commit.set()  # ...and the commit completes afterwards

    await wait_for(lambda: service.cancelled == ["t1"], 5, "the late task to be cancelled")
