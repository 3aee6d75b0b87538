"""Conversions between protobuf messages and broker domain objects, and status mapping.

The servicers call these at the edge; nothing past them sees a protobuf message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from gpubroker.billing.budget import BudgetStatus
from gpubroker.billing.ledger import UsageSummary
from gpubroker.billing.prices import format_usd
from gpubroker.broker.core.batch import BatchOutcome
from gpubroker.broker.errors import (
    AgentRefusedError,
    BrokerError,
    InvalidTaskError,
    LimitExceededError,
    PayloadLostError,
    RequestConflictError,
    StaleAttemptError,
    TaskEndedError,
    TaskNotFoundError,
    UnauthenticatedError,
)
from gpubroker.broker.model import Attempt, AttemptOutcome, Param, Task, TaskSpec, TaskState
from gpubroker.protos import agent_pb2, broker_pb2, task_pb2
from gpubroker.protos.convert import meta_from_proto, meta_to_proto, params_from_proto

__all__ = [
    "abort_on_broker_error",
    "attempt_from_proto",
    "outcome_from_proto",
    "spec_from_proto",
    "split_stream",
    "state_from_proto",
    "state_to_proto",
    "task_to_proto",
    "time_from_proto",
    "usage_to_proto",
]

logger = logging.getLogger(__name__)

_STATUS_FOR: dict[type[BrokerError], grpc.StatusCode] = {
    InvalidTaskError: grpc.StatusCode.INVALID_ARGUMENT,
    LimitExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TaskNotFoundError: grpc.StatusCode.NOT_FOUND,
    RequestConflictError: grpc.StatusCode.ALREADY_EXISTS,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    StaleAttemptError: grpc.StatusCode.FAILED_PRECONDITION,
    AgentRefusedError: grpc.StatusCode.FAILED_PRECONDITION,
    PayloadLostError: grpc.StatusCode.DATA_LOSS,
}

_STATE_TO_PROTO = {
    TaskState.QUEUED: task_pb2.TASK_STATE_QUEUED,
    TaskState.RUNNING: task_pb2.TASK_STATE_RUNNING,
    TaskState.SUCCEEDED: task_pb2.TASK_STATE_SUCCEEDED,
    TaskState.FAILED: task_pb2.TASK_STATE_FAILED,
    TaskState.CANCELLED: task_pb2.TASK_STATE_CANCELLED,
}
_STATE_FROM_PROTO = {v: k for k, v in _STATE_TO_PROTO.items()}


def status_for(exc: BrokerError) -> grpc.StatusCode:
    """The gRPC status code of a domain error (looked up along its class hierarchy)."""
    if isinstance(exc, TaskEndedError):
        return (
            grpc.StatusCode[exc.code]
            if exc.code in grpc.StatusCode.__members__
            else (grpc.StatusCode.ABORTED)
        )
    for cls in type(exc).__mro__:
        if cls in _STATUS_FOR:
            return _STATUS_FOR[cls]
    return grpc.StatusCode.INTERNAL


DRAIN_MESSAGES = 64
"""Most request messages read and dropped before refusing a client stream (see below)."""
DRAIN_SECONDS = 2.0


@contextlib.asynccontextmanager
async def abort_on_broker_error(
    context: grpc.aio.ServicerContext[Any, Any], requests: AsyncIterator[Any] | None = None
) -> AsyncIterator[None]:
    """Translates domain errors into gRPC status codes; anything else stays UNKNOWN.

    For a client stream (``requests``), a few remaining messages are read first: a grpc.aio
    client still writing when the call ends early reports INTERNAL instead of our status
    about a third of the time. A small upload is drained whole; a large one is refused at once.
    """
    try:
        yield
    except BrokerError as exc:
        if requests is not None:
            await _drain(requests)
        await context.abort(status_for(exc), str(exc))


async def _drain(requests: AsyncIterator[Any]) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(DRAIN_SECONDS):
            for _ in range(DRAIN_MESSAGES):
                if await anext(requests, None) is None:
                    return


async def split_stream(
    messages: AsyncIterator[Any],
) -> tuple[Any, AsyncIterator[bytes | memoryview]]:
    """Reads a header-then-chunks stream: returns the header and an iterator of chunk bytes.

    A chunk may arrive as the ``memoryview`` ``gpubroker.protos.frames`` made of it, or as a
    message.
    """
    iterator = aiter(messages)
    first = await anext(iterator, None)
    if first is None or isinstance(first, memoryview) or first.WhichOneof("kind") != "header":
        raise InvalidTaskError("the stream must start with a header message")
    return first.header, _chunks(iterator)


async def _chunks(iterator: AsyncIterator[Any]) -> AsyncIterator[bytes | memoryview]:
    async for message in iterator:
        if isinstance(message, memoryview):  # the fast path (client.frames)
            yield message
        elif message.WhichOneof("kind") == "chunk":
            yield message.chunk.data
        else:
            raise InvalidTaskError("only chunk messages may follow the header")


def _params(params: Mapping[str, task_pb2.ParamValue]) -> dict[str, Param]:
    try:
        return params_from_proto(params)
    except ValueError as exc:
        raise InvalidTaskError(str(exc)) from exc


def spec_from_proto(msg: broker_pb2.TaskHeader) -> TaskSpec:
    """Converts a client's task header."""
    return TaskSpec(
        workload=msg.workload,
        inputs=tuple(meta_from_proto(t) for t in msg.inputs),
        params=_params(msg.params),
        priority=msg.priority,
        request_id=msg.request_id or None,
        timeout_s=msg.timeout_seconds or None,
    )


