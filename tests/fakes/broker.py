"""A hand-written fake ``Broker`` service for client tests, and a thread adapter.

The fake echoes each task's inputs back as its outputs, so a round trip shows the bytes survive
both directions bit-exact.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from gpubroker.client import Client, TaskHandle
from gpubroker.protos import broker_pb2, broker_pb2_grpc, task_pb2
from gpubroker.protos.convert import params_from_proto
from tests.support.chunks import iter_chunks

KEY = "key-of-tenant-a"
"""The one API key the fake broker accepts."""
Context = grpc.aio.ServicerContext[Any, Any]
_FINAL = (task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TASK_STATE_FAILED, task_pb2.TASK_STATE_CANCELLED)


class FakeBroker(broker_pb2_grpc.BrokerServicer):
    """Echo tasks succeed at once; ``hold`` ones stay queued until cancelled; ``fail`` ones fail."""

    def __init__(self) -> None:
        self.tasks: dict[str, task_pb2.TaskInfo] = {}
        self.payloads: dict[str, bytes] = {}
        self.params: dict[str, dict[str, int | float | str | bool]] = {}
        self.authorizations: list[str] = []
        self.request_ids: list[str] = []
        self.time_remaining: list[float | None] = []
        self.unavailable_submits = 0
        self.map_batches: list[int] = []
        """How many Submits to answer UNAVAILABLE after storing the task (a lost reply)."""

    async def Submit(
        self, request_iterator: AsyncIterator[broker_pb2.SubmitRequest], context: Context
    ) -> broker_pb2.SubmitResponse:
        info, deduplicated = await self._receive(request_iterator, context)
        if self.unavailable_submits:
            self.unavailable_submits -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the reply was lost")
        return broker_pb2.SubmitResponse(task_id=info.task_id, deduplicated=deduplicated)

    async def Run(
        self, request_iterator: AsyncIterator[broker_pb2.RunRequest], context: Context
    ) -> AsyncIterator[broker_pb2.RunResponse]:
        info, _ = await self._receive(request_iterator, context)
        yield broker_pb2.RunResponse(
            task=task_pb2.TaskInfo(task_id=info.task_id, state=task_pb2.TASK_STATE_QUEUED)
        )
        info, chunks = await self._outcome(info.task_id, context)
        yield broker_pb2.RunResponse(task=info)
        for chunk in chunks:
            yield broker_pb2.RunResponse(chunk=chunk)

    async def RunMany(
        self, request_iterator: AsyncIterator[broker_pb2.RunManyRequest], context: Context
    ) -> AsyncIterator[broker_pb2.RunManyResponse]:
        """Answers each request's tasks in reverse order; ``fetch`` ones leave the bytes behind
        (as the broker does for large outputs), ``refuse`` ones are refused."""
        await self._authorize(context)
        async for request in request_iterator:
            self.map_batches.append(len(request.tasks))
            outcomes = [self._run_inline(task) for task in reversed(request.tasks)]
            yield broker_pb2.RunManyResponse(outcomes=outcomes)

    def _run_inline(self, task: broker_pb2.InlineTask) -> broker_pb2.InlineOutcome:
        header = task.header
        self.request_ids.append(header.request_id)
        if header.workload == "refuse":
            return broker_pb2.InlineOutcome(
                index=task.index, error_code="INVALID_ARGUMENT", error_message="refused"
            )
        info = task_pb2.TaskInfo(task_id=uuid.uuid4().hex, workload=header.workload)
        info.inputs.extend(header.inputs)
        if header.workload == "fail":
            info.state, info.error_code = task_pb2.TASK_STATE_FAILED, "ABORTED"
            info.error_message = "ValueError: boom"
            return broker_pb2.InlineOutcome(index=task.index, task=info)
        info.state = task_pb2.TASK_STATE_SUCCEEDED
        info.outputs.extend(header.inputs)
        self.tasks[info.task_id] = info
        self.payloads[info.task_id] = task.data
        if header.workload == "fetch":
            return broker_pb2.InlineOutcome(index=task.index, task=info)
        return broker_pb2.InlineOutcome(
            index=task.index, task=info, data=task.data, data_inline=True
        )

    async def GetResult(
        self, request: broker_pb2.GetResultRequest, context: Context
    ) -> AsyncIterator[broker_pb2.GetResultResponse]:
        await self._find(request.task_id, context)
        info, chunks = await self._outcome(request.task_id, context)
        yield broker_pb2.GetResultResponse(header=info)
        for chunk in chunks:
            yield broker_pb2.GetResultResponse(chunk=chunk)

    async def WatchTask(
        self, request: broker_pb2.WatchTaskRequest, context: Context
    ) -> AsyncIterator[broker_pb2.WatchTaskResponse]:
        info = await self._find(request.task_id, context)
        while info.state not in _FINAL:
            await asyncio.sleep(0.01)
        yield broker_pb2.WatchTaskResponse(task=info)

    async def GetTask(
        self, request: broker_pb2.GetTaskRequest, context: Context
    ) -> broker_pb2.GetTaskResponse:
        return broker_pb2.GetTaskResponse(task=await self._find(request.task_id, context))

    async def CancelTask(
        self, request: broker_pb2.CancelTaskRequest, context: Context
    ) -> broker_pb2.CancelTaskResponse:
        info = await self._find(request.task_id, context)
        if info.state not in _FINAL:
            info.state, info.error_message = task_pb2.TASK_STATE_CANCELLED, "cancelled by owner"
        return broker_pb2.CancelTaskResponse(task=info)

    async def ListTasks(
        self, request: broker_pb2.ListTasksRequest, context: Context
    ) -> broker_pb2.ListTasksResponse:
        await self._authorize(context)
        newest_first = [t for t in reversed(self.tasks.values()) if t.state in request.states]
        start = int(request.page_token or 0)
        end = start + request.page_size
        token = str(end) if end < len(newest_first) else ""
        return broker_pb2.ListTasksResponse(tasks=newest_first[start:end], next_page_token=token)

    async def GetUsage(
        self, request: broker_pb2.GetUsageRequest, context: Context
    ) -> broker_pb2.GetUsageResponse:
        await self._authorize(context)
        return broker_pb2.GetUsageResponse(tenant="a", tasks=2, cost_nanousd=17_750_000)

    async def _authorize(self, context: Context) -> None:
        value = dict(context.invocation_metadata() or ()).get("authorization", "")
        self.authorizations.append(str(value))
        if value != f"Bearer {KEY}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")

    async def _find(self, task_id: str, context: Context) -> task_pb2.TaskInfo:
        await self._authorize(context)
        if task_id not in self.tasks:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no task {task_id!r}")
        return self.tasks[task_id]

    async def _receive(
        self,
        requests: AsyncIterator[broker_pb2.SubmitRequest] | AsyncIterator[broker_pb2.RunRequest],
        context: Context,
    ) -> tuple[task_pb2.TaskInfo, bool]:
        # Like the real broker, read the (small) upload before refusing it: a grpc.aio client
        # still writing when the call ends may report INTERNAL instead of the status.
        messages = [m async for m in requests]
        await self._authorize(context)
        header = messages[0].header
        self.request_ids.append(header.request_id)
        self.time_remaining.append(context.time_remaining())
        known = [t for t in self.tasks.values() if t.request_id == header.request_id]
        if known:
            return known[0], True
        info = task_pb2.TaskInfo(
            task_id=uuid.uuid4().hex, workload=header.workload, request_id=header.request_id
        )
        info.inputs.extend(header.inputs)
        if header.workload == "fail":
            info.state, info.error_code = task_pb2.TASK_STATE_FAILED, "ABORTED"
            info.error_message = "ValueError: boom"
        elif header.workload == "hold":
            info.state = task_pb2.TASK_STATE_QUEUED
        else:
            info.state = task_pb2.TASK_STATE_SUCCEEDED
            info.outputs.extend(header.inputs)
        self.tasks[info.task_id] = info
        self.payloads[info.task_id] = b"".join(m.chunk.data for m in messages[1:])
        self.params[info.task_id] = params_from_proto(header.params)
        return info, False

    async def _outcome(
        self, task_id: str, context: Context
    ) -> tuple[task_pb2.TaskInfo, list[task_pb2.DataChunk]]:
        info = self.tasks[task_id]
        while info.state not in _FINAL:
            await asyncio.sleep(0.01)
        if info.state == task_pb2.TASK_STATE_CANCELLED:
            await context.abort(grpc.StatusCode.CANCELLED, info.error_message)
        if info.state == task_pb2.TASK_STATE_FAILED:
            await context.abort(grpc.StatusCode[info.error_code], info.error_message)
        # Small chunks, so outputs span chunk boundaries on the way back too.
        chunks = iter_chunks([self.payloads[task_id]], 5)
        return info, [task_pb2.DataChunk(data=c) for c in chunks]


class InThread:
    """Gives a blocking ``Client`` or ``TaskHandle`` the async surface: calls run in a thread."""

    def __init__(self, target: Client | TaskHandle) -> None:
        self.wrapped = target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.wrapped, name)
        if name == "task":  # no I/O, and not a coroutine on AsyncClient either
            return lambda *args, **kwargs: InThread(attr(*args, **kwargs))
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            value = await asyncio.to_thread(attr, *args, **kwargs)
            return InThread(value) if isinstance(value, TaskHandle) else value

        return call
