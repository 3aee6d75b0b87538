"""What the client hands back: task status snapshots, results and usage totals."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from gpubroker.client.errors import GpuBrokerError
from gpubroker.protos.modelfile import model_of
from gpubroker.protos.states import TaskState
from gpubroker.protos.wire import TensorMeta


@dataclass(frozen=True, slots=True)
class GpuRequirement:
    """Which GPUs may run a task: an exact GPU type and/or a least device memory."""

    gpu_type: str | None = None
    """E.g. ``"nvidia-l4"`` (``"cpu"`` for CPU agents); None for any."""
    min_memory_bytes: int = 0
    """Least device memory in bytes; 0 for any."""

    def __bool__(self) -> bool:
        return self.gpu_type is not None or self.min_memory_bytes > 0

    def __str__(self) -> str:
        parts = [self.gpu_type or "any GPU"]
        if self.min_memory_bytes:
            parts.append(f"with at least {self.min_memory_bytes / 2**30:.1f} GiB")
        return " ".join(parts)


__all__ = [
    "Attempt",
    "GpuRequirement",
    "Model",
    "TaskResult",
    "TaskStatus",
    "TensorSpec",
    "Usage",
]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One assignment of a task to an agent, and how it ended."""

    number: int
    """From 1."""
    agent_id: str
    """The agent it was assigned to."""
    machine_name: str
    """The machine that agent runs on when the broker's autoscaler started it; empty otherwise."""
    gpu_type: str
    """The agent's GPU type."""
    started_at: datetime | None
    """When it was assigned (UTC)."""
    ended_at: datetime | None
    """When it ended (UTC); None while it runs."""
    outcome: str
    """``running``, ``succeeded``, ``failed``, ``cancelled``; or, for one that went back to the
    queue, ``lost`` (the agent crashed, disconnected, went silent or drained, or the broker
    restarted), ``rejected`` (its result was unusable) or ``recalled`` (given to an idle agent
    before it started)."""
    detail: str = ""
    """Why an attempt that did not succeed ended so."""


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
    model_load_seconds: float = 0.0
    """Time the agent spent fetching, checking and loading the task's model before the
    successful attempt; never billed. 0 when the model was already loaded (or for an operator
    workload)."""
    batch_tasks: int = 0
    """How many tasks ran in the same model call as this one (dynamic batching): 1 alone, 0
    for an operator workload or a task that has not run."""
    requires: GpuRequirement = GpuRequirement()
    """The GPU the task must run on (from the submit, else from its model); empty for any."""
    waiting_for: str = ""
    """Why a queued task still waits, e.g. ``"waiting for an nvidia-l4 VM to boot"``; empty
    when it is not waiting or nothing in particular holds it."""
    queue_position: int = 0
    """Where a queued task stands in the queue it waits in: 1 runs next; 0 when it is not
    queued (or the broker does not say)."""
    attempts: tuple[Attempt, ...] = ()
    """Every assignment so far, oldest first: which agent and machine ran it, and how it
    ended (empty from a ``run`` call's final status)."""

    @property
    def model_id(self) -> str | None:
        """The uploaded model the task runs, or None for an operator workload."""
        return model_of(self.workload)


@dataclass(frozen=True, slots=True, init=False)
class TaskResult:
    """A finished task's outputs, or, from ``map``, an item that failed in its place.

    ``run`` and ``result()`` return only successes (a failure raises). ``map`` yields one
    ``TaskResult`` per item, failures included: check ``ok`` or ``error``; reading ``output``
    or ``outputs`` of a failed item raises its ``error``.
    """

    task_id: str
    """The task's id; empty for a ``map`` item refused before it became a task."""
    status: TaskStatus
    """The finished task's snapshot (for a refused ``map`` item: state FAILED, no task id,
    the refusal's ``error_code`` and ``error_message``)."""
    error: GpuBrokerError | None
    """Why the item failed (the error ``run`` would have raised for it); None on success."""
    _outputs: tuple[Any, ...]

    def __init__(
        self,
        task_id: str,
        outputs: tuple[Any, ...],
        status: TaskStatus,
        error: GpuBrokerError | None = None,
    ) -> None:
        object.__setattr__(self, "task_id", task_id)
        object.__setattr__(self, "_outputs", outputs)
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "error", error)

    @classmethod
    def failed(cls, status: TaskStatus, error: GpuBrokerError) -> TaskResult:
        """A failed item: no outputs, ``error`` raised on reading them."""
        return cls(status.task_id, (), status, error)

    @property
    def ok(self) -> bool:
        """True when the task succeeded and its outputs are here."""
        return self.error is None

    @property
    def outputs(self) -> tuple[Any, ...]:
        """torch tensors or numpy arrays (see ``output=``), in the workload's order.

        Typed ``Any`` rather than a union so ``torch.equal(result.output, x)`` type-checks: which
        kind comes back is chosen at run time.

        Raises:
            GpuBrokerError: The item failed: its ``error`` (e.g. ``TaskFailedError``).
        """
        if self.error is not None:
            raise self.error.with_traceback(None)
        return self._outputs

    @property
    def output(self) -> Any:
        """The only output (a torch tensor or numpy array).

        Raises:
            ValueError: The task has several outputs (use ``outputs``).
            GpuBrokerError: The item failed: its ``error``.
        """
        outputs = self.outputs
        if len(outputs) != 1:
            raise ValueError(f"task {self.task_id} has {len(outputs)} outputs; use .outputs")
        return outputs[0]

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

    @property
    def model_load_seconds(self) -> float:
        """Model load time before the successful attempt (unbilled); 0 when it was resident."""
        return self.status.model_load_seconds

    @property
    def batch_tasks(self) -> int:
        """Tasks that shared the model call (dynamic batching); 0 for an operator workload."""
        return self.status.batch_tasks


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


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """The dtype and shape of one tensor a model takes or returns."""

    dtype: str
    """E.g. ``"float32"``, as in ``TensorMeta.dtype``."""
    shape: tuple[int | None, ...]
    """Dimensions; None marks the batch dimension of a model whose batch size may vary."""


@dataclass(frozen=True, slots=True)
class Model:
    """An uploaded model, as the broker holds it: pass it to ``run``, ``submit`` or ``map``
    in place of a workload name.

    A plain value (frozen, hashable, picklable): it names the model by its id and does not tie
    to a client or a connection.
    """

    model_id: str
    """sha256 of the model file, 64 lowercase hex digits: the same module gives the same id."""
    name: str
    """The name it is listed under (not necessarily unique)."""
    size_bytes: int
    """Length of the model file: what counts against your model quota."""
    workload: str
    """What a task names to run it: ``"model:<model_id>"``."""
    inputs: tuple[TensorSpec, ...]
    """What the model takes, in order."""
    outputs: tuple[TensorSpec, ...]
    """What the model returns, in order."""
    batch_dim_varies: bool
    """True when the first dimension of every input and output may vary."""
    max_batch_size: int
    """Dynamic batching: most rows stacked into one call of the model; 0 when off."""
    max_queue_delay: float
    """Dynamic batching: longest, in seconds, a task waits on the agent for others."""
    requires: GpuRequirement
    """The GPU the model's tasks need unless a task says otherwise; empty for any."""
    created_at: datetime | None
    """When it was first uploaded (UTC)."""
