"""initial schema: tasks, usage, workloads

Revision ID: 0001
Revises:
Create Date: 2026-11-24 16:22:58.177060
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import gpubroker.billing.models

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "tasks",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("workload", sa.String(length=128), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("agent_id", sa.String(length=128), nullable=True),
        sa.Column("gpu_type", sa.String(length=64), nullable=True),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column("outputs", sa.JSON(), nullable=True),
        sa.Column("input_bytes", sa.BigInteger(), nullable=False),
        sa.Column("inline_inputs", sa.LargeBinary(), nullable=True),
        sa.Column("inline_outputs", sa.LargeBinary(), nullable=True),
        sa.Column("output_bytes", sa.BigInteger(), nullable=False),
        sa.Column("compute_seconds", sa.Float(), nullable=True),
        sa.Column("error_code", sa.String(length=32), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", gpubroker.billing.models.UtcDateTime(), nullable=False),
        sa.Column("started_at", gpubroker.billing.models.UtcDateTime(), nullable=True),
        sa.Column("finished_at", gpubroker.billing.models.UtcDateTime(), nullable=True),
        sa.Column("deadline_at", gpubroker.billing.models.UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id"),
        sa.UniqueConstraint("tenant", "request_id", name="uq_tasks_tenant_request_id"),
    )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index("ix_tasks_state_seq", ["state", "seq"], unique=False)
        batch_op.create_index("ix_tasks_tenant_seq", ["tenant", "seq"], unique=False)

    op.create_table(
        "usage",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task_id", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("workload", sa.String(length=128), nullable=False),
        sa.Column("agent_id", sa.String(length=128), nullable=False),
        sa.Column("gpu_type", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("queue_wait_seconds", sa.Float(), nullable=False),
        sa.Column("compute_seconds", sa.Float(), nullable=False),
        sa.Column("bytes_in", sa.BigInteger(), nullable=False),
        sa.Column("bytes_out", sa.BigInteger(), nullable=False),
        sa.Column("price_per_hour_nanousd", sa.BigInteger(), nullable=False),
        sa.Column("cost_nanousd", sa.BigInteger(), nullable=False),
        sa.Column("price_version", sa.String(length=32), nullable=False),
        sa.Column("created_at", gpubroker.billing.models.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("task_id"),
    )
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.create_index("ix_usage_tenant_created_at", ["tenant", "created_at"], unique=False)

    op.create_table(
        "workloads",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("first_seen_at", gpubroker.billing.models.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:

    op.drop_table("workloads")
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_tenant_created_at")

    op.drop_table("usage")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_tenant_seq")
        batch_op.drop_index("ix_tasks_state_seq")

    op.drop_table("tasks")
