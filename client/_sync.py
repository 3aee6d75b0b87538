"""The blocking client: ``Client`` and its future-like ``TaskHandle``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
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
from client._types import TaskResult, TaskState, TaskStatus, Usage
from client.codec import ArrayLike, OutputKind
from client.errors import UnavailableError, translate_rpc_errors
from client.wire import DEFAULT_CHUNK_BYTES
from protos import broker_pb2, broker_pb2_grpc

__all__ = ["CHANNEL_OPTIONS", "Client", "TaskHandle"]

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.max_receive_message_length", 16 << 20),
]
SUBMIT_ATTEMPTS = 3
"""Submit is retried on UNAVAILABLE; the request_id makes the retry return the same task."""


class Client:
    """Talks to a broker. Use as a context manager, or call ``close()``."""

    def __init__(
        self,
        address: str,
        api_key: str | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        self._stub = broker_pb2_grpc.BrokerStub(self._channel)
        self._metadata = metadata(api_key)
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
        """Queues a task and returns a handle to it once the broker has stored it durably.

        ``timeout`` is the task's deadline in seconds from now; ``params`` go to the workload.
        """
        request_id = request_id or new_request_id()
        header, buffers, all_numpy = task_header(
            workload, inputs, params, priority=priority, request_id=request_id, timeout=timeout
        )
        for attempt in range(SUBMIT_ATTEMPTS):
            try:
                with translate_rpc_errors():
                    reply = self._stub.Submit(
                        request_stream(
                            broker_pb2.SubmitRequest, header, buffers, self._chunk_bytes
                        ),
                        metadata=self._metadata,
                    )
                break
            except UnavailableError:
                if attempt == SUBMIT_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * 2**attempt)
        return TaskHandle(self, reply.task_id, resolve_output(output, all_numpy))

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
        """Submits a task and waits for its result on one call; ``timeout`` bounds both."""
        header, buffers, all_numpy = task_header(
            workload,
            inputs,
            params,
            priority=priority,
            request_id=new_request_id(),
            timeout=timeout,
        )
        collector = ResultCollector(resolve_output(output, all_numpy))
        with translate_rpc_errors():
            for reply in self._stub.Run(
                request_stream(broker_pb2.RunRequest, header, buffers, self._chunk_bytes),
                metadata=self._metadata,
                timeout=timeout,
            ):
                if reply.WhichOneof("kind") == "task":
                    collector.header(reply.task)
                else:
                    collector.chunk(reply.chunk.data)
        return collector.result()

    def task(self, task_id: str, *, output: OutputKind = "torch") -> TaskHandle:
        """A handle to an existing task."""
        return TaskHandle(self, task_id, output)

    def list_tasks(
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
                reply = self._stub.ListTasks(request, metadata=self._metadata)
            found += [status_from_proto(t) for t in reply.tasks]
            token = reply.next_page_token
            if not token:
                break
        return found

    def watch(self, task_id: str, timeout: float | None = None) -> Iterator[TaskStatus]:
        """Yields the task's status at each change until it is final."""
        request = broker_pb2.WatchTaskRequest(task_id=task_id)
        with translate_rpc_errors():
            for reply in self._stub.WatchTask(request, metadata=self._metadata, timeout=timeout):
                yield status_from_proto(reply.task)

    def usage(self, since: datetime | None = None, until: datetime | None = None) -> Usage:
        """Your billed usage over ``[since, until)``: measured compute time and its cost."""
        with translate_rpc_errors():
            reply = self._stub.GetUsage(usage_request(since, until), metadata=self._metadata)
        return usage_from_proto(reply)

    # -- used by TaskHandle ----------------------------------------------------------------------

    def _status(self, task_id: str) -> TaskStatus:
        with translate_rpc_errors():
            reply = self._stub.GetTask(
                broker_pb2.GetTaskRequest(task_id=task_id), metadata=self._metadata
            )
        return status_from_proto(reply.task)

    def _cancel(self, task_id: str) -> TaskStatus:
        with translate_rpc_errors():
            reply = self._stub.CancelTask(
                broker_pb2.CancelTaskRequest(task_id=task_id), metadata=self._metadata
            )
        return status_from_proto(reply.task)

    def _result(self, task_id: str, output: OutputKind, timeout: float | None) -> TaskResult:
        collector = ResultCollector(output)
        request = broker_pb2.GetResultRequest(task_id=task_id)
        with translate_rpc_errors():
            for reply in self._stub.GetResult(request, metadata=self._metadata, timeout=timeout):
                if reply.WhichOneof("kind") == "header":
                    collector.header(reply.header)
                else:
                    collector.chunk(reply.chunk.data)
        return collector.result()


class TaskHandle:
    """A submitted task, future-style."""

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
        """True once the task is final."""
        return self.status().state.is_final

    def result(
        self, timeout: float | None = None, *, output: OutputKind | None = None
    ) -> TaskResult:
        """Waits for the task and returns its outputs.

        Raises ``DeadlineExceededError`` after ``timeout`` seconds, ``TaskFailedError`` (or the
        task's own error class) if it failed, ``TaskCancelledError`` if it was cancelled.
        """
        return self._client._result(self.task_id, output or self._output, timeout)

    def wait(self, timeout: float | None = None) -> TaskStatus:
        """Waits until the task is final and returns its status (never raises for failure)."""
        final = None
        for status in self._client.watch(self.task_id, timeout):
            final = status
        return final if final is not None else self.status()

    def cancel(self) -> TaskStatus:
        """Cancels the task if it is still queued or running."""
        return self._client._cancel(self.task_id)
