"""Model rows: which tenant holds which model file, with its name and batching options.

Every function runs inside the caller's open transaction on the store's database thread, the
thread task rows are written on too: a delete that counts a model's live tasks and a submit
that checks the model still exists are therefore ordered, never interleaved.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from gpubroker.billing.models import models, tasks
from gpubroker.broker.errors import ModelInUseError, ModelNotFoundError
from gpubroker.broker.model import GpuRequirement, ModelRecord, TaskState
from gpubroker.protos.modelfile import workload_for

__all__ = ["delete", "exists", "insert", "load_all", "record_from_row", "update"]

_LIVE = (TaskState.QUEUED.value, TaskState.RUNNING.value)
_EXISTS = sa.select(sa.literal(1)).where(
    models.c.tenant == sa.bindparam("b_tenant", type_=models.c.tenant.type),
    models.c.model_id == sa.bindparam("b_model_id", type_=models.c.model_id.type),
)


def record_from_row(row: Row[Any]) -> ModelRecord:
    """The domain record of a ``models`` row."""
    m = row._mapping
    return ModelRecord(
        tenant=m["tenant"],
        model_id=m["model_id"],
        name=m["name"],
        size_bytes=m["size_bytes"],
        metadata=m["metadata"],
        created_at=m["created_at"],
        max_batch_size=m["max_batch_size"],
        max_queue_delay_s=m["max_queue_delay_s"],
        requires=GpuRequirement(m["requires_gpu_type"], m["requires_gpu_memory"]),
    )


def _options(record: ModelRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "max_batch_size": record.max_batch_size,
        "max_queue_delay_s": record.max_queue_delay_s,
        "requires_gpu_type": record.requires.gpu_type,
        "requires_gpu_memory": record.requires.min_memory_bytes,
    }


def load_all(conn: Connection) -> list[ModelRecord]:
    """Every tenant's models, oldest first."""
    rows = conn.execute(sa.select(models).order_by(models.c.created_at, models.c.model_id))
    return [record_from_row(row) for row in rows]


def exists(conn: Connection, tenant: str, model_id: str) -> bool:
    """True when ``tenant`` holds ``model_id``."""
    return conn.execute(_EXISTS, {"b_tenant": tenant, "b_model_id": model_id}).first() is not None


def insert(conn: Connection, record: ModelRecord) -> None:
    """Adds a tenant's model (the caller made sure the tenant does not hold it yet)."""
    conn.execute(
        models.insert().values(
            tenant=record.tenant,
            model_id=record.model_id,
            size_bytes=record.size_bytes,
            metadata=dict(record.metadata),
            created_at=record.created_at,
            **_options(record),
        )
    )


def update(conn: Connection, record: ModelRecord) -> None:
    """Writes a held model's name and options; raises ``ModelNotFoundError`` if it is gone."""
    result = conn.execute(
        models.update()
        .where(models.c.tenant == record.tenant, models.c.model_id == record.model_id)
        .values(**_options(record))
    )
    if result.rowcount != 1:
        raise ModelNotFoundError(record.model_id)


def delete(conn: Connection, tenant: str, model_id: str) -> tuple[ModelRecord, bool]:
    """Deletes a tenant's model unless queued or running tasks of the tenant name it.

    Returns the deleted record and whether no tenant's row names the file any more.

    Raises:
        ModelNotFoundError: the tenant holds no such model.
        ModelInUseError: live tasks name it (nothing is deleted).
    """
    row = conn.execute(
        sa.select(models).where(models.c.tenant == tenant, models.c.model_id == model_id)
    ).first()
    if row is None:
        raise ModelNotFoundError(model_id)
    live = conn.execute(
        sa.select(sa.func.count())
        .select_from(tasks)
        .where(
            tasks.c.tenant == tenant,
            tasks.c.workload == workload_for(model_id),
            tasks.c.state.in_(_LIVE),
        )
    ).scalar_one()
    if live:
        raise ModelInUseError(
            f"model {model_id} is named by {live} queued or running task"
            f"{'s' if live != 1 else ''} of yours; cancel them or wait for them to finish, "
            "then delete it"
        )
    conn.execute(models.delete().where(models.c.tenant == tenant, models.c.model_id == model_id))
    others = conn.execute(
        sa.select(sa.func.count()).select_from(models).where(models.c.model_id == model_id)
    ).scalar_one()
    return record_from_row(row), others == 0
