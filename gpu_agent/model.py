"""The agent's view of its work, as frozen dataclasses; protobuf stays in ``convert``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gpubroker.protos.wire import Param, TensorMeta

__all__ = ["Assignment", "AttemptRef", "Hello", "ModelRef"]


@dataclass(frozen=True, slots=True)
class AttemptRef:
    """One attempt of one task; the broker accepts data calls only for its current attempt."""

    task_id: str
    number: int

    def __str__(self) -> str:
        return f"{self.task_id}#{self.number}"


@dataclass(frozen=True, slots=True)
class ModelRef:
    """The uploaded model an assignment runs, and how its calls may be batched."""

    model_id: str
    """sha256 of the model file."""
    size_bytes: int
    """Length of the model file."""
    max_batch_size: int = 1
    """Most rows stacked into one call; 1 (or 0) turns batching off."""
    max_queue_delay_s: float = 0.0
    """Longest a task waits here for others to stack with it."""


@dataclass(frozen=True, slots=True)
class Assignment:
    """A task attempt the broker gave this agent."""

    ref: AttemptRef
    workload: str
    """Registered workload name."""
    inputs: tuple[TensorMeta, ...]
    """Input headers, not yet validated."""
    params: Mapping[str, Param] = field(default_factory=dict)
    timeout_s: float | None = None
    """Seconds left until the task's deadline when the assignment arrived; None for none."""
    inline_inputs: bytes | None = None
    """The inputs' bytes when they rode along with the assignment (skip FetchInputs)."""
    model: ModelRef | None = None
    """The model to run when ``workload`` is ``model:<id>``."""


@dataclass(frozen=True, slots=True)
class Hello:
    """What the agent announces when it connects."""

    agent_id: str
    gpu_type: str
    """GCE accelerator name, or ``cpu``."""
    gpu_memory_bytes: int
    slots: int
    """How many tasks it runs at once."""
    workloads: tuple[str, ...]
    """Names of the workloads it can run."""
    version: str
    """Agent software version."""
    prefetch: int = 0
    """Tasks it queues beyond ``slots``."""
    runs_models: bool = False
    """True when it runs uploaded models (``model:<id>`` workloads)."""
    models: tuple[str, ...] = ()
    """Ids of the models it holds already."""
    uptime_s: float = 0.0
    """Seconds since its process started; 0: not reported."""
    broken: tuple[tuple[str, str], ...] = ()
    """``(name, why)`` of each installed workload that failed to load."""
