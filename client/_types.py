"""What the client hands back: task states, status snapshots and results."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from client.wire import TensorMeta

__all__ = ["TaskResult", "TaskState", "TaskStatus", "Usage"]


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


@dataclass(frozen=True, slots=True)
class TaskStatus:
    """A snapshot of a task."""

    task_id: str
    tenant: str
    workload: str
    state: TaskState
    attempt: int
    priority: int
    request_id: str
    error_code: str
    error_message: str
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    deadline: datetime | None
    compute_seconds: float
    """Measured compute time of the successful attempt: what the task is billed for."""
    gpu_type: str
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]


@dataclass(frozen=True, slots=True)
class TaskResult:
    """A finished task's outputs."""

    task_id: str
    outputs: tuple[Any, ...]
    """torch tensors or numpy arrays (see ``output=``), in the workload's order."""
    status: TaskStatus

    @property
    def output(self) -> Any:
        """The only output (a torch tensor or numpy array); ``ValueError`` if there are several."""
        if len(self.outputs) != 1:
            raise ValueError(f"task {self.task_id} has {len(self.outputs)} outputs; use .outputs")
        return self.outputs[0]

    @property
    def compute_seconds(self) -> float:
        """Measured compute time, as billed."""
        return self.status.compute_seconds

    @property
    def gpu_type(self) -> str:
        """The GPU (or ``cpu``) the task ran on."""
        return self.status.gpu_type

    @property
    def attempt(self) -> int:
        """Which attempt produced the result."""
        return self.status.attempt


@dataclass(frozen=True, slots=True)
class Usage:
    """What the caller has been billed for over a time range: successful tasks only."""

    tenant: str
    tasks: int
    compute_seconds: float
    """Measured compute time billed."""
    bytes_in: int
    bytes_out: int
    cost_usd: Decimal
    """Exact, in US dollars."""
    month_to_date_usd: Decimal
    """Spent since the start of this calendar month (UTC)."""
    monthly_budget_usd: Decimal | None
    """The monthly budget; None when there is none."""
