"""Task rows and task snapshots: what a ``tasks`` row holds, as the domain's ``Task``.

The one place where a row's text becomes the domain's types (``TaskState``, ``FailureCode``,
``TensorMeta``) and back.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Row

from gpubroker.broker.model import GpuRequirement, Task, TaskSpec, TaskState
from gpubroker.protos.states import FailureCode
from gpubroker.protos.wire import TensorMeta

__all__ = ["code_to_row", "meta_to_json", "new_task", "new_task_row", "task_from_row"]


def meta_to_json(meta: TensorMeta) -> dict[str, Any]:
    """A tensor header as the JSON an ``inputs`` or ``outputs`` column holds."""
    return {
        "name": meta.name,
        "dtype": meta.dtype,
        "shape": list(meta.shape),
        "nbytes": meta.nbytes,
        "crc32c": meta.crc32c,
    }


def _meta_from_json(data: dict[str, Any]) -> TensorMeta:
    return TensorMeta(
        dtype=data["dtype"],
        shape=tuple(data["shape"]),
        nbytes=data["nbytes"],
        crc32c=data["crc32c"],
        name=data.get("name", ""),
    )


def code_to_row(code: FailureCode) -> str:
    """A failure code as the ``error_code`` column holds it: its gRPC status name."""
    return code.value


def new_task_row(
    task_id: str,
    tenant: str,
    spec: TaskSpec,
    now: datetime,
    deadline: datetime | None,
    inline_inputs: bytes | None,
    call_bound: bool,
) -> dict[str, Any]:
    """The row of a task just submitted: queued, never attempted."""
    return {
        "id": task_id,
        "tenant": tenant,
        "request_id": spec.request_id,
        "workload": spec.workload,
        "params": dict(spec.params),
        "priority": spec.priority,
        "state": TaskState.QUEUED.value,
        "attempt": 0,
        "inputs": [meta_to_json(m) for m in spec.inputs],
        "input_bytes": spec.input_bytes,
        "inline_inputs": inline_inputs,
        "output_bytes": 0,
        "created_at": now,
        "deadline_at": deadline,
        "call_bound": call_bound,
        "requires_gpu_type": spec.requires.gpu_type,
        "requires_gpu_memory": spec.requires.min_memory_bytes,
    }


def new_task(row: dict[str, Any], spec: TaskSpec, seq: int) -> Task:
    """The snapshot of ``row`` (from ``new_task_row``) once inserted as ``seq``.

    Built from what was just bound: reading every column back and converting it (JSON,
    timestamps) cost more than the insert.
    """
    deadline: datetime | None = row["deadline_at"]
    return Task(
        id=row["id"],
        tenant=row["tenant"],
        workload=spec.workload,
        params=row["params"],
        priority=spec.priority,
        state=TaskState.QUEUED,
        attempt=0,
        inputs=tuple(spec.inputs),
        outputs=(),
        input_bytes=row["input_bytes"],
        output_bytes=0,
        created_at=row["created_at"].astimezone(UTC),
        seq=seq,
        request_id=spec.request_id,
        deadline_at=deadline.astimezone(UTC) if deadline is not None else None,
        inline_inputs=row["inline_inputs"],
        call_bound=row["call_bound"],
        requires=spec.requires,
    )


def task_from_row(row: Row[Any]) -> Task:
    """The snapshot of a row read from ``tasks``."""
    m = row._mapping
    return Task(
        id=m["id"],
        tenant=m["tenant"],
        workload=m["workload"],
        params=m["params"] or {},
        priority=m["priority"],
        state=TaskState(m["state"]),
        attempt=m["attempt"],
        inputs=tuple(_meta_from_json(d) for d in m["inputs"]),
        outputs=tuple(_meta_from_json(d) for d in m["outputs"] or ()),
        input_bytes=m["input_bytes"],
        output_bytes=m["output_bytes"],
        created_at=m["created_at"],
        seq=m["seq"],
        request_id=m["request_id"],
        agent_id=m["agent_id"],
        gpu_type=m["gpu_type"],
        compute_seconds=m["compute_seconds"],
        error_code=FailureCode.parse(m["error_code"]),
        error_message=m["error_message"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        deadline_at=m["deadline_at"],
        inline_inputs=m["inline_inputs"],
        inline_outputs=m["inline_outputs"],
        call_bound=m["call_bound"],
        requires=GpuRequirement(m["requires_gpu_type"], m["requires_gpu_memory"] or 0),
        model_load_seconds=m["model_load_seconds"],
        batch_tasks=m["batch_tasks"],
    )
