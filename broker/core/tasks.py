"""What clients do with tasks: submit, run, look up, list, watch, fetch results, cancel.

Domain logic only: the client servicer converts messages and maps errors around these calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from gpubroker.billing.budget import BudgetStatus
from gpubroker.billing.ledger import UsageSummary
from gpubroker.broker.config import Limits
from gpubroker.broker.core.dispatcher import Dispatcher
from gpubroker.broker.core.events import Subscription, TaskEvents, TaskSink
from gpubroker.broker.core.models import ModelService
from gpubroker.broker.core.quota import SubmitQuota
from gpubroker.broker.core.scheduler import FairQueue
from gpubroker.broker.core.workloads import KnownWorkloads
from gpubroker.broker.errors import (
    InvalidTaskError,
    LimitExceededError,
    PayloadLostError,
    TaskEndedError,
    UnknownWorkloadError,
)
from gpubroker.broker.model import AttemptRecord, Task, TaskSpec, TaskState
from gpubroker.broker.storage.async_store import AsyncTaskStore
from gpubroker.broker.storage.retention import SpoolKeeper
from gpubroker.broker.storage.spool import INLINE_MAX_BYTES, Spool
from gpubroker.protos.ids import time_ordered_id
from gpubroker.protos.states import FailureCode
from gpubroker.protos.wire import MAX_PAGE_SIZE, TensorMeta, TensorStream, WireError

__all__ = ["DEADLINE_SLACK_S", "TaskService", "check_spec"]

POSITION_REFRESH_S = 2.0
"""How often a watch of a queued task looks again at its place in the queue, which moves with
other tasks' events, not its own."""

DEADLINE_SLACK_S = 0.25
"""A Run call cancelled with less than this left of its deadline is taken to have timed out."""


