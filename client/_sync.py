"""The blocking client: ``Client`` and its future-like ``TaskHandle``."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

import grpc

from gpubroker.client._batch import (
    DEFAULT_BATCH,
    DEFAULT_WINDOW,
    Encoder,
    MapItem,
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

__all__ = ["Client", "TaskHandle"]


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
        self._metadata = bearer_metadata(api_key)
        self._chunk_bytes = chunk_bytes

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
        workload: str,
        inputs: ArrayLike | Sequence[ArrayLike],
        *,
        priority: int = 0,
        request_id: str | None = None,
        timeout: float | None = None,
        output: OutputKind | None = None,
        **params: Any,
    ) -> TaskHandle:
        """Queues a task and returns a handle once the broker has stored it durably.

        Args:
            workload: Registered workload name, e.g. ``"matmul"``.
            inputs: A torch tensor or numpy array, or a sequence of them.
            priority: -100..100; higher runs first among your own tasks.
            request_id: Idempotency key; a fresh one when None. Resubmitting with the same key
                returns the same task.
            timeout: The task's deadline, in seconds from now.
            output: ``"torch"`` or ``"numpy"`` for the result; None means numpy when every
                input was a numpy array, torch otherwise.
            **params: Workload parameters: int, float, str or bool.

        Raises:
            TypeError: A parameter or input is of an unsupported type.
            GpuBrokerError: The broker refused the task (see ``gpubroker.client.errors``);
                UNAVAILABLE only after three attempts.
        """
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
                return self._submit_once(task)
            except UnavailableError:
                time.sleep(delay)
        return self._submit_once(task)

    def run(
        self,
        workload: str,
        inputs: ArrayLike | Sequence[ArrayLike],
        *,
        priority: int = 0,
        timeout: float | None = None,
        output: OutputKind | None = None,
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
        workload: str,
        inputs: Iterable[ArrayLike | Sequence[ArrayLike]],
        *,
        priority: int = 0,
        timeout: float | None = None,
        output: OutputKind | None = None,
        window: int = DEFAULT_WINDOW,
        batch: int = DEFAULT_BATCH,
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
        run = _MapRun(encoder, inputs, window, batch)
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


class _MapRun:
    """One ``map`` call's two sides: requests (sent from gRPC's thread) and outcomes."""

    def __init__(
        self,
        encoder: Encoder,
        inputs: Iterable[ArrayLike | Sequence[ArrayLike]],
        window: int,
        batch: int,
    ) -> None:
        self._encoder = encoder
        self._inputs = inputs
        self._batch = batch
        self._room = threading.Semaphore(window)
        self._lock = threading.Lock()
        self._reorder = Reorder()

    def requests(self) -> Iterator[broker_pb2.RunManyRequest]:
        """Encodes and packs the items, never more than ``window`` in flight."""
        packer = Packer(self._batch)
        count = 0
        try:
            for inputs in self._inputs:
                item = self._encoder(count, inputs)
                count += 1
                if item.task is not None and not self._room.acquire(blocking=False):
                    if (message := packer.flush()) is not None:
                        yield message  # send what is packed before waiting for room
                    self._room.acquire()
                self._note(item)
                if (message := packer.add(item)) is not None:
                    yield message
        except Exception as exc:  # the caller's iterator raised: its error ends the results
            self._note(failed_input(count, exc))
        if (message := packer.flush()) is not None:
            yield message

    def take(
        self, outcomes: Iterable[broker_pb2.InlineOutcome]
    ) -> list[tuple[TaskResult | Exception | str, OutputKind]]:
        """Records outcomes; returns the items now ready, in input order."""
        with self._lock:
            for outcome in outcomes:
                self._reorder.add(outcome)
                self._room.release()
            return self._reorder.pop_ready()

    def check_complete(self) -> None:
        """Raises if the call ended with items unanswered."""
        if self._reorder.pending:
            raise InternalError(
                grpc.StatusCode.INTERNAL,
                f"the broker ended map with {self._reorder.pending} tasks unanswered",
            )

    def _note(self, item: MapItem) -> None:
        with self._lock:
            self._reorder.sent(item)


class TaskHandle:
    """A submitted task, future-style: poll it, wait for it, fetch its result or cancel it."""

    def __init__(self, client: Client, task_id: str, output: OutputKind) -> None:
        self._client = client
        self.task_id = task_id
        self._output = output

    def __repr__(self) -> str:
        return f"TaskHandle({self.task_id!r})"

    def status(self) -> TaskStatus:
        """The task's current status."""
        return self._client._status(self.task_id)

    def done(self) -> bool:
        """True once the task is final (succeeded, failed or cancelled)."""
        return self.status().state.is_final

    def result(
        self, timeout: float | None = None, *, output: OutputKind | None = None
    ) -> TaskResult:
        """Waits for the task and returns its outputs, as ``output`` kind if given.

        Raises:
            DeadlineExceededError: ``timeout`` seconds passed first (the task goes on).
            TaskFailedError: The workload raised (or the task's own error class, e.g.
                ``InvalidArgumentError``).
            TaskCancelledError: The task was cancelled.
        """
        return self._client._result(self.task_id, output or self._output, timeout)

    def wait(self, timeout: float | None = None) -> TaskStatus:
        """Waits until the task is final and returns its status, whether it succeeded or not.

        Raises:
            DeadlineExceededError: ``timeout`` seconds passed first (the task goes on).
        """
        final = None
        for status in self._client.watch(self.task_id, timeout):
            final = status
        return final if final is not None else self.status()

    def cancel(self) -> TaskStatus:
        """Cancels the task if it is still queued or running; returns its status after."""
        return self._client._cancel(self.task_id)
