"""The blocking client, ``Client``; its tasks come back as ``TaskHandle``s."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from gpubroker.client._batch import (
    DEFAULT_BATCH,
    DEFAULT_WINDOW,
    MapRun,
    Ready,
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
from gpubroker.client._handle import TaskHandle
from gpubroker.client._model_calls import ModelCalls
from gpubroker.client._requirement import requirement
from gpubroker.client._retry import CHANNEL_OPTIONS, DEFAULT_RETRY_FOR_S, Retrier, retrying
from gpubroker.client._types import Model, TaskResult, TaskStatus, Usage
from gpubroker.client.codec import ArrayLike, OutputKind
from gpubroker.client.errors import (
    GpuBrokerError,
    UnavailableError,
    translate_rpc_errors,
)
from gpubroker.client.progress import Progress, ProgressCallback, progress_callback
from gpubroker.protos import broker_pb2, broker_pb2_grpc
from gpubroker.protos.states import TaskState
from gpubroker.protos.transport import bearer_metadata
from gpubroker.protos.wire import DEFAULT_CHUNK_BYTES

if TYPE_CHECKING:
    pass

__all__ = ["Client"]

_T = TypeVar("_T")


class Client(ModelCalls):
    """Talks to a broker over one blocking channel. Use as a context manager, or ``close()``.

    Args:
        address: ``host:port`` of the broker.
        api_key: Sent as ``authorization: Bearer <key>`` on every call.
        credentials: TLS credentials (``grpc.ssl_channel_credentials()``); plaintext if None.
        chunk_bytes: Size of the chunks the inputs are cut into.
        retry_for: How long, in seconds, ``submit``, ``watch`` and the task handles' methods
            (``status``, ``done``, ``result``, ``wait``, ``cancel``) go on retrying while the
            broker cannot be reached (a restart), with exponential backoff and jitter; 0
            never retries. The clock restarts whenever the broker answers. ``run`` and
            ``map`` are never retried (a broker restart cancels their tasks), nor are the
            listing, usage and model calls.
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
            self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
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
        progress: Progress = None,
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
            progress: Reports the input bytes sent: a callable ``(direction, done_bytes,
                total_bytes)``, or True for a bar (see ``gpubroker.client.progress``).
            **params: Workload parameters: int, float, str or bool.

        Raises:
            TypeError: A parameter or input is of an unsupported type.
            ValueError: ``min_gpu_memory`` is not a size, or ``gpu`` is empty.
            FailedPreconditionError: No GPU the broker can start or reach meets ``gpu`` and
                ``min_gpu_memory``.
            NotFoundError: The workload names a model you do not hold.
            InvalidArgumentError: The broker refused the inputs, parameters or workload.
            AlreadyExistsError: ``request_id`` was used before for other work.
            ResourceExhaustedError: A size limit, quota or budget was hit, or the tenant's
                submit rate was still exceeded after waiting it out for ``retry_for`` seconds.
            AuthenticationError: The API key is missing or wrong.
            UnavailableError: The broker could not be reached for ``retry_for`` seconds.
            GpuBrokerError: The broker refused the task otherwise (see
                ``gpubroker.client.errors``).

        A submit that fails to reach the broker is sent again, with the same ``request_id``,
        for up to ``retry_for`` seconds: the broker stores one task per request id, so a retry
        whose first try was stored returns that task.
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
        report = progress_callback(progress)
        return self._retrying(lambda _: self._submit_once(task, report))

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
        progress: Progress = None,
        **params: Any,
    ) -> TaskResult:
        """Submits a task and waits for its result on one call; see ``submit`` for the arguments.

        ``timeout`` is the call's deadline, which the broker makes the task's deadline too.
        The task lives as long as the call: it is not retried, and a broker restart (or a lost
        connection) cancels the task and raises ``UnavailableError``; use ``submit`` for work
        that must outlive one. ``progress`` reports the upload of the inputs, then the download
        of the outputs.

        Raises:
            TypeError: A parameter or input is of an unsupported type.
            ValueError: ``min_gpu_memory`` is not a size, or ``gpu`` is empty.
            DeadlineExceededError: The task did not finish within ``timeout`` seconds.
            TaskFailedError: The workload raised.
            TaskCancelledError: The task was cancelled (e.g. from another client).
            UnavailableError: The broker could not be reached, or went away during the call.
            GpuBrokerError: The broker refused or failed the task otherwise
                (``InvalidArgumentError``, ``NotFoundError``, ``FailedPreconditionError``,
                ``ResourceExhaustedError``, ``AuthenticationError``, ``InternalError``).
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
        report = progress_callback(progress)
        collector = ResultCollector(task.output, report)
        requests = task.requests(broker_pb2.RunRequest, self._chunk_bytes, report)
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
        raise_on_error: bool = False,
        **params: Any,
    ) -> Generator[TaskResult, None, None]:
        """Runs ``workload`` once per item of ``inputs`` on one call; yields one ``TaskResult``
        per item, in input order, failures in their place.

        For many small tasks (inputs up to 64 KiB each): tasks travel in batches of ``batch``
        with their bytes inline, at most ``window`` are in flight, and each comes back once,
        finished, so the per-task cost is a fraction of ``run``'s. Each task is still a full
        task, billed when it succeeds. ``timeout`` is each task's own deadline.

        Like ``asyncio.gather(..., return_exceptions=True)``, but typed: an item that failed
        (its workload raised, the broker refused it, it could not be encoded) is a
        ``TaskResult`` with ``ok`` False and ``error`` the ``GpuBrokerError`` ``run`` would
        have raised for it; reading its ``output`` raises that error. So every success is
        handed over. Stopping early (``break``, an exception, closing or dropping the
        generator) hangs up the call at once: the broker cancels the tasks not finished, and
        they are not billed (those that had finished already are).

        Args:
            raise_on_error: Raise a failed item's error in its turn instead (and so hang up,
                cancelling the items still live), as ``map`` did before.

        Raises:
            ValueError: ``window`` or ``batch`` is below 1 (before anything is sent).
            UnavailableError: The broker could not be reached, or went away during the call:
                a broker restart cancels the call's live tasks. Not retried.
            AuthenticationError: The API key is missing or wrong.
            GpuBrokerError: A failed item's error, with ``raise_on_error`` only.
            Exception: Whatever the ``inputs`` iterator raised, after the items before it.
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
                        yield self._map_result(value, kind, raise_on_error)
            for value, kind in run.take([]):
                yield self._map_result(value, kind, raise_on_error)
            run.check_complete()
        finally:
            call.cancel()  # a no-op once the call ended; stops the rest if the caller quit
            run.close()

    def task(self, task_id: str, *, output: OutputKind = "torch") -> TaskHandle:
        """A handle to an existing task, returning ``output`` kind results."""
        return TaskHandle(self, task_id, output)

    def list_tasks(
        self, states: Sequence[TaskState] | None = None, limit: int = 100
    ) -> list[TaskStatus]:
        """Your tasks, newest first, only those in ``states`` if given, following pages.

        Raises:
            UnavailableError: The broker could not be reached (not retried).
            AuthenticationError: The API key is missing or wrong.
        """
        pager = TaskPager(states, limit)
        while (request := pager.next_request()) is not None:
            pager.add(self._unary(self._stub.ListTasks, request))
        return pager.tasks

    def watch(self, task_id: str, timeout: float | None = None) -> Iterator[TaskStatus]:
        """Yields the task's status at each change, ending at a final state.

        Rides through a broker restart: the watch is opened again (for up to ``retry_for``
        seconds of failures) and goes on from the task's state then.

        Raises:
            DeadlineExceededError: ``timeout`` seconds passed first (the task goes on).
            NotFoundError: No such task (or another tenant's).
            UnavailableError: The broker could not be reached for ``retry_for`` seconds.
            AuthenticationError: The API key is missing or wrong.
        """
        retry = Retrier(self._retry_for, timeout)
        last: TaskStatus | None = None
        while last is None or not last.state.is_final:
            try:
                for status in self._watch_once(task_id, retry.remaining()):
                    retry.progressed()
                    if status != last:
                        last = status
                        yield status
                return
            except GpuBrokerError as exc:
                delay = retry.pause(exc)
            time.sleep(delay)

    def usage(self, since: datetime | None = None, until: datetime | None = None) -> Usage:
        """Your billed usage over ``[since, until)``: measured compute time and its cost.

        Raises:
            UnavailableError: The broker could not be reached (not retried).
            AuthenticationError: The API key is missing or wrong.
        """
        request = usage_request(since, until)
        return usage_from_proto(self._unary(self._stub.GetUsage, request))

    def _retrying(self, attempt: Callable[[Retrier], _T], timeout: float | None = None) -> _T:
        return retrying(attempt, self._retry_for, timeout)

    def _watch_once(self, task_id: str, timeout: float | None) -> Iterator[TaskStatus]:
        request = broker_pb2.WatchTaskRequest(task_id=task_id)
        call = self._stub.WatchTask(request, metadata=self._metadata, timeout=timeout)
        try:
            with translate_rpc_errors():
                for reply in call:
                    yield status_from_proto(reply.task)
        finally:
            call.cancel()

    def _submit_once(self, task: PreparedTask, progress: ProgressCallback | None) -> TaskHandle:
        requests = task.requests(broker_pb2.SubmitRequest, self._chunk_bytes, progress)
        with translate_rpc_errors():
            reply = self._submit(requests, metadata=self._metadata)
        return TaskHandle(self, reply.task_id, task.output)

    # -- used by TaskHandle ----------------------------------------------------------------------

    def _status(self, task_id: str) -> TaskStatus:
        return self._retrying(lambda _: self._status_once(task_id))

    def _status_once(self, task_id: str) -> TaskStatus:
        request = broker_pb2.GetTaskRequest(task_id=task_id)
        return status_from_proto(self._unary(self._stub.GetTask, request).task)

    def _cancel(self, task_id: str) -> TaskStatus:
        request = broker_pb2.CancelTaskRequest(task_id=task_id)
        reply = self._retrying(lambda _: self._unary(self._stub.CancelTask, request))
        return status_from_proto(reply.task)

    def _map_result(self, value: Ready, output: OutputKind, raise_on_error: bool) -> TaskResult:
        if isinstance(value, Exception):
            raise value  # the caller's input iterator raised
        if isinstance(value, TaskStatus):  # outputs too large to ride along: fetch them
            try:
                result = self._result(value.task_id, output, None, None)
            except GpuBrokerError as exc:
                result = TaskResult.failed(value, exc)
        else:
            result = value
        if raise_on_error and result.error is not None:
            raise result.error
        return result

    def _result(
        self,
        task_id: str,
        output: OutputKind,
        timeout: float | None,
        progress: ProgressCallback | None,
    ) -> TaskResult:
        return self._retrying(
            lambda r: self._result_once(task_id, output, r.remaining(), progress), timeout
        )

    def _result_once(
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
                for reply in call:
                    collector.add(reply)
        except UnavailableError:
            # A task that failed UNAVAILABLE (no agent could take it) answers so too: ask.
            self._raise_if_failed(task_id)
            raise
        finally:
            call.cancel()
        return collector.result()

    def _raise_if_failed(self, task_id: str) -> None:
        try:
            status = self._status_once(task_id)
        except GpuBrokerError:
            return  # the broker is away: the caller retries
        if status.state in (TaskState.FAILED, TaskState.CANCELLED):
            raise task_error(status)
