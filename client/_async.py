"""The asyncio client: ``AsyncClient`` and ``AsyncTaskHandle``, same surface as ``Client``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

import grpc

from client._convert import (
    STATE_TO_PROTO,
    ResultCollector,
    metadata,
    new_request_id,
    request_stream,
    resolve_output,
    status_from_proto,
    task_header,
    usage_from_proto,
    usage_request,
)
from client._sync import CHANNEL_OPTIONS, SUBMIT_ATTEMPTS
from client._types import TaskResult, TaskState, TaskStatus, Usage
from client.codec import ArrayLike, OutputKind
from client.errors import UnavailableError, translate_rpc_errors
from client.wire import DEFAULT_CHUNK_BYTES
from protos import broker_pb2, broker_pb2_grpc

__all__ = ["AsyncClient", "AsyncTaskHandle"]


class AsyncClient:
    """Talks to a broker from asyncio code. Use with ``async with``, or ``await close()``."""

    def __init__(
        self,
        address: str,
        api_key: str | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        self._stub = broker_pb2_grpc.BrokerStub(self._channel)
        self._metadata = metadata(api_key)
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
        """Queues a task; see ``Client.submit``."""
        request_id = request_id or new_request_id()
        header, buffers, all_numpy = task_header(
            workload, inputs, params, priority=priority, request_id=request_id, timeout=timeout
        )
        for attempt in range(SUBMIT_ATTEMPTS):
            try:
                with translate_rpc_errors():
                    reply = await self._stub.Submit(
                        request_stream(
                            broker_pb2.SubmitRequest, header, buffers, self._chunk_bytes
                        ),
                        metadata=self._metadata,
                    )
                break
            except UnavailableError:
                if attempt == SUBMIT_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.2 * 2**attempt)
        return AsyncTaskHandle(self, reply.task_id, resolve_output(output, all_numpy))

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
        header, buffers, all_numpy = task_header(
            workload,
            inputs,
            params,
            priority=priority,
            request_id=new_request_id(),
            timeout=timeout,
        )
        collector = ResultCollector(resolve_output(output, all_numpy))
        call = self._stub.Run(
            request_stream(broker_pb2.RunRequest, header, buffers, self._chunk_bytes),
            metadata=self._metadata,
            timeout=timeout,
        )
        with translate_rpc_errors():
            async for reply in call:
                if reply.WhichOneof("kind") == "task":
                    collector.header(reply.task)
                else:
                    collector.chunk(reply.chunk.data)
        return collector.result()

    def task(self, task_id: str, *, output: OutputKind = "torch") -> AsyncTaskHandle:
        """A handle to an existing task."""
        return AsyncTaskHandle(self, task_id, output)

    async def list_tasks(
        self, states: Sequence[TaskState] | None = None, limit: int = 100
    ) -> list[TaskStatus]:
        """The caller's tasks, newest first, following pages up to ``limit``."""
        found: list[TaskStatus] = []
        token = ""
        while len(found) < limit:
            request = broker_pb2.ListTasksRequest(
                states=[STATE_TO_PROTO[s] for s in states or ()],
                page_size=min(limit - len(found), 1000),
                page_token=token,
            )
            with translate_rpc_errors():
                reply = await self._stub.ListTasks(request, metadata=self._metadata)
            found += [status_from_proto(t) for t in reply.tasks]
            token = reply.next_page_token
            if not token:
                break
        return found

    async def watch(self, task_id: str, timeout: float | None = None) -> AsyncIterator[TaskStatus]:
        """Yields the task's status at each change until it is final."""
        request = broker_pb2.WatchTaskRequest(task_id=task_id)
        with translate_rpc_errors():
            async for reply in self._stub.WatchTask(
                request, metadata=self._metadata, timeout=timeout
            ):
                yield status_from_proto(reply.task)

    async def usage(self, since: datetime | None = None, until: datetime | None = None) -> Usage:
        """Your billed usage over ``[since, until)``: measured compute time and its cost."""
        with translate_rpc_errors():
            reply = await self._stub.GetUsage(usage_request(since, until), metadata=self._metadata)
        return usage_from_proto(reply)

    async def _status(self, task_id: str) -> TaskStatus:
        with translate_rpc_errors():
            reply = await self._stub.GetTask(
                broker_pb2.GetTaskRequest(task_id=task_id), metadata=self._metadata
            )
        return status_from_proto(reply.task)

    async def _cancel(self, task_id: str) -> TaskStatus:
        with translate_rpc_errors():
            reply = await self._stub.CancelTask(
                broker_pb2.CancelTaskRequest(task_id=task_id), metadata=self._metadata
            )
        return status_from_proto(reply.task)

    async def _result(self, task_id: str, output: OutputKind, timeout: float | None) -> TaskResult:
        collector = ResultCollector(output)
        request = broker_pb2.GetResultRequest(task_id=task_id)
        with translate_rpc_errors():
            async for reply in self._stub.GetResult(
                request, metadata=self._metadata, timeout=timeout
            ):
                if reply.WhichOneof("kind") == "header":
                    collector.header(reply.header)
                else:
                    collector.chunk(reply.chunk.data)
        return collector.result()


class AsyncTaskHandle:
    """A submitted task, awaitable-style; see ``TaskHandle``."""

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
        """True once the task is final."""
        return (await self.status()).state.is_final

    async def result(
        self, timeout: float | None = None, *, output: OutputKind | None = None
    ) -> TaskResult:
        """Waits for the task and returns its outputs; see ``TaskHandle.result``."""
        return await self._client._result(self.task_id, output or self._output, timeout)

    async def wait(self, timeout: float | None = None) -> TaskStatus:
        """Waits until the task is final and returns its status."""
        final = None
        async for status in self._client.watch(self.task_id, timeout):
            final = status
        return final if final is not None else await self.status()

    async def cancel(self) -> TaskStatus:
        """Cancels the task if it is still queued or running."""
        return await self._client._cancel(self.task_id)
