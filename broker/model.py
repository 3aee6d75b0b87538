"""Domain objects of the broker: frozen dataclasses, no protobuf, no grpc."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

# One TaskState for clients and broker: the states are part of the public contract.
from gpubroker.protos.modelfile import model_of
from gpubroker.protos.states import FailureCode, TaskState
from gpubroker.protos.wire import Param, TensorMeta


@dataclass(frozen=True, slots=True)
class GpuRequirement:
    """Which agents may run a task: an exact GPU type and/or a least device memory."""

    gpu_type: str | None = None
    """E.g. ``nvidia-l4`` (``cpu`` for CPU agents); None for any."""
    min_memory_bytes: int = 0
    """Least device memory; 0 for any."""

    def __bool__(self) -> bool:
        return self.gpu_type is not None or self.min_memory_bytes > 0

    def fits(self, gpu_type: str, memory_bytes: int) -> bool:
        """True when a device of this type and memory satisfies the requirement."""
        if self.gpu_type is not None and gpu_type != self.gpu_type:
            return False
        return memory_bytes >= self.min_memory_bytes

    def __str__(self) -> str:
        parts = [self.gpu_type or "any GPU"]
        if self.min_memory_bytes:
            parts.append(f"with at least {self.min_memory_bytes / 2**30:.1f} GiB")
        return " ".join(parts)


__all__ = [
    "AgentInfo",
    "Attempt",
    "AttemptOutcome",
    "AttemptRecord",
    "FailureCode",
    "GpuRequirement",
    "ModelRecord",
    "Param",
    "Task",
    "TaskSpec",
    "TaskState",
]


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What a client asks the broker to run."""

    workload: str
    """Registered workload name."""
    inputs: tuple[TensorMeta, ...]
    """Input tensor headers; their bytes arrive separately."""
    params: Mapping[str, Param] = field(default_factory=dict)
    """Workload parameters."""
    priority: int = 0
    """Higher runs first among the tenant's own tasks."""
    request_id: str | None = None
    """Idempotency key; a retried submit with the same key returns the same task."""
    timeout_s: float | None = None
    """Seconds from submission until the task must be done."""
    requires: GpuRequirement = GpuRequirement()
    """Where the task may run; an empty one: the model's requirement, else anywhere."""

    @property
    def model_id(self) -> str | None:
        """The uploaded model the task runs, or None for an operator workload."""
        return model_of(self.workload)

    @property
    def input_bytes(self) -> int:
        """Total bytes of the inputs."""
        return sum(meta.nbytes for meta in self.inputs)


@dataclass(frozen=True, slots=True)
class Task:
    """A snapshot of one task's row."""

    id: str
    tenant: str
    workload: str
    params: Mapping[str, Param]
    priority: int
    state: TaskState
    attempt: int
    """0 until first assigned; each assignment increments it."""
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    input_bytes: int
    output_bytes: int
    created_at: datetime
    seq: int = 0
    """Insertion order, for FIFO within a priority."""
    request_id: str | None = None
    agent_id: str | None = None
    gpu_type: str | None = None
    compute_seconds: float | None = None
    error_code: FailureCode | None = None
    """Why a failed or cancelled task ended; None while it is live and once it succeeded."""
    error_message: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline_at: datetime | None = None
    inline_inputs: bytes | None = None
    """The inputs' bytes when small; None when they are a spool file."""
    inline_outputs: bytes | None = None
    """The outputs' bytes when small; None when they are a spool file."""
    call_bound: bool = False
    """Created by ``Run`` or ``RunMany``: the task lives as long as its call. Its payloads are
    not fsynced, and a broker that restarts cancels it instead of running it for nobody."""
    requires: GpuRequirement = GpuRequirement()
    """Where the task may run (already merged with its model's requirement)."""
    model_load_seconds: float | None = None
    """Model fetch/check/load time before the successful attempt ran; never billed."""
    batch_tasks: int | None = None
    """Tasks in the same model call as the successful attempt (dynamic batching)."""

    @property
    def model_id(self) -> str | None:
        """The uploaded model the task runs, or None for an operator workload."""
        return model_of(self.workload)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of one task: the fencing token every agent message quotes."""

    task_id: str
    number: int


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """Where one attempt of a task ran and how it ended (``TaskInfo.attempts``)."""

    number: int
    agent_id: str
    gpu_type: str
    started_at: datetime
    ended_at: datetime | None = None
    """None while it runs."""
    outcome: str = "running"
    """``running``, the task's final state (``succeeded``, ``failed``, ``cancelled``) for its
    last attempt, or why it went back to the queue (``lost``, ``rejected``, ``recalled``)."""
    detail: str = ""
    """The task's error or the requeue's reason; empty for a success or a running attempt."""
    machine_name: str = ""
    """The machine the agent runs on when a provider started it (its agent id); else empty."""


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """What an agent said about itself when it connected."""

    agent_id: str
    gpu_type: str
    gpu_memory_bytes: int
    slots: int
    workloads: frozenset[str]
    version: str = ""
    protocol: int = 1
    """Control-stream protocol the agent speaks (2: batches, results on the stream)."""
    prefetch: int = 0
    """Tasks the agent queues beyond ``slots``: its credit is capped at slots + prefetch."""
    runs_models: bool = False
    """The agent runs uploaded models (``model:<id>`` workloads)."""
    models: frozenset[str] = frozenset()
    """Models the agent held when it connected (its heartbeats update the session's copy)."""
    connected_at: datetime | None = None
    """When its hello arrived (UTC, the broker's clock)."""
    started_at: datetime | None = None
    """When its process started, on the broker's clock: the hello's arrival less the uptime
    the agent reported; None from agents that report none."""


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """How an attempt ended, as its agent reported it."""

    agent_id: str
    attempt: Attempt
    outputs: tuple[TensorMeta, ...] = ()
    compute_seconds: float = 0.0
    error_code: FailureCode | None = None
    """Why the workload failed; None when it succeeded."""
    error_message: str = ""
    model_load_seconds: float = 0.0
    """Model fetch/check/load time before the run; recorded, never billed."""
    batch_tasks: int = 0
    """Tasks in the same model call; ``compute_seconds`` is this task's share by rows."""


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """One tenant's model: the row that says the tenant holds the file of this id."""

    tenant: str
    model_id: str
    name: str
    size_bytes: int
    metadata: Mapping[str, object]
    """The model file's metadata section: input/output specs, ``batch_dim_varies``, ..."""
    created_at: datetime
    max_batch_size: int = 0
    """Dynamic batching: most rows per call; 0 off."""
    max_queue_delay_s: float = 0.0
    """Dynamic batching: longest a task waits at the agent for others."""
    requires: GpuRequirement = GpuRequirement()
    """Default requirement of the model's tasks."""

    @property
    def batch_dim_varies(self) -> bool:
        """True when the first dimension of inputs and outputs may vary."""
        return bool(self.metadata.get("batch_dim_varies"))
