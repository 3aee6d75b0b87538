"""Pure helpers shared by ``Client`` and ``AsyncClient``: requests out, results in.

Everything here is free of I/O, so the two clients differ only in how they wait on the network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar, cast

import grpc
import numpy as np

from gpubroker.client._models import workload_name
from gpubroker.client._requirement import requirement_from_proto, requirement_to_proto
from gpubroker.client._types import (
    Attempt,
    GpuRequirement,
    Model,
    TaskResult,
    TaskStatus,
    Usage,
)
from gpubroker.client.codec import ArrayLike, OutputKind, decode, empty_buffer, encode, is_torch
from gpubroker.client.errors import GpuBrokerError, InternalError, error_from_code
from gpubroker.client.progress import ProgressCallback, counted_upload
from gpubroker.protos import broker_pb2, task_pb2
from gpubroker.protos.convert import (
    meta_from_proto,
    meta_to_proto,
    params_to_proto,
    state_from_proto,
    state_to_proto,
    time_from_proto,
    time_to_proto,
)
from gpubroker.protos.frames import chunk_messages, method_options
from gpubroker.protos.ids import time_ordered_id
from gpubroker.protos.states import FailureCode, TaskState
from gpubroker.protos.wire import MAX_PAGE_SIZE, Assembler, TensorMeta

__all__ = [
    "SUBMIT_BACKOFF_S",
    "PreparedTask",
    "ResultCollector",
    "TaskPager",
    "encode_inputs",
    "framed",
    "new_request_id",
    "prepare_task",
    "refused_status",
    "request_stream",
    "resolve_output",
    "status_from_proto",
    "task_error",
    "usage_from_proto",
    "usage_request",
]

SUBMIT_BACKOFF_S = (0.2, 0.4)
"""Pauses before each retry of a Submit that failed with UNAVAILABLE (so three attempts in all).

