"""The client-facing ``Broker`` service: decode, call ``TaskService``, encode. Nothing else.

Registered by ``gpubroker.broker.api.registration.add_servicer``: chunks of the data streams arrive
as
``memoryview``s and go out as messages serialised by ``gpubroker.protos.frames`` (``bytes``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc

from gpubroker.broker.access.auth import Authenticator
from gpubroker.broker.api.convert import (
    abort_on_broker_error,
    outcome_to_proto,
    spec_from_proto,
    split_stream,
    state_from_proto,
    task_to_proto,
    time_from_proto,
    usage_to_proto,
)
from gpubroker.broker.core.batch import InlineTask, TaskBatch
from gpubroker.broker.core.tasks import TaskService
from gpubroker.broker.errors import BrokerError
from gpubroker.protos import broker_pb2, broker_pb2_grpc
from gpubroker.protos.frames import chunk_message

__all__ = ["BrokerServicer"]

Context = grpc.aio.ServicerContext[Any, Any]

DEADLINE_SLACK_S = 0.25
"""A Run call cancelled with less than this left of its deadline is taken to have timed out."""


class BrokerServicer(broker_pb2_grpc.BrokerServicer):
    """Serves tasks to authenticated tenants."""

    def __init__(self, tasks: TaskService, auth: Authenticator) -> None:
        self._tasks = tasks
        self._auth = auth

    async def Submit(
        self, request_iterator: AsyncIterator[broker_pb2.SubmitRequest], context: Context
    ) -> broker_pb2.SubmitResponse:
        async with abort_on_broker_error(context, request_iterator):
            tenant = self._auth.tenant(context.invocation_metadata())
            header, chunks = await split_stream(request_iterator)
            task, deduplicated = await self._tasks.submit(tenant, spec_from_proto(header), chunks)
        return broker_pb2.SubmitResponse(task_id=task.id, deduplicated=deduplicated)

    async def Run(  # type: ignore[override]  # chunks go out as bytes (client.frames)
        self, request_iterator: AsyncIterator[broker_pb2.RunRequest], context: Context
    ) -> AsyncIterator[broker_pb2.RunResponse | bytes]:
        async with abort_on_broker_error(context, request_iterator):
            tenant = self._auth.tenant(context.invocation_metadata())
            header, chunks = await split_stream(request_iterator)
            spec = spec_from_proto(header)
            remaining = context.time_remaining()
            if remaining is not None and (spec.timeout_s is None or remaining < spec.timeout_s):
                spec = replace(spec, timeout_s=max(remaining, 0.001))
            submitted, deduplicated = await self._tasks.submit(
                tenant, spec, chunks, call_bound=True
            )
            try:
                task = submitted
                known = None if deduplicated else submitted  # an old task may have moved on
                async for task in self._tasks.watch(tenant, submitted.id, known):
                    yield broker_pb2.RunResponse(task=task_to_proto(task))
                async for data in self._tasks.result_chunks(task):
                    yield chunk_message(broker_pb2.RunResponse, data)
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                if remaining is None or remaining > DEADLINE_SLACK_S:
                    # The caller hung up: Run ties the task's life to the call. (At the
                    # deadline the sweep fails the task with DEADLINE_EXCEEDED instead; the
                    # caller's clock runs out a little before ours, hence the slack.)
                    await asyncio.shield(self._tasks.cancel_quietly(submitted.id))
                raise

    async def RunMany(
        self, request_iterator: AsyncIterator[broker_pb2.RunManyRequest], context: Context
    ) -> AsyncIterator[broker_pb2.RunManyResponse]:
        async with abort_on_broker_error(context, request_iterator):
            tenant = self._auth.tenant(context.invocation_metadata())
        batch = TaskBatch(self._tasks, tenant)
        feeder = asyncio.create_task(_feed(batch, request_iterator))
        try:
            async for outcomes in batch.outcomes():
                yield broker_pb2.RunManyResponse(outcomes=[outcome_to_proto(o) for o in outcomes])
            await feeder
        except asyncio.CancelledError:
            await asyncio.shield(batch.cancel_live())  # the caller hung up
            raise
        finally:
            feeder.cancel()
            batch.close()

    async def WatchTask(
        self, request: broker_pb2.WatchTaskRequest, context: Context
    ) -> AsyncIterator[broker_pb2.WatchTaskResponse]:
        async with abort_on_broker_error(context):
            tenant = self._auth.tenant(context.invocation_metadata())
            async for task in self._tasks.watch(tenant, request.task_id):
                yield broker_pb2.WatchTaskResponse(task=task_to_proto(task))

    async def GetResult(  # type: ignore[override]  # chunks go out as bytes
        self, request: broker_pb2.GetResultRequest, context: Context
    ) -> AsyncIterator[broker_pb2.GetResultResponse | bytes]:
        async with abort_on_broker_error(context):
            tenant = self._auth.tenant(context.invocation_metadata())
            task = await self._tasks.wait(tenant, request.task_id)
            chunks = self._tasks.result_chunks(task)
            yield broker_pb2.GetResultResponse(header=task_to_proto(task))
            async for data in chunks:
                yield chunk_message(broker_pb2.GetResultResponse, data)

    async def CancelTask(
        self, request: broker_pb2.CancelTaskRequest, context: Context
    ) -> broker_pb2.CancelTaskResponse:
        async with abort_on_broker_error(context):
            tenant = self._auth.tenant(context.invocation_metadata())
            task = await self._tasks.cancel(tenant, request.task_id)
        return broker_pb2.CancelTaskResponse(task=task_to_proto(task))

    async def GetTask(
        self, request: broker_pb2.GetTaskRequest, context: Context
    ) -> broker_pb2.GetTaskResponse:
        async with abort_on_broker_error(context):
            tenant = self._auth.tenant(context.invocation_metadata())
            task = await self._tasks.get(tenant, request.task_id)
        return broker_pb2.GetTaskResponse(task=task_to_proto(task))

    async def ListTasks(
        self, request: broker_pb2.ListTasksRequest, context: Context
    ) -> broker_pb2.ListTasksResponse:
        async with abort_on_broker_error(context):
            tenant = self._auth.tenant(context.invocation_metadata())
            states = [state_from_proto(s) for s in request.states]
            page, token = await self._tasks.list(
                tenant, states, request.page_size, request.page_token
            )
        return broker_pb2.ListTasksResponse(
            tasks=[task_to_proto(t) for t in page], next_page_token=token
        )

    async def GetUsage(
        self, request: broker_pb2.GetUsageRequest, context: Context
    ) -> broker_pb2.GetUsageResponse:
        async with abort_on_broker_error(context):
            tenant = self._auth.tenant(context.invocation_metadata())
            summary, budget = await self._tasks.usage(
                tenant, time_from_proto(request, "since"), time_from_proto(request, "until")
            )
        return usage_to_proto(summary, budget)


async def _feed(batch: TaskBatch, requests: AsyncIterator[broker_pb2.RunManyRequest]) -> None:
    """Hands each request's tasks to the batch; a malformed header refuses only its task."""
    try:
        async for request in requests:
            items = []
            for task in request.tasks:
                try:
                    items.append(InlineTask(task.index, spec_from_proto(task.header), task.data))
                except BrokerError as exc:
                    batch.refuse(task.index, exc)
            await batch.submit(items)
    finally:
        batch.end_of_input()
