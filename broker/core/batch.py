"""``RunMany``: many small tasks on one call, taken in batches and answered as they finish.

For tasks of a few bytes the per-call cost (a stream, a header, chunks, state messages) is
most of the work, so ``RunMany`` carries each task's inputs inline and answers only once per
task, with its final state and (small) outputs. Every task is still a full task: checked,
committed durably before it is queued, billed, visible to ``GetTask``. Concurrent submits of
one batch share one transaction (see ``gpubroker.broker.storage.async_store``).

A ``TaskBatch`` belongs to one call. It bounds the tasks live at once (``max_live``), so a
caller streaming faster than the agents run waits, through gRPC flow control, instead of
filling the broker's memory; and when the call goes away its live tasks are cancelled, as
``Run`` does for its one task.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from gpubroker.broker.core.tasks import TaskService
from gpubroker.broker.errors import BrokerError, InvalidTaskError
from gpubroker.broker.model import Task, TaskSpec
from gpubroker.protos.wire import INLINE_MAX_BYTES

__all__ = ["MAX_LIVE", "BatchOutcome", "InlineTask", "TaskBatch"]

MAX_LIVE = 4096
"""Most tasks of one call queued or running at once."""


@dataclass(frozen=True, slots=True)
class InlineTask:
    """One task of a batch, with its input bytes."""

    index: int
    """The caller's number for the task."""
    spec: TaskSpec
    data: bytes
    """The inputs' bytes, concatenated."""


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """A task that reached a final state, or one refused before it was created."""

    index: int
    task: Task | None = None
    """The final task; None when refused."""
    error: BrokerError | None = None
    """Why the task was refused."""


class TaskBatch:
    """The tasks of one ``RunMany`` call: ``run`` takes its batches and yields its outcomes."""

    def __init__(self, tasks: TaskService, tenant: str, max_live: int = MAX_LIVE) -> None:
        self._tasks = tasks
        self._tenant = tenant
        self._max_live = max_live
        self._live: dict[str, int] = {}  # task id -> index
        self._indexes: set[int] = set()
        self._inbox: asyncio.Queue[Task | BatchOutcome | None] = asyncio.Queue()
        self._room = asyncio.Condition()
        self._closed = False
        self._subscription = tasks.follow(self._inbox)
        self._orphans: set[asyncio.Future[Any]] = set()
        """Cancels of tasks whose submit committed after the call hung up (see ``_submit``)."""

    async def run(
        self, requests: AsyncIterator[Sequence[InlineTask | BatchOutcome]]
    ) -> AsyncIterator[list[BatchOutcome]]:
        """Submits each batch of ``requests`` as it comes and yields outcomes as the tasks end,
        until the input has ended and no task is live.

        A batch item may be an outcome already: a task refused while it was decoded. A caller
        who hangs up cancels every task of the call still live.
        """
        feeder = asyncio.create_task(self._feed(requests))
        try:
            async for outcomes in self.outcomes():
                yield outcomes
            await feeder
        except asyncio.CancelledError:
            await asyncio.shield(self.cancel_live())  # the caller hung up
            raise
        finally:
            feeder.cancel()
            self.close()

    def close(self) -> None:
        """Stops following the call's tasks (they carry on)."""
        self._subscription.close()

    async def submit(self, items: Sequence[InlineTask]) -> None:
        """Creates and queues the tasks once there is room for them; refusals become outcomes."""
        async with self._room:
            await self._room.wait_for(lambda: len(self._live) < self._max_live)
        await self._tasks.pace(self._tenant, len(items))  # slowed to the rate, not refused
        await asyncio.gather(*(self._submit(item) for item in items))

    def refuse(self, index: int, error: BrokerError) -> None:
        """Reports a task refused before it could be submitted (e.g. a malformed header)."""
        self._inbox.put_nowait(BatchOutcome(index, error=error))

    def end_of_input(self) -> None:
        """No more batches will come: ``outcomes`` ends once the live tasks are final."""
        self._closed = True
        self._inbox.put_nowait(None)

    async def outcomes(self) -> AsyncIterator[list[BatchOutcome]]:
        """Yields the outcomes ready at each wake-up, until input ended and nothing is live."""
        while not (self._closed and not self._live and self._inbox.empty()):
            ready = self._take(await self._inbox.get())
            while not self._inbox.empty():
                ready += self._take(self._inbox.get_nowait())
            if ready:
                async with self._room:
                    self._room.notify_all()
                yield ready

    async def cancel_live(self) -> None:
        """Cancels every task of the call that is not final yet (the caller went away)."""
        for task_id in list(self._live):
            await self._tasks.cancel_quietly(task_id)

    async def _feed(self, requests: AsyncIterator[Sequence[InlineTask | BatchOutcome]]) -> None:
        try:
            async for items in requests:
                tasks = []
                for item in items:
                    if isinstance(item, InlineTask):
                        tasks.append(item)
                    else:
                        self._inbox.put_nowait(item)
                await self.submit(tasks)
        finally:
            self.end_of_input()

    async def _submit(self, item: InlineTask) -> None:
        try:
            if item.index in self._indexes:
                raise InvalidTaskError(f"index {item.index} is used twice on this call")
            if len(item.data) > INLINE_MAX_BYTES:
                raise InvalidTaskError(
                    f"task {item.index} carries {len(item.data)} bytes; RunMany takes at most "
                    f"{INLINE_MAX_BYTES} per task (use Submit or Run for larger inputs)"
                )
            self._indexes.add(item.index)
            submitting = asyncio.ensure_future(
                self._tasks.submit(
                    self._tenant, item.spec, _once(item.data), paced=True, call_bound=True
                )
            )
            try:
                task, _ = await asyncio.shield(submitting)
            except asyncio.CancelledError:
                # The caller hung up while the task's commit ran: the commit carries on (the
                # dispatcher settles it), and the task is not in ``_live`` for ``cancel_live``
                # to find, so it would run, and be billed, for nobody. Cancel it once created.
                submitting.add_done_callback(self._cancel_orphan)
                raise
        except BrokerError as exc:
            self._inbox.put_nowait(BatchOutcome(item.index, error=exc))
            return
        # No await since the task was queued: no snapshot can have been missed.
        if task.state.is_final:
            self._inbox.put_nowait(BatchOutcome(item.index, task=task))
        elif task.id not in self._live:
            self._live[task.id] = item.index
            self._subscription.add(task.id)

    def _cancel_orphan(self, submitting: asyncio.Future[tuple[Task, bool]]) -> None:
        if submitting.cancelled() or submitting.exception() is not None:
            return  # nothing was created
        task, _ = submitting.result()
        if not task.state.is_final:
            cancel = asyncio.ensure_future(self._tasks.cancel_quietly(task.id))
            self._orphans.add(cancel)
            cancel.add_done_callback(self._orphans.discard)

    def _take(self, item: Task | BatchOutcome | None) -> list[BatchOutcome]:
        if item is None or isinstance(item, BatchOutcome):
            return [] if item is None else [item]
        if not item.state.is_final or item.id not in self._live:
            return []
        self._subscription.discard(item.id)
        return [BatchOutcome(self._live.pop(item.id), task=item)]


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
