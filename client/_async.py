"""The asyncio client: ``AsyncClient`` and ``AsyncTaskHandle``, same surface as ``Client``."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

import grpc

from gpubroker.client._batch import (
    DEFAULT_BATCH,
    DEFAULT_WINDOW,
    Encoder,
    Packer,
    Reorder,
    encode_item,
    failed_input,
)
from gpubroker.client._convert import (
    SUBMIT_BACKOFF_S,
    PreparedTask,
    ResultCollector,
    TaskPager,
    framed,
    prepare_task,
    status_from_proto,
    usage_from_proto,
    usage_request,
)
from gpubroker.client._types import TaskResult, TaskStatus, Usage
from gpubroker.client.codec import ArrayLike, OutputKind
from gpubroker.client.errors import InternalError, UnavailableError, translate_rpc_errors
from gpubroker.protos import broker_pb2, broker_pb2_grpc
from gpubroker.protos.states import TaskState
from gpubroker.protos.transport import CLIENT_CHANNEL_OPTIONS, bearer_metadata
from gpubroker.protos.wire import DEFAULT_CHUNK_BYTES

__all__ = ["AsyncClient", "AsyncTaskHandle"]


class AsyncClient:
    """Talks to a broker from asyncio code; see ``Client`` for the arguments.

    Use with ``async with``, or ``await close()``. Create it inside the running event loop.
    """

    def __init__(
        self,
        address: str,
        api_key: str | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=CLIENT_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(
                address, credentials, options=CLIENT_CHANNEL_OPTIONS
            )
        self._stub = broker_pb2_grpc.BrokerStub(self._channel)
        # The data streams, with tensor chunks framed without protobuf (gpubroker.protos.frames).
        self._run = self._channel.stream_stream(*framed("Run"))
        self._submit = self._channel.stream_unary(*framed("Submit"))
        self._get_result = self._channel.unary_stream(*framed("GetResult"))
        self._metadata = bearer_metadata(api_key)
        self._chunk_bytes = chunk_bytes

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel."""
        await self._channel.close()

    async def submit(
        self,
        workload: str,
        inputs: ArrayLike | Sequence[ArrayLike],
        *,
        priority: int = 0,
        request_id: str | None = None,
        timeout: float | None = None,
        output: OutputKind | None = None,
        **params: Any,
    ) -> AsyncTaskHandle:
        """Queues a task and returns a handle once it is stored; see ``Client.submit``."""
        task = prepare_task(
            workload,
            inputs,
            params,
            priority=priority,
            request_id=request_id,
            timeout=timeout,
            output=output,
        )
        for delay in SUBMIT_BACKOFF_S:
            try:
                return await self._submit_once(task)
            except UnavailableError:
                await asyncio.sleep(delay)
        return await self._submit_once(task)

    async def run(
        self,
        workload: str,
        inputs: ArrayLike | Sequence[ArrayLike],
        *,
        priority: int = 0,
        timeout: float | None = None,
        output: OutputKind | None = None,
        **params: Any,
    ) -> TaskResult:
        """Submits a task and waits for its result on one call; see ``Client.run``."""
        task = prepare_task(
            workload,
            inputs,
            params,
            priority=priority,
            request_id=None,
            timeout=timeout,
            output=output,
        )
        collector = ResultCollector(task.output)
        requests = task.requests(broker_pb2.RunRequest, self._chunk_bytes)
        call = self._run(requests, metadata=self._metadata, timeout=timeout)
        try:
            with translate_rpc_errors():
                async for reply in call:
                    collector.add(reply)
        finally:
            call.cancel()  # A no-op once the call ended; stops the task if decoding failed.
        return collector.result()

    async def map(
        self,
        workload: str,
        inputs: Iterable[ArrayLike | Sequence[ArrayLike]],
        *,
        priority: int = 0,
        timeout: float | None = None,
        output: OutputKind | None = None,
        window: int = DEFAULT_WINDOW,
        batch: int = DEFAULT_BATCH,
        **params: Any,
    ) -> AsyncGenerator[TaskResult, None]:
        """Runs ``workload`` once per item on one call, yielding results in input order; see
        ``Client.map``."""
        if window < 1 or batch < 1:
            raise ValueError(f"window and batch must be at least 1, got {window} and {batch}")
        encoder = functools.partial(
            encode_item,
            workload=workload,
            params=params,
            priority=priority,
            timeout=timeout,
            output=output,
        )
        reorder = Reorder()
        room = asyncio.Semaphore(window)
        requests = _map_requests(encoder, inputs, batch, room, reorder)
        call = self._stub.RunMany(requests, metadata=self._metadata)
        try:
            with translate_rpc_errors():
                async for reply in call:
                    for outcome in reply.outcomes:
                        reorder.add(outcome)
                        room.release()
                    for value, kind in reorder.pop_ready():
                        yield await self._map_result(value, kind)
            for value, kind in reorder.pop_ready():
                yield await self._map_result(value, kind)
            if reorder.pending:
                raise InternalError(
                    grpc.StatusCode.INTERNAL,
                    f"the broker ended map with {reorder.pending} tasks unanswered",
                )
        finally:
            call.cancel()  # a no-op once the call ended; stops the rest if the caller quit

    def task(self, task_id: str, *, output: OutputKind = "torch") -> AsyncTaskHandle:
        """A handle to an existing task, returning ``output`` kind results."""
        return AsyncTaskHandle(self, task_id, output)

    async def list_tasks(
        self, states: Sequence[TaskState] | None = None, limit: int = 100
    ) -> list[TaskStatus]:
        """Your tasks, newest first, only those in ``states`` if given, following pages."""
        pager = TaskPager(states, limit)
        while (request := pager.next_request()) is not None:
            with translate_rpc_errors():
                pager.add(await self._stub.ListTasks(request, metadata=self._metadata))
        return pager.tasks

    async def watch(self, task_id: str, timeout: float | None = None) -> AsyncIterator[TaskStatus]:
        """Yields the task's status at each change until it is final; see ``Client.watch``."""
        request = broker_pb2.WatchTaskRequest(task_id=task_id)
        call = self._stub.WatchTask(request, metadata=self._metadata, timeout=timeout)
        try:
            with translate_rpc_errors():
                async for reply in call:
                    yield status_from_proto(reply.task)
        finally:
            call.cancel()

    async def usage(self, since: datetime | None = None, until: datetime | None = None) -> Usage:
        """Your billed usage over ``[since, until)``: measured compute time and its cost."""
        with translate_rpc_errors():
            reply = await self._stub.GetUsage(usage_request(since, until), metadata=self._metadata)
        return usage_from_proto(reply)

    async def _submit_once(self, task: PreparedTask) -> AsyncTaskHandle:
        requests = task.requests(broker_pb2.SubmitRequest, self._chunk_bytes)
        with translate_rpc_errors():
            reply = await self._submit(requests, metadata=self._metadata)
        return AsyncTaskHandle(self, reply.task_id, task.output)

    # -- used by AsyncTaskHandle -----------------------------------------------------------------

    async def _map_result(
        self, value: TaskResult | Exception | str, output: OutputKind
    ) -> TaskResult:
        if isinstance(value, Exception):
            raise value
        if isinstance(value, str):  # outputs too large to ride along: fetch them
            return await self._result(value, output, None)
        return value

    async def _status(self, task_id: str) -> TaskStatus:
        request = broker_pb2.GetTaskRequest(task_id=task_id)
        with translate_rpc_errors():
            reply = await self._stub.GetTask(request, metadata=self._metadata)
        return status_from_proto(reply.task)

    async def _cancel(self, task_id: str) -> TaskStatus:
        request = broker_pb2.CancelTaskRequest(task_id=task_id)
        with translate_rpc_errors():
            reply = await self._stub.CancelTask(request, metadata=self._metadata)
        return status_from_proto(reply.task)

    async def _result(self, task_id: str, output: OutputKind, timeout: float | None) -> TaskResult:
        collector = ResultCollector(output)
        request = broker_pb2.GetResultRequest(task_id=task_id)
        call = self._get_result(request, metadata=self._metadata, timeout=timeout)
        try:
            with translate_rpc_errors():
                async for reply in call:
                    collector.add(reply)
        finally:
            call.cancel()
        return collector.result()