class TaskService:
    """Client-facing task operations, each scoped to the calling tenant."""

    def __init__(
        self,
        store: AsyncTaskStore,
        spool: Spool,
        dispatcher: Dispatcher,
        events: TaskEvents,
        queue: FairQueue,
        workloads: KnownWorkloads,
        limits: Limits,
        models: ModelService,
        keeper: SpoolKeeper | None = None,
    ) -> None:
        self._store = store
        self._keeper = keeper
        self._spool = spool
        self._dispatcher = dispatcher
        self._events = events
        self._workloads = workloads
        self._limits = limits
        self._models = models
        self._queue = queue
        self._quota = SubmitQuota(
            limits.submit_rate_per_s,
            limits.submit_burst,
            limits.max_queued_per_tenant,
            queue.queued,
        )

    async def pace(self, tenant: str, tasks: int) -> None:
        """Waits until the tenant's submit rate allows ``tasks`` more (see ``SubmitQuota``)."""
        await self._quota.pace(tenant, tasks)

    async def submit(
        self,
        tenant: str,
        spec: TaskSpec,
        chunks: AsyncIterator[bytes | memoryview],
        *,
        paced: bool = False,
        call_bound: bool = False,
    ) -> tuple[Task, bool]:
        """Checks the spec, spools and checks the bytes, commits the task and queues it.

        Returns the task and whether an earlier submit with the same request_id created it.
        Nothing is queued unless every declared byte arrived with a matching checksum, and
        nothing is spooled for a tenant over its queue or rate quota. A ``call_bound`` task
        (``Run``, ``RunMany``) lives as long as its call: see ``Task.call_bound``.
        """
        check_spec(spec, self._limits, self._workloads.names)
        spec = self._models.resolve(tenant, spec)  # a model task: its inputs and requirement
        self._dispatcher.check_requirement(spec.requires)  # FAILED_PRECONDITION: no such GPU
        if spec.request_id and spec.input_bytes > INLINE_MAX_BYTES:
            # A retry of a large upload is answered before its bytes are spooled a second
            # time; small ones are deduplicated inside the insert's own transaction.
            existing = await self._store.find_request(tenant, spec)
            if existing is not None:
                return existing, True
        # Admission after the header checks, so a malformed header costs no token; before the
        # bytes, so a tenant over quota costs no disk or SQL. The place is held until queued.
        with self._quota.admit(tenant, paid=paced):
            task_id = time_ordered_id()
            # No room (memory, a file, a writer thread) is taken before bytes arrive: a stream
            # that declares gigabytes and sends nothing holds nothing until it is cut.
            chunks = await _started(chunks)
            writer = self._spool.write_inputs(task_id, spec.input_bytes, call_bound=call_bound)
            try:
                await _spool(writer.write, spec, chunks)
                await writer.commit()
            except WireError as exc:
                writer.abort()
                raise InvalidTaskError(str(exc)) from exc
            except BaseException:
                writer.abort()
                raise
            return await self._dispatcher.settle(
                self._commit(task_id, tenant, spec, writer.inline, call_bound)
            )

    async def _commit(
        self, task_id: str, tenant: str, spec: TaskSpec, inline: bytes | None, call_bound: bool
    ) -> tuple[Task, bool]:
        """Writes the task's row, then queues it (or drops the inputs of a duplicate)."""
        now = datetime.now(UTC)
        deadline = now + timedelta(seconds=spec.timeout_s) if spec.timeout_s else None
        try:
            task, deduplicated = await self._store.create(
                task_id, tenant, spec, now, deadline, inline, call_bound=call_bound
            )
        except BaseException:
            self._spool.delete_inputs(task_id)
            raise
        if deduplicated:
            self._spool.delete_inputs(task_id)
        else:
            self._dispatcher.enqueue(task)
        return task, deduplicated

    async def run(
        self,
        tenant: str,
        spec: TaskSpec,
        chunks: AsyncIterator[bytes | memoryview],
        time_left_s: Callable[[], float | None],
    ) -> AsyncIterator[Task | bytes]:
        """Submits a task that lives as long as its call; yields the task now and after every
        change until it is final, then its outputs' bytes.

        ``time_left_s`` tells the seconds the call has left (None: no deadline): a deadline
        sooner than the spec's timeout becomes the task's. A caller who hangs up cancels the
        task; at its deadline the task is left to the sweep, which fails it with
        DEADLINE_EXCEEDED (the caller's clock runs out a little before ours, hence
        ``DEADLINE_SLACK_S``).
        """
        remaining = time_left_s()
        if remaining is not None and (spec.timeout_s is None or remaining < spec.timeout_s):
            spec = replace(spec, timeout_s=max(remaining, 0.001))
        submitted, deduplicated = await self.submit(tenant, spec, chunks, call_bound=True)
        try:
            task = submitted
            known = None if deduplicated else submitted  # an old task may have moved on
            async for task in self.watch(tenant, submitted.id, known):
                yield task
            async for data in self.result_chunks(task):
                yield data
        except asyncio.CancelledError:
            remaining = time_left_s()
            if remaining is None or remaining > DEADLINE_SLACK_S:
                await asyncio.shield(self.cancel_quietly(submitted.id))
            raise

    def waiting_for(self, task: Task) -> str:
        """Why a queued task still waits, for its status ("" when next in line or not queued)."""
        return self._dispatcher.waiting_for(task)

    def queue_position(self, task: Task) -> int:
        """A queued task's place in the queue of its placement class (1: next); 0 when it is
        not queued (``FairQueue.position``)."""
        return self.queue_positions((task,)).get(task.id, 0)

    def queue_positions(self, found: Iterable[Task]) -> dict[str, int]:
        """The queue positions of those tasks that are queued, by id (one pass per class)."""
        return self._queue.positions(t.id for t in found if t.state is TaskState.QUEUED)

    async def attempts(self, found: Iterable[Task]) -> dict[str, tuple[AttemptRecord, ...]]:
        """Where each attempt of each task ran and how it ended, by task id."""
        return await self._store.attempts(found)

    def follow(self, sink: TaskSink) -> Subscription:
        """Delivers the snapshots of the tasks added to the subscription to ``sink``."""
        return self._events.subscription(sink)

    async def get(self, tenant: str, task_id: str) -> Task:
        """Returns one of the tenant's tasks."""
        return await self._store.get(task_id, tenant)

    async def list(
        self, tenant: str, states: Sequence[TaskState], page_size: int, page_token: str
    ) -> tuple[list[Task], str]:
        """Returns a page of the tenant's tasks, newest first, and the next page's token."""
        if not 0 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidTaskError(f"page_size {page_size} is outside 0..{MAX_PAGE_SIZE}")
        limit = page_size or 100
        try:
            before = int(page_token) if page_token else None
        except ValueError:
            raise InvalidTaskError(f"page_token {page_token!r} is not valid") from None
        page = await self._store.page(tenant, states, limit, before)
        next_token = str(page[-1].seq) if len(page) == limit else ""
        return page, next_token

    async def watch(
        self,
        tenant: str,
        task_id: str,
        current: Task | None = None,
        *,
        follow_position: bool = False,
    ) -> AsyncIterator[Task]:
        """Yields the task now and after every change, until it is final; with
        ``follow_position`` also each time a queued task's place in the queue moved (looked at
        every ``POSITION_REFRESH_S``: a place moves with other tasks' events, not its own).

        ``current`` spares a read when the caller holds a snapshot taken with no ``await``
        since (as ``Run`` does right after submitting): no change can have been missed.
        ``Run`` and ``wait`` leave ``follow_position`` off: working out a place costs a pass
        over the queue, and they report none.
        """

        def seen(task: Task) -> tuple[object, ...]:
            place = self.queue_position(task) if follow_position else 0
            return (task.state, task.attempt, place)

        with self._events.subscribe(task_id) as updates:
            task = current if current is not None else await self.get(tenant, task_id)
            last = seen(task)
            yield task
            pending: asyncio.Task[Task] | None = None
            try:
                while not task.state.is_final:
                    if pending is None:  # one get outlives timeouts: no snapshot is lost
                        pending = asyncio.ensure_future(updates.get())
                    refresh = follow_position and task.state is TaskState.QUEUED
                    timeout = POSITION_REFRESH_S if refresh else None
                    done, _ = await asyncio.wait({pending}, timeout=timeout)
                    if done:
                        task, pending = pending.result(), None
                    now = seen(task)
                    if now != last:
                        last = now
                        yield task
            finally:
                if pending is not None:
                    pending.cancel()

    async def wait(self, tenant: str, task_id: str) -> Task:
        """Waits until the task is final and returns it."""
        last = None
        async for task in self.watch(tenant, task_id):
            last = task
        assert last is not None
        return last

    def result_chunks(self, task: Task) -> AsyncIterator[bytes]:
        """Streams a succeeded task's output bytes; a failed or cancelled task raises.

        Outputs that are not there raise while streaming: ``ResultExpiredError`` once their
        retention ran out, else ``PayloadLostError`` saying why (see ``SpoolKeeper``). A
        call-bound task's output file is deleted once streamed to the end (delivered).
        """
        if task.state is not TaskState.SUCCEEDED:
            raise TaskEndedError(
                task.error_code or FailureCode.FAILED_PRECONDITION,
                task.error_message or f"task {task.id} is {task.state.value}",
            )
        if self._keeper is None:
            return self._spool.outputs(task)
        try:
            chunks = self._spool.outputs(task)
        except PayloadLostError as lost:
            return _raising(self._keeper.explain_missing(task, lost))
        if task.call_bound:
            return _delivering(chunks, self._keeper, task)
        return chunks

    async def usage(
        self, tenant: str, since: datetime | None, until: datetime | None
    ) -> tuple[UsageSummary, BudgetStatus]:
        """The tenant's own billed usage and budget; no tenant sees another's."""
        now = datetime.now(UTC)
        return await self._store.usage(tenant, since, until, now)

    async def cancel(self, tenant: str, task_id: str) -> Task:
        """Cancels one of the tenant's queued or running tasks."""
        return await self._dispatcher.cancel(task_id, tenant)

    def delivered(self, tasks: Iterable[Task]) -> None:
        """Notes results handed over whole on a ``RunMany`` call: a call-bound task's result
        is deleted once delivered (``SpoolKeeper.delivered``)."""
        if self._keeper is not None:
            for task in tasks:
                self._keeper.delivered(task)

    async def cancel_quietly(self, task_id: str) -> None:
        """Cancels a task whose caller went away (a Run call that was cancelled)."""
        await self._dispatcher.cancel(task_id, None)


