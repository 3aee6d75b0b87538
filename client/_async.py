"""The asyncio client, ``AsyncClient``: the same surface as ``Client``, awaitable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from gpubroker.client._batch import (
    DEFAULT_BATCH,
    DEFAULT_WINDOW,
    Encoder,
    Packer,
    Ready,
    Reorder,
    failed_input,
    map_encoder,
)
from gpubroker.client._convert import (
    PreparedTask,
    ResultCollector,
    TaskPager,
    framed,
    prepare_task,
    status_from_proto,
    task_error,
    usage_from_proto,
    usage_request,
)
from gpubroker.client._handle import AsyncTaskHandle
from gpubroker.client._models import (
    DEFAULT_MAX_QUEUE_DELAY_S,
    model_from_proto,
    model_id_of,
    prepare_upload,
)
from gpubroker.client._requirement import requirement
from gpubroker.client._retry import (
    CHANNEL_OPTIONS,
    DEFAULT_RETRY_FOR_S,
    Retrier,
    retrying_async,
)
from gpubroker.client._types import Model, TaskResult, TaskStatus, Usage
from gpubroker.client.codec import ArrayLike, OutputKind
from gpubroker.client.errors import (
    GpuBrokerError,
    InternalError,
    NotFoundError,
    UnavailableError,
    translate_rpc_errors,
)
from gpubroker.client.progress import Progress, ProgressCallback, progress_callback
from gpubroker.protos import broker_pb2, broker_pb2_grpc
from gpubroker.protos.states import TaskState
from gpubroker.protos.transport import bearer_metadata
from gpubroker.protos.wire import DEFAULT_CHUNK_BYTES

if TYPE_CHECKING:
    import torch

__all__ = ["AsyncClient"]

_T = TypeVar("_T")


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
        retry_for: float = DEFAULT_RETRY_FOR_S,
    ) -> None:
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        self._stub = broker_pb2_grpc.BrokerStub(self._channel)
        # The data streams, with tensor chunks framed without protobuf (gpubroker.protos.frames).
        self._run = self._channel.stream_stream(*framed("Run"))
        self._submit = self._channel.stream_unary(*framed("Submit"))
        self._get_result = self._channel.unary_stream(*framed("GetResult"))
        self._upload = self._channel.stream_unary(*framed("UploadModel"))
        self._metadata = bearer_metadata(api_key)
        self._chunk_bytes = chunk_bytes
        self._retry_for = retry_for
        self.model_bytes_sent = 0
        """Model file bytes this client has uploaded: a re-upload of a model you already hold
        (same bytes, same id) adds nothing, as only its header (or nothing) is sent."""

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
        workload: str | Model,
        inputs: ArrayLike | Sequence[ArrayLike],
        *,
        priority: int = 0,
        request_id: str | None = None,
        timeout: float | None = None,
        output: OutputKind | None = None,
        gpu: str | None = None,
        min_gpu_memory: int | str | None = None,
        progress: Progress = None,
        **params: Any,
    ) -> AsyncTaskHandle:
        """Queues a task and returns a handle once it is stored, retrying an unreachable broker
        for ``retry_for`` seconds with the same request id; see ``Client.submit`` (and there
        for what it raises)."""
        task = prepare_task(
            workload,
            inputs,
            params,
            priority=priority,
            request_id=request_id,
            timeout=timeout,
            output=output,
            requires=requirement(gpu, min_gpu_memory),
        )
        report = progress_callback(progress)
        return await self._retrying(lambda _: self._submit_once(task, report))

    async def run(
        self,
        workload: str | Model,
        inputs: ArrayLike | Sequence[ArrayLike],
        *,
        priority: int = 0,
        timeout: float | None = None,
        output: OutputKind | None = None,
        gpu: str | None = None,
        min_gpu_memory: int | str | None = None,
        progress: Progress = None,
        **params: Any,
    ) -> TaskResult:
        """Submits a task and waits for its result on one call, never retried (a broker restart
        cancels its task: ``UnavailableError``); see ``Client.run`` (and there for what it
        raises)."""
        task = prepare_task(
            workload,
            inputs,
            params,
            priority=priority,
            request_id=None,
            timeout=timeout,
            output=output,
            requires=requirement(gpu, min_gpu_memory),
        )
        report = progress_callback(progress)
        collector = ResultCollector(task.output, report)
        requests = task.requests(broker_pb2.RunRequest, self._chunk_bytes, report)
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
        workload: str | Model,
        inputs: Iterable[ArrayLike | Sequence[ArrayLike]],
        *,
        priority: int = 0,
        timeout: float | None = None,
        output: OutputKind | None = None,
        window: int = DEFAULT_WINDOW,
        batch: int = DEFAULT_BATCH,
        gpu: str | None = None,
        min_gpu_memory: int | str | None = None,
        raise_on_error: bool = False,
        **params: Any,
    ) -> AsyncGenerator[TaskResult, None]:
        """Runs ``workload`` once per item on one call, yielding one ``TaskResult`` per item in
        input order, failures in their place; see ``Client.map`` (and there for what it raises).

        Stopping early hangs up the call at once when the generator is closed: ``aclose()`` it
        (or use ``contextlib.aclosing``) rather than leaving that to the garbage collector."""
        encoder = map_encoder(
            workload,
            params,
            window=window,
            batch=batch,
            priority=priority,
            timeout=timeout,
            output=output,
            gpu=gpu,
            min_gpu_memory=min_gpu_memory,
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
                        yield await self._map_result(value, kind, raise_on_error)
            for value, kind in reorder.pop_ready():
                yield await self._map_result(value, kind, raise_on_error)
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
        """Your tasks, newest first, only those in ``states`` if given, following pages; see
        ``Client.list_tasks``."""
        pager = TaskPager(states, limit)
        while (request := pager.next_request()) is not None:
            pager.add(await self._unary(self._stub.ListTasks, request))
        return pager.tasks

    async def watch(self, task_id: str, timeout: float | None = None) -> AsyncIterator[TaskStatus]:
        """Yields the task's status at each change until it is final, riding through a broker
        restart; see ``Client.watch`` (and there for what it raises)."""
        retry = Retrier(self._retry_for, timeout)
        last: TaskStatus | None = None
        while last is None or not last.state.is_final:
            try:
                async for status in self._watch_once(task_id, retry.remaining()):
                    retry.progressed()
                    if status != last:
                        last = status
                        yield status
                return
            except GpuBrokerError as exc:
                delay = retry.pause(exc)
            await asyncio.sleep(delay)

    async def usage(self, since: datetime | None = None, until: datetime | None = None) -> Usage:
        """Your billed usage over ``[since, until)``; see ``Client.usage``."""
        request = usage_request(since, until)
        return usage_from_proto(await self._unary(self._stub.GetUsage, request))

    async def upload_model(
        self,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        *,
        name: str | None = None,
        batch_dim_varies: bool = False,
        max_batch_size: int = 0,
        max_queue_delay: float = DEFAULT_MAX_QUEUE_DELAY_S,
        gpu: str | None = None,
        min_gpu_memory: int | str | None = None,
        progress: Progress = None,
    ) -> Model:
        """Exports ``module`` and stores it with the broker, once; see ``Client.upload_model``.

        The export runs in a worker thread (``asyncio.to_thread``), so the event loop goes on.
        """
        upload = await asyncio.to_thread(
            prepare_upload,
            module,
            example_inputs,
            name=name,
            batch_dim_varies=batch_dim_varies,
            max_batch_size=max_batch_size,
            max_queue_delay=max_queue_delay,
            gpu=gpu,
            min_gpu_memory=min_gpu_memory,
        )
        try:
            held: broker_pb2.ModelInfo | None = await self._held_model(upload.model_id)
        except NotFoundError:
            held = None
        if held is not None and upload.is_held_as(held):
            return model_from_proto(held)
        requests = upload.requests(held, self._chunk_bytes, progress_callback(progress))
        with translate_rpc_errors():
            reply = await self._upload(requests, metadata=self._metadata)
        if held is None:
            self.model_bytes_sent += len(upload.data)
        return model_from_proto(reply.model)

    async def model(self, model: Model | str) -> Model:
        """One of your models, by ``Model`` or id; see ``Client.model``."""
        return model_from_proto(await self._held_model(model_id_of(model)))

    async def models(self) -> list[Model]:
        """Your models, newest first."""
        request = broker_pb2.ListModelsRequest()
        with translate_rpc_errors():
            reply = await self._stub.ListModels(request, metadata=self._metadata)
        return [model_from_proto(m) for m in reply.models]

    async def delete_model(self, model: Model | str) -> Model:
        """Deletes one of your models; see ``Client.delete_model``."""
        request = broker_pb2.DeleteModelRequest(model_id=model_id_of(model))
        with translate_rpc_errors():
            reply = await self._stub.DeleteModel(request, metadata=self._metadata)
        return model_from_proto(reply.model)

    async def _held_model(self, model_id: str) -> broker_pb2.ModelInfo:
        request = broker_pb2.GetModelRequest(model_id=model_id)
        with translate_rpc_errors():
            reply = await self._stub.GetModel(request, metadata=self._metadata)
        return reply.model

    async def _retrying(
        self, attempt: Callable[[Retrier], Awaitable[_T]], timeout: float | None = None
    ) -> _T:
        return await retrying_async(attempt, self._retry_for, timeout)

    async def _unary(self, method: Callable[..., Awaitable[_T]], request: Any) -> _T:
        with translate_rpc_errors():
            return await method(request, metadata=self._metadata)

    async def _watch_once(self, task_id: str, timeout: float | None) -> AsyncIterator[TaskStatus]:
        request = broker_pb2.WatchTaskRequest(task_id=task_id)
        call = self._stub.WatchTask(request, metadata=self._metadata, timeout=timeout)
        try:
            with translate_rpc_errors():
                async for reply in call:
                    yield status_from_proto(reply.task)
        finally:
            call.cancel()

    async def _submit_once(
        self, task: PreparedTask, progress: ProgressCallback | None
    ) -> AsyncTaskHandle:
        requests = task.requests(broker_pb2.SubmitRequest, self._chunk_bytes, progress)
        with translate_rpc_errors():
            reply = await self._submit(requests, metadata=self._metadata)
        return AsyncTaskHandle(self, reply.task_id, task.output)

    # -- used by AsyncTaskHandle -----------------------------------------------------------------

    async def _map_result(
        self, value: Ready, output: OutputKind, raise_on_error: bool
    ) -> TaskResult:
        if isinstance(value, Exception):
            raise value  # the caller's input iterator raised
        if isinstance(value, TaskStatus):  # outputs too large to ride along: fetch them
            try:
                result = await self._result(value.task_id, output, None, None)
            except GpuBrokerError as exc:
                result = TaskResult.failed(value, exc)
        else:
            result = value
        if raise_on_error and result.error is not None:
            raise result.error
        return result

    async def _status(self, task_id: str) -> TaskStatus:
        return await self._retrying(lambda _: self._status_once(task_id))

    async def _status_once(self, task_id: str) -> TaskStatus:
        request = broker_pb2.GetTaskRequest(task_id=task_id)
        return status_from_proto((await self._unary(self._stub.GetTask, request)).task)

    async def _cancel(self, task_id: str) -> TaskStatus:
        request = broker_pb2.CancelTaskRequest(task_id=task_id)
        reply = await self._retrying(lambda _: self._unary(self._stub.CancelTask, request))
        return status_from_proto(reply.task)

    async def _result(
        self,
        task_id: str,
        output: OutputKind,
        timeout: float | None,
        progress: ProgressCallback | None,
    ) -> TaskResult:
        return await self._retrying(
            lambda r: self._result_once(task_id, output, r.remaining(), progress), timeout
        )

    async def _result_once(
        self,
        task_id: str,
        output: OutputKind,
        timeout: float | None,
        progress: ProgressCallback | None,
    ) -> TaskResult:
        collector = ResultCollector(output, progress)
        request = broker_pb2.GetResultRequest(task_id=task_id)
        call = self._get_result(request, metadata=self._metadata, timeout=timeout)
        try:
            with translate_rpc_errors():
                async for reply in call:
                    collector.add(reply)
        except UnavailableError:
            # A task that failed UNAVAILABLE (no agent could take it) answers so too: ask.
            await self._raise_if_failed(task_id)
            raise
        finally:
            call.cancel()
        return collector.result()

    async def _raise_if_failed(self, task_id: str) -> None:
        try:
            status = await self._status_once(task_id)
        except GpuBrokerError:
            return  # the broker is away: the caller retries
        if status.state in (TaskState.FAILED, TaskState.CANCELLED):
            raise task_error(status)


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