async def _map_requests(
    encoder: Encoder,
    inputs: Iterable[ArrayLike | Sequence[ArrayLike]],
    batch: int,
    room: asyncio.Semaphore,
    reorder: Reorder,
) -> AsyncIterator[broker_pb2.RunManyRequest]:
    """Encodes and packs the items of a ``map`` call, never more than its window in flight."""
    packer = Packer(batch)
    count = 0
    try:
        for item_inputs in inputs:
            item = encoder(count, item_inputs)
            count += 1
            if item.task is not None:
                if room.locked() and (message := packer.flush()) is not None:
                    yield message  # send what is packed before waiting for room
                await room.acquire()
            reorder.sent(item)
            if (message := packer.add(item)) is not None:
                yield message
    except Exception as exc:  # the caller's iterator raised: its error ends the results
        reorder.sent(failed_input(count, exc))
    if (message := packer.flush()) is not None:
        yield message


class AsyncTaskHandle:
    """A submitted task with awaitable methods; see ``TaskHandle``."""

    def __init__(self, client: AsyncClient, task_id: str, output: OutputKind) -> None:
        self._client = client
        self.task_id = task_id
        self._output = output

    def __repr__(self) -> str:
        return f"AsyncTaskHandle({self.task_id!r})"

    async def status(self) -> TaskStatus:
        """The task's current status."""
        return await self._client._status(self.task_id)

    async def done(self) -> bool:
        """True once the task is final (succeeded, failed or cancelled)."""
        return (await self.status()).state.is_final

    async def result(
        self, timeout: float | None = None, *, output: OutputKind | None = None
    ) -> TaskResult:
        """Waits for the task and returns its outputs; see ``TaskHandle.result``."""
        return await self._client._result(self.task_id, output or self._output, timeout)

    async def wait(self, timeout: float | None = None) -> TaskStatus:
        """Waits until the task is final and returns its status; see ``TaskHandle.wait``."""
        final = None
        async for status in self._client.watch(self.task_id, timeout):
            final = status
        return final if final is not None else await self.status()

    async def cancel(self) -> TaskStatus:
        """Cancels the task if it is still queued or running; returns its status after."""
        return await self._client._cancel(self.task_id)