def check_spec(spec: TaskSpec, limits: Limits, known_workloads: frozenset[str]) -> None:
    """Raises unless the spec is well-formed, within limits and names a known workload."""
    if not spec.workload:
        raise InvalidTaskError("the task header names no workload")
    # A model task's workload is checked against the tenant's models instead (ModelService).
    if known_workloads and spec.model_id is None and spec.workload not in known_workloads:
        known = ", ".join(sorted(known_workloads))
        raise UnknownWorkloadError(f"unknown workload {spec.workload!r}; known: {known}")
    _check_counts(spec, limits)
    for index, meta in enumerate(spec.inputs):
        _check_tensor(index, meta, limits)
    if spec.input_bytes > limits.max_task_bytes:
        raise LimitExceededError(
            f"inputs of {spec.input_bytes} bytes exceed the limit of {limits.max_task_bytes} bytes"
            " (max_task_bytes)"
        )


def _check_tensor(index: int, meta: TensorMeta, limits: Limits) -> None:
    """Malformed headers are INVALID_ARGUMENT; well-formed ones over a limit RESOURCE_EXHAUSTED."""
    try:
        meta.validate()
    except WireError as exc:
        raise InvalidTaskError(f"input {index}: {exc}") from exc
    if meta.dtype not in limits.allowed_dtypes:
        allowed = ", ".join(sorted(limits.allowed_dtypes))
        raise InvalidTaskError(
            f"input {index}: dtype {meta.dtype!r} is not accepted by this broker; "
            f"allowed dtypes: {allowed}"
        )
    if len(meta.shape) > limits.max_rank:
        raise LimitExceededError(
            f"input {index}: rank {len(meta.shape)} exceeds the limit of {limits.max_rank} "
            "(max_rank)"
        )
    if meta.shape and max(meta.shape) > limits.max_dim:
        raise LimitExceededError(
            f"input {index}: dimension {max(meta.shape)} exceeds the limit of {limits.max_dim} "
            "(max_dim)"
        )
    if meta.nbytes > limits.max_tensor_bytes:
        raise LimitExceededError(
            f"input {index} of {meta.nbytes} bytes exceeds the limit of "
            f"{limits.max_tensor_bytes} bytes (max_tensor_bytes)"
        )


