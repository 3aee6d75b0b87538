"""Domain objects of the broker: frozen dataclasses, no protobuf, no grpc."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

# One TaskState for clients and broker: the states are part of the public contract.
from gpubroker.protos.states import FailureCode, TaskState
from gpubroker.protos.wire import Param, TensorMeta

__all__ = [
    "AgentInfo",
    "Attempt",
    "AttemptOutcome",
    "FailureCode",
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


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of one task: the fencing token every agent message quotes."""

    task_id: str
    number: int


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
