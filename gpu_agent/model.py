"""The agent's view of its work, as frozen dataclasses; protobuf stays in ``convert``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gpubroker.protos.wire import Param, TensorMeta

__all__ = ["Assignment", "AttemptRef", "Hello"]


@dataclass(frozen=True, slots=True)
class AttemptRef:
    """One attempt of one task; the broker accepts data calls only for its current attempt."""

    task_id: str
    number: int

    def __str__(self) -> str:
        return f"{self.task_id}#{self.number}"


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
