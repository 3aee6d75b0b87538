"""The SQL schema: the task queue, the usage ledger, VM uptime and API keys, in one ``MetaData``.

The queue and the ledger live in one database so that marking a task succeeded and writing its
usage row happen in one transaction (exactly-once billing). SQLAlchemy Core tables, not ORM
classes: the queue is a hot path and Core statements cost a fraction of an ORM flush.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.types import TypeDecorator

__all__ = [
    "UtcDateTime",
    "api_keys",
    "budgets",
    "metadata",
    "models",
    "spools",
    "task_attempts",
    "tasks",
    "tenants",
    "usage",
    "vm_instances",
    "workloads",
]


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores it naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}; pass an aware UTC datetime")
        return (
            value.astimezone(UTC)
            if dialect.name != "sqlite"
            else value.astimezone(UTC).replace(tzinfo=None)
        )

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

tasks = Table(
    "tasks",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(32), nullable=False, unique=True),
    Column("tenant", String(64), nullable=False),
    Column("request_id", String(128), nullable=True),
    Column("workload", String(128), nullable=False),
    Column("params", JSON, nullable=False),
    Column("priority", Integer, nullable=False, default=0),
    Column("state", String(16), nullable=False),
    Column("attempt", Integer, nullable=False, default=0),
    Column("agent_id", String(128), nullable=True),
    Column("gpu_type", String(64), nullable=True),
    Column("inputs", JSON, nullable=False),
    Column("outputs", JSON, nullable=True),
    Column("input_bytes", BigInteger, nullable=False),
    Column("inline_inputs", LargeBinary, nullable=True),
    Column("inline_outputs", LargeBinary, nullable=True),
    Column("output_bytes", BigInteger, nullable=False, default=0),
    Column("compute_seconds", Float, nullable=True),
    Column("error_code", String(32), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("started_at", UtcDateTime, nullable=True),
    Column("finished_at", UtcDateTime, nullable=True),
    Column("deadline_at", UtcDateTime, nullable=True),
    # Created by Run or RunMany: the task lives as long as its call (see broker.tasks).
    Column("call_bound", Boolean, nullable=False, default=False, server_default=false()),
    # Where the task may run (GpuRequirement): an exact GPU type and/or least device memory.
    Column("requires_gpu_type", String(64), nullable=True),
    Column("requires_gpu_memory", BigInteger, nullable=False, default=0, server_default="0"),
    # A model task's success: its model's load time (never billed) and its batch's size.
    Column("model_load_seconds", Float, nullable=True),
    Column("batch_tasks", Integer, nullable=True),
    # When the retention sweep deleted the task's outputs (spool file and inline bytes).
    Column("outputs_expired_at", UtcDateTime, nullable=True),
    # Attempts lost to infrastructure (agent crash or silence, drain, broker restart), counted
    # apart from those the task's own outcome used up (``broker.storage.transitions.requeue``).
    Column("lost_attempts", Integer, nullable=False, server_default="0"),
    UniqueConstraint("tenant", "request_id", name="uq_tasks_tenant_request_id"),
    Index("ix_tasks_state_seq", "state", "seq"),
    Index("ix_tasks_tenant_seq", "tenant", "seq"),
    # The deadline sweep runs every second; without this it scans every queued task.
    Index("ix_tasks_deadline_at", "deadline_at"),
    # The retention sweep looks for final tasks whose outputs have not expired yet.
    Index("ix_tasks_outputs_expiry", "outputs_expired_at", "finished_at"),
)
"""One row per task; ``attempt`` fences results from agents that lost their lease.

Payloads of at most 64 KiB live in ``inline_inputs``/``inline_outputs``; larger ones are files
in the broker's spool.
"""

usage = Table(
    "usage",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task_id", String(32), nullable=False, unique=True),
    Column("tenant", String(64), nullable=False),
    Column("workload", String(128), nullable=False),
    Column("agent_id", String(128), nullable=False),
    Column("gpu_type", String(64), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("queue_wait_seconds", Float, nullable=False),
    Column("compute_seconds", Float, nullable=False),
    Column("bytes_in", BigInteger, nullable=False),
    Column("bytes_out", BigInteger, nullable=False),
    Column("price_per_hour_nanousd", BigInteger, nullable=False),
    Column("cost_nanousd", BigInteger, nullable=False),
    Column("price_version", String(32), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_usage_tenant_created_at", "tenant", "created_at"),
)
"""One row per successful task attempt; ``task_id`` is unique so nothing is billed twice.