def outcome_to_proto(outcome: BatchOutcome) -> broker_pb2.InlineOutcome:
    """One ``RunMany`` answer: the final task and its small outputs, or why it was refused."""
    if outcome.task is None:
        assert outcome.error is not None
        return broker_pb2.InlineOutcome(
            index=outcome.index,
            error_code=status_for(outcome.error).name,
            error_message=str(outcome.error),
        )
    data = outcome.task.inline_outputs
    return broker_pb2.InlineOutcome(
        index=outcome.index,
        task=task_to_proto(outcome.task),
        data=data or b"",
        data_inline=data is not None,
    )


def state_from_proto(state: int) -> TaskState:
    """Converts a task state; UNSPECIFIED or unknown values are an error."""
    if state not in _STATE_FROM_PROTO:
        raise InvalidTaskError(f"unknown task state {state}")
    return _STATE_FROM_PROTO[state]  # type: ignore[index]


def state_to_proto(state: TaskState) -> task_pb2.TaskState.ValueType:
    """Converts a task state."""
    return _STATE_TO_PROTO[state]


def task_to_proto(task: Task) -> task_pb2.TaskInfo:
    """Converts a task snapshot."""
    return task_pb2.TaskInfo(
        task_id=task.id,
        tenant=task.tenant,
        workload=task.workload,
        state=_STATE_TO_PROTO[task.state],
        attempt=task.attempt,
        priority=task.priority,
        request_id=task.request_id or "",
        inputs=[meta_to_proto(m) for m in task.inputs],
        outputs=[meta_to_proto(m) for m in task.outputs],
        error_code=task.error_code or "",
        error_message=task.error_message or "",
        created_at=_timestamp(task.created_at),
        started_at=_timestamp(task.started_at),
        finished_at=_timestamp(task.finished_at),
        deadline=_timestamp(task.deadline_at),
        compute_seconds=task.compute_seconds or 0.0,
        gpu_type=task.gpu_type or "",
    )


def attempt_from_proto(msg: agent_pb2.TaskAttempt) -> Attempt:
    """Converts an attempt reference."""
    return Attempt(task_id=msg.task_id, number=msg.attempt)


def outcome_from_proto(msg: agent_pb2.ResultHeader) -> AttemptOutcome:
    """Converts an agent's result header.

    Raises:
        InvalidTaskError: the compute time is not a finite number (it is what gets billed).
    """
    if not math.isfinite(msg.compute_seconds):
        raise InvalidTaskError(
            f"the agent reported a compute time of {msg.compute_seconds!r} seconds"
        )
    return AttemptOutcome(
        agent_id=msg.agent_id,
        attempt=attempt_from_proto(msg.attempt),
        outputs=tuple(meta_from_proto(t) for t in msg.outputs),
        compute_seconds=max(0.0, msg.compute_seconds),
        error_code=msg.error_code or None,
        error_message=msg.error_message,
    )


def time_from_proto(msg: Any, field: str) -> datetime | None:
    """An optional timestamp field as an aware UTC datetime."""
    if not msg.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(msg, field)
    return stamp.ToDatetime(tzinfo=UTC)


def usage_to_proto(summary: UsageSummary, budget: BudgetStatus) -> broker_pb2.GetUsageResponse:
    """A tenant's usage totals and its month against its budget."""
    return broker_pb2.GetUsageResponse(
        month_to_date_nanousd=budget.spent_nanousd,
        monthly_budget_nanousd=budget.limit_nanousd or 0,
        has_budget=budget.limit_nanousd is not None,
        tenant=summary.key,
        tasks=summary.tasks,
        compute_seconds=summary.compute_seconds,
        bytes_in=summary.bytes_in,
        bytes_out=summary.bytes_out,
        cost_nanousd=summary.cost_nanousd,
        cost_usd=format_usd(summary.cost_nanousd).removeprefix("$"),
    )


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp
