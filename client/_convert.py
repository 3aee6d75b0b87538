"""Pure helpers shared by ``Client`` and ``AsyncClient``: requests out, results in."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar, cast

import numpy as np
from google.protobuf import timestamp_pb2

from client._types import TaskResult, TaskState, TaskStatus, Usage
from client.codec import ArrayLike, OutputKind, decode, encode, is_torch
from client.proto import meta_from_proto, meta_to_proto, params_to_proto
from client.wire import Assembler, iter_chunks
from protos import broker_pb2, task_pb2

__all__ = [
    "ResultCollector",
    "metadata",
    "new_request_id",
    "request_stream",
    "resolve_output",
    "status_from_proto",
    "task_header",
    "usage_from_proto",
    "usage_request",
]

_Request = TypeVar("_Request", broker_pb2.SubmitRequest, broker_pb2.RunRequest)

_STATE = {
    task_pb2.TASK_STATE_QUEUED: TaskState.QUEUED,
    task_pb2.TASK_STATE_RUNNING: TaskState.RUNNING,
    task_pb2.TASK_STATE_SUCCEEDED: TaskState.SUCCEEDED,
    task_pb2.TASK_STATE_FAILED: TaskState.FAILED,
    task_pb2.TASK_STATE_CANCELLED: TaskState.CANCELLED,
}
STATE_TO_PROTO = {v: k for k, v in _STATE.items()}


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the API key."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def new_request_id() -> str:
    """A fresh idempotency key."""
    return uuid.uuid4().hex


def _as_list(inputs: ArrayLike | Sequence[ArrayLike]) -> list[ArrayLike]:
    if is_torch(inputs) or isinstance(inputs, np.ndarray | np.generic):
        return [cast("ArrayLike", inputs)]
    return list(cast("Sequence[ArrayLike]", inputs))


def task_header(
    workload: str,
    inputs: ArrayLike | Sequence[ArrayLike],
    params: Mapping[str, Any],
    *,
    priority: int,
    request_id: str,
    timeout: float | None,
) -> tuple[broker_pb2.TaskHeader, list[memoryview], bool]:
    """Encodes the inputs; returns the header, their buffers, and whether all were numpy."""
    values = _as_list(inputs)
    encoded = [encode(v) for v in values]
    header = broker_pb2.TaskHeader(
        workload=workload,
        inputs=[meta_to_proto(meta) for meta, _ in encoded],
        params=params_to_proto(params),
        priority=priority,
        request_id=request_id,
        timeout_seconds=timeout or 0.0,
    )
    all_numpy = bool(values) and not any(is_torch(v) for v in values)
    return header, [data for _, data in encoded], all_numpy


def request_stream(
    cls: type[_Request],
    header: broker_pb2.TaskHeader,
    buffers: Sequence[memoryview],
    chunk_bytes: int,
) -> Iterator[_Request]:
    """The header message, then the inputs' bytes in chunks."""
    yield cls(header=header)
    for chunk in iter_chunks(buffers, chunk_bytes):
        yield cls(chunk=task_pb2.DataChunk(data=chunk))


def resolve_output(output: OutputKind | None, all_numpy: bool) -> OutputKind:
    """numpy when asked, or when every input was a numpy array; torch otherwise."""
    if output is not None:
        return output
    return "numpy" if all_numpy else "torch"


def _time(msg: task_pb2.TaskInfo, field: str) -> datetime | None:
    if not msg.HasField(field):  # type: ignore[arg-type]
        return None
    stamp: timestamp_pb2.Timestamp = getattr(msg, field)
    return stamp.ToDatetime(tzinfo=UTC)


def usage_request(since: datetime | None, until: datetime | None) -> broker_pb2.GetUsageRequest:
    """A usage query; naive datetimes are taken as UTC."""
    request = broker_pb2.GetUsageRequest()
    for field, value in (("since", since), ("until", until)):
        if value is not None:
            aware = value if value.tzinfo else value.replace(tzinfo=UTC)
            getattr(request, field).FromDatetime(aware)
    return request


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


def status_from_proto(msg: task_pb2.TaskInfo) -> TaskStatus:
    """Converts a task snapshot."""
    return TaskStatus(
        task_id=msg.task_id,
        tenant=msg.tenant,
        workload=msg.workload,
        state=_STATE.get(msg.state, TaskState.QUEUED),
        attempt=msg.attempt,
        priority=msg.priority,
        request_id=msg.request_id,
        error_code=msg.error_code,
        error_message=msg.error_message,
        created_at=_time(msg, "created_at"),
        started_at=_time(msg, "started_at"),
        finished_at=_time(msg, "finished_at"),
        deadline=_time(msg, "deadline"),
        compute_seconds=msg.compute_seconds,
        gpu_type=msg.gpu_type,
        inputs=tuple(meta_from_proto(h) for h in msg.inputs),
        outputs=tuple(meta_from_proto(h) for h in msg.outputs),
    )


class ResultCollector:
    """Reassembles a result stream: a succeeded task's snapshot, then its output chunks."""

    def __init__(self, output: OutputKind) -> None:
        self._output = output
        self._status: TaskStatus | None = None
        self._assembler: Assembler | None = None

    def header(self, info: task_pb2.TaskInfo) -> TaskStatus:
        """Takes a snapshot; once SUCCEEDED it fixes the outputs to expect."""
        status = status_from_proto(info)
        if status.state is TaskState.SUCCEEDED:
            self._status = status
            self._assembler = Assembler(status.outputs)
        return status

    def chunk(self, data: bytes) -> None:
        """Takes output bytes."""
        if self._assembler is None:
            raise RuntimeError("result bytes arrived before the result header")
        self._assembler.feed(data)

    def result(self) -> TaskResult:
        """The decoded result once the stream ended."""
        if self._status is None or self._assembler is None:
            raise RuntimeError("the result stream ended without a result")
        buffers = self._assembler.finish()
        outputs = tuple(
            decode(meta, buf, self._output)
            for meta, buf in zip(self._status.outputs, buffers, strict=True)
        )
        return TaskResult(task_id=self._status.task_id, outputs=outputs, status=self._status)