Money is stored as whole nano-dollars (1e-9 USD) in integers: exact on every backend.
"""

workloads = Table(
    "workloads",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("first_seen_at", UtcDateTime, nullable=False),
)
"""Workload names that some agent has advertised; submits of other names are refused."""

budgets = Table(
    "budgets",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("monthly_limit_nanousd", BigInteger, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)
"""A tenant's monthly spending limit; submits are refused once the month's spend reaches it."""

vm_instances = Table(
    "vm_instances",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("provider", String(16), nullable=False),
    Column("zone", String(64), nullable=False),
    Column("gpu_type", String(64), nullable=False),
    Column("machine_type", String(64), nullable=False),
    Column("spot", Boolean, nullable=False),
    Column("price_per_hour_nanousd", BigInteger, nullable=False),
    Column("price_version", String(32), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("running_at", UtcDateTime, nullable=True),
    Column("deleted_at", UtcDateTime, nullable=True),
    Column("end_reason", String(32), nullable=True),
    # When its agent first connected: RUNNING to this is the machine's boot time.
    Column("connected_at", UtcDateTime, nullable=True),
    # When the process of that agent started (the end of the install phase), as the agent
    # reported it; NULL for agents that do not.
    Column("agent_started_at", UtcDateTime, nullable=True),
)
"""One row per agent machine a provider started (``local`` or ``gce``), for its uptime cost.

``name`` is the instance name, unique among the machines this broker ever started. The price
is the whole machine's (GPU plus host) when it was created, so later catalog changes do not
reprice it. ``deleted_at`` and ``end_reason`` stay NULL while the machine lives.
"""

tenants = Table(
    "tenants",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("disabled_at", UtcDateTime, nullable=True),
)
"""Tenants made with ``python -m gpubroker.broker.admin``; a disabled tenant's keys are all refused.

Tenants named only in the broker's settings (``--api-keys``) need no row here.
"""

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(16), primary_key=True),
    Column("tenant", String(64), ForeignKey("tenants.name"), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("label", String(128), nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("revoked_at", UtcDateTime, nullable=True),
    # ``tenant`` (its own tasks, models and spend) or ``operator`` (also the whole broker's
    # status); see ``gpubroker.broker.access.roles``.
    Column("role", String(16), nullable=False, server_default="tenant"),
    Index("ix_api_keys_tenant", "tenant"),
)
"""One row per API key ``gpb_<key_id>_<secret>``: the key's id and the SHA-256 of its secret.

The key itself is never stored. ``revoked_at`` may lie in the future: a rotated key keeps
working until its grace period ends. Rows are never deleted, so a revoked key id is never reused.
"""

task_attempts = Table(
    "task_attempts",
    metadata,
    Column("task_id", String(32), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("agent_id", String(128), nullable=False),
    Column("gpu_type", String(64), nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("ended_at", UtcDateTime, nullable=True),
    # Set when the attempt went back to the queue: ``lost``, ``rejected`` or ``recalled``.
    Column("outcome", String(16), nullable=True),
    Column("detail", Text, nullable=True),
)
"""One row per claim of a task: which agent ran each attempt (``TaskInfo.attempts``).

A row is written when its attempt is claimed, and ended here only when the attempt went back
to the queue. The task's last attempt ends with the task: its end and outcome are the task
row's ``finished_at`` and state, so a success writes nothing more here. An agent's id is its
machine's name when a provider started it (``vm_instances.name``).
"""

models = Table(
    "models",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("model_id", String(64), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("max_batch_size", Integer, nullable=False, default=0),
    Column("max_queue_delay_s", Float, nullable=False, default=0.0),
    Column("requires_gpu_type", String(64), nullable=True),
    Column("requires_gpu_memory", BigInteger, nullable=False, default=0),
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_models_model_id", "model_id"),
)
"""One row per model a tenant holds: the tenant holds the file whose sha256 is ``model_id``.

Two tenants that upload the same bytes get a row each and share one file in the broker's model
directory, deleted with the last row that names it (``ix_models_model_id`` finds the others).
"""

spools = Table(
    "spools",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("spool_id", String(32), nullable=False),
    Column("path", Text, nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
)
"""The spool directories the broker has run with, one row each time it changed.

``spool_id`` is the id in the directory's marker file; the directory in use at a time is the
last row started before it, so a missing payload can say which directory held it.
"""
