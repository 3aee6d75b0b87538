"""What the client hands back: task status snapshots, results and usage totals."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from gpubroker.protos.states import TaskState
from gpubroker.protos.wire import TensorMeta

__all__ = ["TaskResult", "TaskStatus", "Usage"]


@dataclass(frozen=True, slots=True)
class TaskStatus:
    """A snapshot of a task."""

    task_id: str
    """Broker-assigned id."""
    tenant: str
    """The tenant that owns the task (the API key's)."""
    workload: str
    """The workload name, e.g. ``"matmul"``."""
    state: TaskState
    """Where the task stands."""
    attempt: int
    """0 before the first assignment; grows each time the task is (re)assigned to an agent."""
    priority: int
    """Higher runs first among the tenant's own tasks."""
    request_id: str
    """The idempotency key it was submitted with."""
    error_code: str
    """gRPC status code name of a failed task (e.g. ``"ABORTED"``); empty otherwise."""
    error_message: str
    """Why the task failed or was cancelled; empty otherwise."""
    created_at: datetime | None
    """When the broker acknowledged the task (UTC)."""
    started_at: datetime | None
    """When the current attempt started (UTC); None while queued."""
    finished_at: datetime | None
    """When the task reached a final state (UTC)."""
    deadline: datetime | None
    """When the task fails with DEADLINE_EXCEEDED if not done (UTC); None for no deadline."""
    compute_seconds: float
    """Measured compute time of the successful attempt: what the task is billed for."""
    gpu_type: str
    """GPU type of the agent that ran the successful attempt (``"cpu"`` for CPU agents)."""
    inputs: tuple[TensorMeta, ...]
    """The input tensors' headers."""
    outputs: tuple[TensorMeta, ...]
    """The output tensors' headers, once succeeded."""


@dataclass(frozen=True, slots=True)
class TaskResult:
    """A finished task's outputs."""

    task_id: str
    """The task's id."""
    outputs: tuple[Any, ...]
    """torch tensors or numpy arrays (see ``output=``), in the workload's order.

    Typed ``Any`` rather than a union so ``torch.equal(result.output, x)`` type-checks: which
    kind comes back is chosen at run time.
    """
    status: TaskStatus
    """The finished task's snapshot."""

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
    """The caller's tenant."""
    tasks: int
    """Successful tasks billed."""
    compute_seconds: float
    """Measured compute time billed."""
    bytes_in: int
    """Bytes of those tasks' inputs."""
    bytes_out: int
    """Bytes of those tasks' outputs."""
    cost_usd: Decimal
    """Exact, in US dollars."""
    month_to_date_usd: Decimal
    """Spent since the start of this calendar month (UTC)."""
    monthly_budget_usd: Decimal | None
    """The monthly budget; None when there is none."""
