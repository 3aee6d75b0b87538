"""Conversions between protobuf messages and broker domain objects, and status mapping.

The servicers call these at the edge; nothing past them sees a protobuf message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc

from gpubroker.billing.budget import BudgetStatus
from gpubroker.billing.ledger import UsageSummary
from gpubroker.billing.prices import format_usd
from gpubroker.broker.core.batch import BatchOutcome
from gpubroker.broker.core.models import ModelOptions
from gpubroker.broker.errors import (
    AgentRefusedError,
    BrokerError,
    InvalidTaskError,
    LimitExceededError,
    ModelInUseError,
    ModelNotFoundError,
    NoMatchingGpuError,
    PayloadLostError,
    RequestConflictError,
    ResultExpiredError,
    SpoolFullError,
    StaleAttemptError,
    TaskEndedError,
    TaskNotFoundError,
    UnauthenticatedError,
)
from gpubroker.broker.model import (
    Attempt,
    AttemptOutcome,
    AttemptRecord,
    GpuRequirement,
    ModelRecord,
    Param,
    Task,
    TaskSpec,
    TaskState,
)
from gpubroker.protos import agent_pb2, broker_pb2, task_pb2
from gpubroker.protos import convert as protos_convert
from gpubroker.protos.convert import (
    meta_from_proto,
    meta_to_proto,
    params_from_proto,
    state_to_proto,
    time_to_proto,
)
from gpubroker.protos.modelfile import workload_for
from gpubroker.protos.states import FailureCode
from gpubroker.protos.transport import RETRY_AFTER_HEADER, RETRY_AFTER_S

__all__ = [
    "abort_on_broker_error",
    "attempt_from_proto",
    "attempt_to_proto",
    "model_options_from_proto",
    "model_to_proto",
    "outcome_from_proto",
    "requirement_from_proto",
    "requirement_to_proto",
    "spec_from_proto",
    "split_stream",
    "state_from_proto",
    "task_to_proto",
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
    NoMatchingGpuError: grpc.StatusCode.FAILED_PRECONDITION,
    PayloadLostError: grpc.StatusCode.DATA_LOSS,
    ResultExpiredError: grpc.StatusCode.NOT_FOUND,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    ModelInUseError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_for(exc: BrokerError) -> grpc.StatusCode:
    """The gRPC status code of a domain error (looked up along its class hierarchy)."""
    if isinstance(exc, TaskEndedError):
        return status_of(exc.code)
    for cls in type(exc).__mro__:
        if cls in _STATUS_FOR:
            return _STATUS_FOR[cls]
    return grpc.StatusCode.INTERNAL


def status_of(code: FailureCode) -> grpc.StatusCode:
    """The gRPC status a failure code names (``FailureCode.ABORTED``: ``ABORTED``).

    A code this build does not know (``UNKNOWN``, from a newer agent) answers ABORTED: the task
    failed, as it did before failure codes were an enum.
    """
    if code is FailureCode.UNKNOWN:
        return grpc.StatusCode.ABORTED
    return grpc.StatusCode[code.value]


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
        if isinstance(exc, SpoolFullError):  # the disk may free up: say when to try again
            context.set_trailing_metadata(((RETRY_AFTER_HEADER, f"{RETRY_AFTER_S:g}"),))
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
        if isinstance(message, memoryview):  # the fast path (protos.frames)
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
        requires=requirement_from_proto(msg.requires),
    )


def requirement_from_proto(msg: task_pb2.GpuRequirement) -> GpuRequirement:
    """Converts a GPU requirement; a negative memory is an error."""
    if msg.min_memory_bytes < 0:
        raise InvalidTaskError(f"min_memory_bytes {msg.min_memory_bytes} is negative")
    return GpuRequirement(msg.gpu_type or None, msg.min_memory_bytes)


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


def state_from_proto(value: int) -> TaskState:
    """Converts a task state; UNSPECIFIED or unknown values are an error."""
    state = protos_convert.state_from_proto(value)
    if state is None:
        raise InvalidTaskError(f"unknown task state {value}")
    return state


def task_to_proto(
    task: Task,
    waiting_for: str = "",
    attempts: Sequence[AttemptRecord] = (),
    queue_position: int = 0,
) -> task_pb2.TaskInfo:
    """Converts a task snapshot; ``waiting_for`` says why a queued task still waits,
    ``attempts`` where each attempt ran, ``queue_position`` its place in the queue."""
    return task_pb2.TaskInfo(
        task_id=task.id,
        tenant=task.tenant,
        workload=task.workload,
        state=state_to_proto(task.state),
        attempt=task.attempt,
        priority=task.priority,
        request_id=task.request_id or "",
        inputs=[meta_to_proto(m) for m in task.inputs],
        outputs=[meta_to_proto(m) for m in task.outputs],
        error_code=task.error_code.value if task.error_code is not None else "",
        error_message=task.error_message or "",
        created_at=time_to_proto(task.created_at),
        started_at=time_to_proto(task.started_at),
        finished_at=time_to_proto(task.finished_at),
        deadline=time_to_proto(task.deadline_at),
        compute_seconds=task.compute_seconds or 0.0,
        gpu_type=task.gpu_type or "",
        waiting_for=waiting_for,
        model_load_seconds=task.model_load_seconds or 0.0,
        batch_tasks=task.batch_tasks or 0,
        requires=requirement_to_proto(task.requires),
        attempts=[attempt_to_proto(a) for a in attempts],
        queue_position=queue_position,
    )


def attempt_to_proto(record: AttemptRecord) -> task_pb2.AttemptInfo:
    """Converts where one attempt ran and how it ended."""
    return task_pb2.AttemptInfo(
        number=record.number,
        agent_id=record.agent_id,
        machine_name=record.machine_name,
        gpu_type=record.gpu_type,
        started_at=time_to_proto(record.started_at),
        ended_at=time_to_proto(record.ended_at),
        outcome=record.outcome,
        detail=record.detail,
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
        error_code=FailureCode.parse(msg.error_code),
        error_message=msg.error_message,
        # Reported, never billed: a nonsense load time is recorded as none.
        model_load_seconds=(
            msg.model_load_seconds if math.isfinite(msg.model_load_seconds) else 0.0
        ),
        batch_tasks=max(0, msg.batch_tasks),
    )


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


def requirement_to_proto(requires: GpuRequirement) -> task_pb2.GpuRequirement:
    """Converts a GPU requirement (an empty one is an empty message)."""
    return task_pb2.GpuRequirement(
        gpu_type=requires.gpu_type or "", min_memory_bytes=requires.min_memory_bytes
    )


def model_options_from_proto(msg: broker_pb2.ModelHeader) -> ModelOptions:
    """The name and options of an upload's header (the service checks their ranges)."""
    return ModelOptions(
        name=msg.name,
        max_batch_size=msg.max_batch_size,
        max_queue_delay_s=msg.max_queue_delay_seconds,
        requires=requirement_from_proto(msg.requires),
    )


def model_to_proto(record: ModelRecord) -> broker_pb2.ModelInfo:
    """Converts a model record; a varying batch dimension is -1 in its specs."""
    return broker_pb2.ModelInfo(
        model_id=record.model_id,
        name=record.name,
        size_bytes=record.size_bytes,
        created_at=time_to_proto(record.created_at),
        inputs=_tensor_specs(record.metadata.get("inputs")),
        outputs=_tensor_specs(record.metadata.get("outputs")),
        batch_dim_varies=record.batch_dim_varies,
        max_batch_size=record.max_batch_size,
        max_queue_delay_seconds=record.max_queue_delay_s,
        requires=requirement_to_proto(record.requires),
        workload=workload_for(record.model_id),
    )


def _tensor_specs(specs: object) -> list[task_pb2.TensorSpec]:
    if not isinstance(specs, list):
        return []
    return [
        task_pb2.TensorSpec(
            dtype=spec["dtype"], shape=[-1 if d is None else d for d in spec["shape"]]
        )
        for spec in specs
    ]