def _check_counts(spec: TaskSpec, limits: Limits) -> None:
    if len(spec.inputs) > limits.max_inputs:
        raise LimitExceededError(
            f"{len(spec.inputs)} inputs exceed the limit of {limits.max_inputs}"
        )
    if len(spec.params) > limits.max_params:
        raise LimitExceededError(
            f"{len(spec.params)} params exceed the limit of {limits.max_params}"
        )
    if abs(spec.priority) > limits.max_priority:
        raise InvalidTaskError(
            f"priority {spec.priority} is outside -{limits.max_priority}..{limits.max_priority}"
        )
    timeout_s = spec.timeout_s
    if timeout_s is not None and not 0 <= timeout_s <= limits.max_timeout_s:  # refuses NaN
        raise InvalidTaskError(
            f"timeout_seconds {timeout_s} is outside 0..{limits.max_timeout_s:g} (max_timeout_s)"
        )


async def _raising(error: Awaitable[BaseException]) -> AsyncIterator[bytes]:
    """Raises ``error`` once iterated (the explanation of a missing result needs a query)."""
    raise await error
    yield b""  # pragma: no cover  # makes this an async generator


async def _delivering(
    chunks: AsyncIterator[bytes], keeper: SpoolKeeper, task: Task
) -> AsyncIterator[bytes]:
    """Yields ``chunks``; once all are taken, the call-bound result has been delivered."""
    async for chunk in chunks:
        yield chunk
    keeper.delivered(task)


async def _started(
    chunks: AsyncIterator[bytes | memoryview],
) -> AsyncIterator[bytes | memoryview]:
    """Waits for the first chunk (or the end); returns an iterator of all the chunks."""
    iterator = aiter(chunks)
    first = await anext(iterator, None)

    async def replay() -> AsyncIterator[bytes | memoryview]:
        if first is not None:
            yield first
            async for chunk in iterator:
                yield chunk

    return replay()


async def _spool(
    write: Callable[[memoryview], None], spec: TaskSpec, chunks: AsyncIterator[bytes | memoryview]
) -> None:
    stream = TensorStream(spec.inputs)
    async for chunk in chunks:
        for _, _, piece in stream.feed(chunk):
            write(piece)
    stream.finish()
