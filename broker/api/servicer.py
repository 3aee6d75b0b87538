"""The client-facing ``Broker`` service: decode, call ``TaskService``, encode. Nothing else.

Registered by ``gpubroker.broker.api.registration.add_servicer``, which checks each call's API
key before a method runs (``calling_tenant()`` names its tenant). Chunks of the data streams
arrive as ``memoryview``s and go out as messages serialised by ``gpubroker.protos.frames``
(``bytes``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from gpubroker.broker.api.convert import (
    abort_on_broker_error,
    outcome_to_proto,
    spec_from_proto,
    split_stream,
    state_from_proto,
    task_to_proto,
    usage_to_proto,
)
from gpubroker.broker.api.limits import OutcomesOwed, excuse_idle
from gpubroker.broker.api.models import ModelRpcs
from gpubroker.broker.api.status import StatusRpcs
from gpubroker.broker.api.tenancy import calling_tenant
from gpubroker.broker.core.batch import BatchOutcome, InlineTask, TaskBatch
from gpubroker.broker.core.models import ModelService
from gpubroker.broker.core.status_source import StatusSource
from gpubroker.broker.core.tasks import TaskService
from gpubroker.broker.errors import BrokerError
from gpubroker.broker.model import Task
from gpubroker.protos import broker_pb2, broker_pb2_grpc, task_pb2
from gpubroker.protos.convert import time_from_proto
from gpubroker.protos.frames import chunk_message

__all__ = ["BrokerServicer"]

Context = grpc.aio.ServicerContext[Any, Any]


class BrokerServicer(ModelRpcs, StatusRpcs, broker_pb2_grpc.BrokerServicer):
    """Serves tasks, models (``ModelRpcs``) and status (``StatusRpcs``) to authenticated
    tenants."""

    def __init__(self, tasks: TaskService, models: ModelService, status: StatusSource) -> None:
        self._tasks = tasks
        self._models = models
        self._status = status

    async def _info(self, task: Task) -> task_pb2.TaskInfo:
        """A task's status: why and where it waits, and where each attempt ran."""
        attempts = await self._tasks.attempts((task,))
        return task_to_proto(
            task,
            self._tasks.waiting_for(task),
            attempts.get(task.id, ()),
            self._tasks.queue_position(task),
        )

    async def Submit(
        self, request_iterator: AsyncIterator[broker_pb2.SubmitRequest], context: Context
    ) -> broker_pb2.SubmitResponse:
        async with abort_on_broker_error(context, request_iterator):
            header, chunks = await split_stream(request_iterator)
            task, deduplicated = await self._tasks.submit(
                calling_tenant(), spec_from_proto(header), chunks
            )
        return broker_pb2.SubmitResponse(task_id=task.id, deduplicated=deduplicated)

    async def Run(  # type: ignore[override]  # chunks go out as bytes (protos.frames)
        self, request_iterator: AsyncIterator[broker_pb2.RunRequest], context: Context
    ) -> AsyncIterator[broker_pb2.RunResponse | bytes]:
        async with abort_on_broker_error(context, request_iterator):
            header, chunks = await split_stream(request_iterator)
            spec = spec_from_proto(header)
            updates = self._tasks.run(calling_tenant(), spec, chunks, context.time_remaining)
            async for update in updates:
                if isinstance(update, Task):
                    info = task_to_proto(update, self._tasks.waiting_for(update))
                    yield broker_pb2.RunResponse(task=info)
                else:
                    yield chunk_message(broker_pb2.RunResponse, update)

    async def RunMany(
        self, request_iterator: AsyncIterator[broker_pb2.RunManyRequest], context: Context
    ) -> AsyncIterator[broker_pb2.RunManyResponse]:
        batch = TaskBatch(self._tasks, calling_tenant())
        owed = OutcomesOwed()
        excuse_idle(request_iterator, owed.any)  # a client whose window is full waits on us
        async for outcomes in batch.run(_batches(request_iterator, owed)):
            owed.answered(len(outcomes))
            yield broker_pb2.RunManyResponse(outcomes=[outcome_to_proto(o) for o in outcomes])
            # Written to the call: those whose data rode along are delivered (the others are
            # when their GetResult ends).
            self._tasks.delivered(
                o.task for o in outcomes if o.task is not None and o.task.inline_outputs is not None
            )

    async def WatchTask(
        self, request: broker_pb2.WatchTaskRequest, context: Context
    ) -> AsyncIterator[broker_pb2.WatchTaskResponse]:
        async with abort_on_broker_error(context):
            watched = self._tasks.watch(calling_tenant(), request.task_id, follow_position=True)
            async for task in watched:
                yield broker_pb2.WatchTaskResponse(task=await self._info(task))

    async def GetResult(  # type: ignore[override]  # chunks go out as bytes
        self, request: broker_pb2.GetResultRequest, context: Context
    ) -> AsyncIterator[broker_pb2.GetResultResponse | bytes]:
        async with abort_on_broker_error(context):
            task = await self._tasks.wait(calling_tenant(), request.task_id)
            chunks = self._tasks.result_chunks(task)
            yield broker_pb2.GetResultResponse(header=task_to_proto(task))
            async for data in chunks:
                yield chunk_message(broker_pb2.GetResultResponse, data)

    async def CancelTask(
        self, request: broker_pb2.CancelTaskRequest, context: Context
    ) -> broker_pb2.CancelTaskResponse:
        async with abort_on_broker_error(context):
            task = await self._tasks.cancel(calling_tenant(), request.task_id)
        return broker_pb2.CancelTaskResponse(task=task_to_proto(task))

    async def GetTask(
        self, request: broker_pb2.GetTaskRequest, context: Context
    ) -> broker_pb2.GetTaskResponse:
        async with abort_on_broker_error(context):
            task = await self._tasks.get(calling_tenant(), request.task_id)
            info = await self._info(task)
        return broker_pb2.GetTaskResponse(task=info)

    async def ListTasks(
        self, request: broker_pb2.ListTasksRequest, context: Context
    ) -> broker_pb2.ListTasksResponse:
        async with abort_on_broker_error(context):
            states = [state_from_proto(s) for s in request.states]
            page, token = await self._tasks.list(
                calling_tenant(), states, request.page_size, request.page_token
            )
            attempts = await self._tasks.attempts(page)
        places = self._tasks.queue_positions(page)
        infos = [task_to_proto(t, "", attempts.get(t.id, ()), places.get(t.id, 0)) for t in page]
        return broker_pb2.ListTasksResponse(tasks=infos, next_page_token=token)

    async def GetUsage(
        self, request: broker_pb2.GetUsageRequest, context: Context
    ) -> broker_pb2.GetUsageResponse:
        async with abort_on_broker_error(context):
            summary, budget = await self._tasks.usage(
                calling_tenant(),
                time_from_proto(request, "since"),
                time_from_proto(request, "until"),
            )
        return usage_to_proto(summary, budget)


async def _batches(
    requests: AsyncIterator[broker_pb2.RunManyRequest], owed: OutcomesOwed
) -> AsyncIterator[list[InlineTask | BatchOutcome]]:
    """Each request's tasks, decoded; a malformed header refuses only its task."""
    async for request in requests:
        owed.taken(len(request.tasks))
        yield [_inline_task(task) for task in request.tasks]


def _inline_task(task: broker_pb2.InlineTask) -> InlineTask | BatchOutcome:
    try:
        return InlineTask(task.index, spec_from_proto(task.header), task.data)
    except BrokerError as exc:
        return BatchOutcome(task.index, error=exc)
