"""The blocking client, ``Client``; its tasks come back as ``TaskHandle``s."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from gpubroker.client._batch import (
    DEFAULT_BATCH,
    DEFAULT_WINDOW,
    MapRun,
    map_encoder,
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
from gpubroker.client._handle import TaskHandle
from gpubroker.client._models import (
    DEFAULT_MAX_QUEUE_DELAY_S,
    ModelUpload,
    model_from_proto,
    model_id_of,
    prepare_upload,
)
from gpubroker.client._requirement import requirement
from gpubroker.client._types import Model, TaskResult, TaskStatus, Usage
from gpubroker.client.codec import ArrayLike, OutputKind
from gpubroker.client.errors import (
    NotFoundError,
    UnavailableError,
    translate_rpc_errors,
)
from gpubroker.protos import broker_pb2, broker_pb2_grpc
from gpubroker.protos.states import TaskState
from gpubroker.protos.transport import CLIENT_CHANNEL_OPTIONS, bearer_metadata
from gpubroker.protos.wire import DEFAULT_CHUNK_BYTES

if TYPE_CHECKING:
    import torch

__all__ = ["Client"]


class Client:
    """Talks to a broker over one blocking channel. Use as a context manager, or ``close()``.

    Args:
        address: ``host:port`` of the broker.
        api_key: Sent as ``authorization: Bearer <key>`` on every call.
        credentials: TLS credentials (``grpc.ssl_channel_credentials()``); plaintext if None.
        chunk_bytes: Size of the chunks the inputs are cut into.
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
            self._channel = grpc.insecure_channel(address, options=CLIENT_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(
                address, credentials, options=CLIENT_CHANNEL_OPTIONS
            )
        self._stub = broker_pb2_grpc.BrokerStub(self._channel)
        # The data streams, with tensor chunks framed without protobuf (gpubroker.protos.frames).
        self._run = self._channel.stream_stream(*framed("Run"))
        self._submit = self._channel.stream_unary(*framed("Submit"))
        self._get_result = self._channel.unary_stream(*framed("GetResult"))
        self._upload = self._channel.stream_unary(*framed("UploadModel"))
        self._metadata = bearer_metadata(api_key)
        self._chunk_bytes = chunk_bytes
        self.model_bytes_sent = 0
        """Model file bytes this client has uploaded: a re-upload of a model you already hold
        (same bytes, same id) adds nothing, as only its header (or nothing) is sent."""

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def submit(
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
        **params: Any,
    ) -> TaskHandle:
        """Queues a task and returns a handle once the broker has stored it durably.

        Args:
            workload: Registered workload name, e.g. ``"matmul"``, or a ``Model`` from
                ``upload_model`` (or its ``workload``, ``"model:<id>"``).
            inputs: A torch tensor or numpy array, or a sequence of them.
            priority: -100..100; higher runs first among your own tasks.
            request_id: Idempotency key; a fresh one when None. Resubmitting with the same key
                returns the same task.
            timeout: The task's deadline, in seconds from now.
            output: ``"torch"`` or ``"numpy"`` for the result; None means numpy when every
                input was a numpy array, torch otherwise.
            gpu: The GPU type the task must run on, e.g. ``"nvidia-l4"``; None for the
                model's own requirement, else any.
            min_gpu_memory: Least device memory: bytes, or a string such as ``"16GiB"`` or
                ``"24GB"``; None for the model's own requirement, else any.
            **params: Workload parameters: int, float, str or bool.

        Raises:
            TypeError: A parameter or input is of an unsupported type.
            ValueError: ``min_gpu_memory`` is not a size, or ``gpu`` is empty.
            FailedPreconditionError: No GPU the broker can start or reach meets ``gpu`` and
                ``min_gpu_memory``.
            NotFoundError: The workload names a model you do not hold.
            GpuBrokerError: The broker refused the task otherwise (see
                ``gpubroker.client.errors``); UNAVAILABLE only after three attempts.
        """
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
        for delay in SUBMIT_BACKOFF_S:
            try:
                return self._submit_once(task)
            except UnavailableError:
                time.sleep(delay)
        return self._submit_once(task)

    def run(
        self,
        workload: str | Model,
        inputs: ArrayLike | Sequence[ArrayLike],
        *,
        priority: int = 0,
        timeout: float | None = None,
        output: OutputKind | None = None,
        gpu: str | None = None,
        min_gpu_memory: int | str | None = None,
        **params: Any,
    ) -> TaskResult:
        """Submits a task and waits for its result on one call; see ``submit`` for the arguments.

        ``timeout`` is the call's deadline, which the broker makes the task's deadline too.

        Raises:
            DeadlineExceededError: The task did not finish within ``timeout`` seconds.
            TaskFailedError: The workload raised.
            GpuBrokerError: The broker refused or failed the task otherwise.
        """
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
        collector = ResultCollector(task.output)
        requests = task.requests(broker_pb2.RunRequest, self._chunk_bytes)
        call = self._run(requests, metadata=self._metadata, timeout=timeout)
        try:
            with translate_rpc_errors():
                for reply in call:
                    collector.add(reply)
        finally:
            call.cancel()  # A no-op once the call ended; stops the task if decoding failed.
        return collector.result()

    def map(
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
        **params: Any,
    ) -> Generator[TaskResult, None, None]:
        """Runs ``workload`` once per item of ``inputs`` on one call; yields results in order.

        For many small tasks (inputs up to 64 KiB each): tasks travel in batches of ``batch``
        with their bytes inline, at most ``window`` are in flight, and each comes back once,
        finished, so the per-task cost is a fraction of ``run``'s. Each task is still a full,
        billed task. ``timeout`` is each task's own deadline. Stopping the iteration early
        cancels the tasks still queued or running.

        Raises:
            TaskFailedError: (when its turn comes) a task's workload raised; likewise the
                other ``GpuBrokerError`` classes for a task the broker refused or cancelled.
            TypeError: an item is not a tensor or array (when its turn comes).
        """
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
        run = MapRun(encoder, inputs, window, batch)
        call = self._stub.RunMany(run.requests(), metadata=self._metadata)
        try:
            with translate_rpc_errors():
                for reply in call:
                    for value, kind in run.take(reply.outcomes):
                        yield self._map_result(value, kind)
            for value, kind in run.take([]):
                yield self._map_result(value, kind)
            run.check_complete()
        finally:
            call.cancel()  # a no-op once the call ended; stops the rest if the caller quit

    def task(self, task_id: str, *, output: OutputKind = "torch") -> TaskHandle:
        """A handle to an existing task, returning ``output`` kind results."""
        return TaskHandle(self, task_id, output)

    def list_tasks(
        self, states: Sequence[TaskState] | None = None, limit: int = 100
    ) -> list[TaskStatus]:
        """Your tasks, newest first, only those in ``states`` if given, following pages."""
        pager = TaskPager(states, limit)
        while (request := pager.next_request()) is not None:
            with translate_rpc_errors():
                pager.add(self._stub.ListTasks(request, metadata=self._metadata))
        return pager.tasks

    def watch(self, task_id: str, timeout: float | None = None) -> Iterator[TaskStatus]:
        """Yields the task's status at each change, ending at a final state.

        Raises:
            DeadlineExceededError: ``timeout`` seconds passed first.
        """
        request = broker_pb2.WatchTaskRequest(task_id=task_id)
        call = self._stub.WatchTask(request, metadata=self._metadata, timeout=timeout)
        try:
            with translate_rpc_errors():
                for reply in call:
                    yield status_from_proto(reply.task)
        finally:
            call.cancel()

    def usage(self, since: datetime | None = None, until: datetime | None = None) -> Usage:
        """Your billed usage over ``[since, until)``: measured compute time and its cost."""
        with translate_rpc_errors():
            reply = self._stub.GetUsage(usage_request(since, until), metadata=self._metadata)
        return usage_from_proto(reply)

    def upload_model(
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
    ) -> Model:
        """Exports ``module`` on this machine and stores it with the broker, once.

        The module's forward, called on ``example_inputs``, is captured by ``torch.export``
        into a data-only model file (no pickles) whose id is its sha256. When you already hold
        that file, nothing is sent but the options, and only when they changed.

        Args:
            module: The ``torch.nn.Module`` to run remotely.
            example_inputs: Tensors to trace it with; their dtypes and shapes are what the
                model takes.
            name: What to list it under; None keeps the name of a model you already hold,
                else takes the module's class name.
            batch_dim_varies: The first dimension of every input and output may have any
                size (the example's must be at least 2).
            max_batch_size: Dynamic batching: stack up to this many rows of concurrent tasks
                into one call of the model (needs ``batch_dim_varies``); 0 or 1 is off.
            max_queue_delay: Dynamic batching: the longest, in seconds, an agent holds a task
                waiting for others to stack with it (5 ms by default).
            gpu: The GPU type the model's tasks need unless a task says otherwise.
            min_gpu_memory: Least device memory its tasks need: bytes, or ``"16GiB"``.

        Returns:
            The model as the broker holds it; pass it to ``run``, ``submit`` or ``map``.

        Raises:
            ModelExportError: ``torch.export`` could not capture the module (raised before
                anything is sent).
            ValueError: An option is out of range.
            InvalidArgumentError: The broker refused the model file.
            ResourceExhaustedError: The model does not fit in your model quota.
        """
        upload = prepare_upload(
            module,
            example_inputs,
            name=name,
            batch_dim_varies=batch_dim_varies,
            max_batch_size=max_batch_size,
            max_queue_delay=max_queue_delay,
            gpu=gpu,
            min_gpu_memory=min_gpu_memory,
        )
        return self._store_model(upload)

    def model(self, model: Model | str) -> Model:
        """One of your models, by ``Model`` or id, as the broker holds it now.

        Raises:
            NotFoundError: You hold no model of that id.
        """
        return model_from_proto(self._held_model(model_id_of(model)))

    def models(self) -> list[Model]:
        """Your models, newest first."""
        with translate_rpc_errors():
            reply = self._stub.ListModels(broker_pb2.ListModelsRequest(), metadata=self._metadata)
        return [model_from_proto(m) for m in reply.models]

    def delete_model(self, model: Model | str) -> Model:
        """Deletes one of your models (by ``Model`` or id); returns it as it was.

        Raises:
            NotFoundError: You hold no model of that id.
            FailedPreconditionError: Queued or running tasks still name it.
        """
        request = broker_pb2.DeleteModelRequest(model_id=model_id_of(model))
        with translate_rpc_errors():
            reply = self._stub.DeleteModel(request, metadata=self._metadata)
        return model_from_proto(reply.model)

    def _store_model(self, upload: ModelUpload) -> Model:
        try:
            held: broker_pb2.ModelInfo | None = self._held_model(upload.model_id)
        except NotFoundError:
            held = None
        if held is not None and upload.is_held_as(held):
            return model_from_proto(held)
        requests = upload.requests(held, self._chunk_bytes)
        with translate_rpc_errors():
            reply = self._upload(requests, metadata=self._metadata)
        if held is None:
            self.model_bytes_sent += len(upload.data)
        return model_from_proto(reply.model)

    def _held_model(self, model_id: str) -> broker_pb2.ModelInfo:
        request = broker_pb2.GetModelRequest(model_id=model_id)
        with translate_rpc_errors():
            reply = self._stub.GetModel(request, metadata=self._metadata)
        return reply.model

    def _submit_once(self, task: PreparedTask) -> TaskHandle:
        requests = task.requests(broker_pb2.SubmitRequest, self._chunk_bytes)
        with translate_rpc_errors():
            reply = self._submit(requests, metadata=self._metadata)
        return TaskHandle(self, reply.task_id, task.output)

    # -- used by TaskHandle ----------------------------------------------------------------------

    def _status(self, task_id: str) -> TaskStatus:
        request = broker_pb2.GetTaskRequest(task_id=task_id)
        with translate_rpc_errors():
            reply = self._stub.GetTask(request, metadata=self._metadata)
        return status_from_proto(reply.task)

    def _cancel(self, task_id: str) -> TaskStatus:
        request = broker_pb2.CancelTaskRequest(task_id=task_id)
        with translate_rpc_errors():
            reply = self._stub.CancelTask(request, metadata=self._metadata)
        return status_from_proto(reply.task)

    def _map_result(self, value: TaskResult | Exception | str, output: OutputKind) -> TaskResult:
        if isinstance(value, Exception):
            raise value
        if isinstance(value, str):  # outputs too large to ride along: fetch them
            return self._result(value, output, None)
        return value

    def _result(self, task_id: str, output: OutputKind, timeout: float | None) -> TaskResult:
        collector = ResultCollector(output)
        request = broker_pb2.GetResultRequest(task_id=task_id)
        call = self._get_result(request, metadata=self._metadata, timeout=timeout)
        try:
            with translate_rpc_errors():
                for reply in call:
                    collector.add(reply)
        finally:
            call.cancel()
        return collector.result()