Retrying is safe because every Submit carries a request_id: the broker returns the same task.
"""

_Request = TypeVar("_Request", broker_pb2.SubmitRequest, broker_pb2.RunRequest)


def new_request_id() -> str:
    """A fresh idempotency key."""
    return time_ordered_id()


def _as_list(inputs: ArrayLike | Sequence[ArrayLike]) -> list[ArrayLike]:
    if is_torch(inputs) or isinstance(inputs, np.ndarray | np.generic):
        return [cast("ArrayLike", inputs)]
    if isinstance(inputs, str | bytes | Mapping):
        raise TypeError(
            f"inputs must be a tensor, an array or a sequence of them, not {type(inputs).__name__}"
        )
    return list(cast("Sequence[ArrayLike]", inputs))


def encode_inputs(
    inputs: ArrayLike | Sequence[ArrayLike],
) -> tuple[list[TensorMeta], list[memoryview], bool]:
    """Encodes one tensor or a sequence; returns headers, buffers and whether all were numpy."""
    values = _as_list(inputs)
    encoded = [encode(v) for v in values]
    all_numpy = bool(values) and not any(is_torch(v) for v in values)
    return [meta for meta, _ in encoded], [data for _, data in encoded], all_numpy


def resolve_output(output: OutputKind | None, all_numpy: bool) -> OutputKind:
    """numpy when asked, or when every input was a numpy array; torch otherwise."""
    if output not in (None, "torch", "numpy"):
        raise ValueError(f"output must be 'torch', 'numpy' or None, not {output!r}")
    if output is not None:
        return output
    return "numpy" if all_numpy else "torch"


@dataclass(frozen=True, slots=True)
class PreparedTask:
    """A task encoded for sending: its header, its input bytes and the output kind to return."""

    header: broker_pb2.TaskHeader
    buffers: tuple[memoryview, ...]
    output: OutputKind

    @property
    def nbytes(self) -> int:
        """The bytes of the inputs."""
        return sum(len(buffer) for buffer in self.buffers)

    def requests(
        self, cls: type[_Request], chunk_bytes: int, progress: ProgressCallback | None = None
    ) -> Iterator[_Request | bytes]:
        """A fresh Submit or Run request stream (each retry needs its own), reporting the
        input bytes sent to ``progress``."""
        stream = request_stream(cls, self.header, self.buffers, chunk_bytes)
        return counted_upload(cls, stream, self.nbytes, progress)


def prepare_task(
    workload: str | Model,
    inputs: ArrayLike | Sequence[ArrayLike],
    params: Mapping[str, Any],
    *,
    priority: int,
    request_id: str | None,
    timeout: float | None,
    output: OutputKind | None,
    requires: GpuRequirement | None = None,
) -> PreparedTask:
    """Encodes a task; raises ``TypeError`` or ``WireError`` before anything is sent.

    ``requires`` None leaves the header's requirement unset: the model's own, else any GPU.
    """
    metas, buffers, all_numpy = encode_inputs(inputs)
    header = broker_pb2.TaskHeader(
        workload=workload_name(workload),
        inputs=[meta_to_proto(meta) for meta in metas],
        params=params_to_proto(params),
        priority=priority,
        request_id=request_id or new_request_id(),
        timeout_seconds=timeout or 0.0,
        requires=requirement_to_proto(requires) if requires else None,
    )
    return PreparedTask(header, tuple(buffers), resolve_output(output, all_numpy))


def request_stream(
    cls: type[_Request],
    header: broker_pb2.TaskHeader,
    buffers: Sequence[memoryview],
    chunk_bytes: int,
) -> Iterator[_Request | bytes]:
    """The header message, then the inputs' bytes back to back in chunk messages (already
    serialised, see ``gpubroker.protos.frames``)."""
    yield cls(header=header)
    yield from chunk_messages(cls, buffers, chunk_bytes)


_BROKER = broker_pb2.DESCRIPTOR.services_by_name["Broker"]


def framed(method: str) -> tuple[str, Callable[[Any], bytes], Callable[[bytes], Any]]:
    """Arguments for a ``Broker`` stub method with the chunk fast path (``protos.frames``)."""
    return method_options(_BROKER.methods_by_name[method])


def status_from_proto(msg: task_pb2.TaskInfo) -> TaskStatus:
    """Converts a task snapshot."""
    return TaskStatus(
        task_id=msg.task_id,
        tenant=msg.tenant,
        workload=msg.workload,
        state=state_from_proto(msg.state) or TaskState.QUEUED,
        attempt=msg.attempt,
        priority=msg.priority,
        request_id=msg.request_id,
        error_code=msg.error_code,
        error_message=msg.error_message,
        created_at=time_from_proto(msg, "created_at"),
        started_at=time_from_proto(msg, "started_at"),
        finished_at=time_from_proto(msg, "finished_at"),
        deadline=time_from_proto(msg, "deadline"),
        compute_seconds=msg.compute_seconds,
        gpu_type=msg.gpu_type,
        inputs=tuple(meta_from_proto(h) for h in msg.inputs),
        outputs=tuple(meta_from_proto(h) for h in msg.outputs),
        model_load_seconds=msg.model_load_seconds,
        batch_tasks=msg.batch_tasks,
        requires=requirement_from_proto(msg.requires),
        waiting_for=msg.waiting_for,
        queue_position=msg.queue_position,
        attempts=tuple(
            Attempt(
                number=a.number,
                agent_id=a.agent_id,
                machine_name=a.machine_name,
                gpu_type=a.gpu_type,
                started_at=time_from_proto(a, "started_at"),
                ended_at=time_from_proto(a, "ended_at"),
                outcome=a.outcome,
                detail=a.detail,
            )
            for a in msg.attempts
        ),
    )


def usage_request(since: datetime | None, until: datetime | None) -> broker_pb2.GetUsageRequest:
    """A usage query; naive datetimes are taken as UTC."""
    return broker_pb2.GetUsageRequest(since=time_to_proto(since), until=time_to_proto(until))


def task_error(status: TaskStatus) -> GpuBrokerError:
    """The typed error of a failed or cancelled task."""
    code = FailureCode.CANCELLED if status.state is TaskState.CANCELLED else status.error_code
    return error_from_code(code or FailureCode.UNKNOWN, status.error_message)


def refused_status(workload: str, error: GpuBrokerError) -> TaskStatus:
    """The status of a ``map`` item refused before it became a task: FAILED, no task id."""
    return TaskStatus(
        task_id="",
        tenant="",
        workload=workload,
        state=TaskState.FAILED,
        attempt=0,
        priority=0,
        request_id="",
        error_code=error.code.name,
        error_message=error.details,
        created_at=None,
        started_at=None,
        finished_at=None,
        deadline=None,
        compute_seconds=0.0,
        gpu_type="",
        inputs=(),
        outputs=(),
    )


def usage_from_proto(msg: broker_pb2.GetUsageResponse) -> Usage:
    """Converts usage totals."""
    return Usage(
        tenant=msg.tenant,
        tasks=msg.tasks,
        compute_seconds=msg.compute_seconds,
        bytes_in=msg.bytes_in,
        bytes_out=msg.bytes_out,
        cost_usd=Decimal(msg.cost_nanousd).scaleb(-9),
        month_to_date_usd=Decimal(msg.month_to_date_nanousd).scaleb(-9),
        monthly_budget_usd=Decimal(msg.monthly_budget_nanousd).scaleb(-9)
        if msg.has_budget
        else None,
    )


class TaskPager:
    """Follows ListTasks pages until ``limit`` tasks or the last page."""

    def __init__(self, states: Sequence[TaskState] | None, limit: int) -> None:
        self._states = [state_to_proto(TaskState(s)) for s in states or ()]
        self._limit = limit
        self._token = ""
        self._done = limit <= 0
        self.tasks: list[TaskStatus] = []

    def next_request(self) -> broker_pb2.ListTasksRequest | None:
        """The next page's request, or None once there is nothing more to fetch."""
        if self._done:
            return None
        return broker_pb2.ListTasksRequest(
            states=self._states,
            page_size=min(self._limit - len(self.tasks), MAX_PAGE_SIZE),
            page_token=self._token,
        )

    def add(self, reply: broker_pb2.ListTasksResponse) -> None:
        """Takes one page."""
        room = self._limit - len(self.tasks)
        self.tasks += [status_from_proto(t) for t in reply.tasks[:room]]
        self._token = reply.next_page_token
        self._done = not self._token or len(self.tasks) >= self._limit


