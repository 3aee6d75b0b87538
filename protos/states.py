"""Task states and failure codes: the words the broker, the agent and the client share.

A failure code names the gRPC status a failed task answers with (``FailureCode.ABORTED`` is
``grpc.StatusCode.ABORTED``). The domain speaks in these enums; only the gRPC edge turns a code
into a ``grpc.StatusCode``, and only the wire carries the name as text.
"""

from __future__ import annotations

import enum

__all__ = ["FailureCode", "TaskState"]


class TaskState(enum.Enum):
    """Where a task is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """True for states a task never leaves."""
        return self in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


class FailureCode(enum.Enum):
    """Why a task failed or was cancelled, as the gRPC status its result answers with."""

    CANCELLED = "CANCELLED"
    """Cancelled by its owner, or lost with its agent after its owner went away."""
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    """The workload refused its inputs, or is unknown to the agent."""
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    """The task's deadline passed before it finished."""
    NOT_FOUND = "NOT_FOUND"
    """Something the task names does not exist."""
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    """The task cannot run in its current state (e.g. its result was never kept)."""
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    """The task's output or memory did not fit."""
    ABORTED = "ABORTED"
    """The workload raised, or the task gave up after its last attempt."""
    INTERNAL = "INTERNAL"
    """The agent failed in a way the workload did not cause."""
    UNAVAILABLE = "UNAVAILABLE"
    """No agent could take the task."""
    DATA_LOSS = "DATA_LOSS"
    """Bytes were corrupted or lost on the way (a checksum that does not match)."""
    UNKNOWN = "UNKNOWN"
    """A code this version does not know, read from the wire or the database."""

    @classmethod
    def parse(cls, name: str | None) -> FailureCode | None:
        """The code named ``name`` (a wire or database value); None for an empty one."""
        if not name:
            return None
        try:
            return cls(name)
        except ValueError:
            return cls.UNKNOWN