class ResultCollector:
    """Reassembles a Run or GetResult stream: snapshots, then a succeeded task's output bytes."""

    def __init__(self, output: OutputKind, progress: ProgressCallback | None = None) -> None:
        self._output = output
        self._last: TaskStatus | None = None
        self._assembler: Assembler | None = None
        self._progress = progress
        self._received = 0
        self._expected = 0

    def add(
        self, reply: broker_pb2.RunResponse | broker_pb2.GetResultResponse | memoryview
    ) -> None:
        """Takes one message of either stream (a chunk as the ``memoryview`` of its data)."""
        if isinstance(reply, memoryview):
            self._chunk(reply)
        elif reply.HasField("chunk"):
            self._chunk(reply.chunk.data)
        elif isinstance(reply, broker_pb2.RunResponse):
            self._header(reply.task)
        else:
            self._header(reply.header)

    def _header(self, info: task_pb2.TaskInfo) -> None:
        self._last = status_from_proto(info)
        if self._last.state is TaskState.SUCCEEDED:
            self._assembler = Assembler(self._last.outputs, empty_buffer)
            self._expected = sum(meta.nbytes for meta in self._last.outputs)
            if self._progress is not None:
                self._progress("download", 0, self._expected)

    def _chunk(self, data: bytes | memoryview) -> None:
        if self._assembler is None:
            raise InternalError(
                grpc.StatusCode.INTERNAL, "result bytes arrived before the result header"
            )
        self._assembler.feed(data)
        if self._progress is not None and len(data):
            self._received += len(data)
            self._progress("download", self._received, self._expected)

    def result(self) -> TaskResult:
        """The decoded result once the stream ended without an error status."""
        status = self._last
        if status is not None and status.state in (TaskState.FAILED, TaskState.CANCELLED):
            # The broker ends such calls with an error status; this covers one that did not.
            raise task_error(status)
        if status is None or self._assembler is None:
            raise InternalError(
                grpc.StatusCode.INTERNAL, "the result stream ended without a result"
            )
        buffers = self._assembler.finish()
        outputs = tuple(
            decode(meta, buf, self._output)
            for meta, buf in zip(status.outputs, buffers, strict=True)
        )
        return TaskResult(task_id=status.task_id, outputs=outputs, status=status)
