"""users' models, and the task columns that model tasks and GPU requirements need

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import gpubroker.billing.models

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("max_batch_size", sa.Integer(), nullable=False),
        sa.Column("max_queue_delay_s", sa.Float(), nullable=False),
        sa.Column("requires_gpu_type", sa.String(length=64), nullable=True),
        sa.Column("requires_gpu_memory", sa.BigInteger(), nullable=False),
        sa.Column("created_at", gpubroker.billing.models.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "model_id"),
    )
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.create_index("ix_models_model_id", ["model_id"], unique=False)
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("requires_gpu_type", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("requires_gpu_memory", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("model_load_seconds", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("batch_tasks", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("batch_tasks")
        batch_op.drop_column("model_load_seconds")
        batch_op.drop_column("requires_gpu_memory")
        batch_op.drop_column("requires_gpu_type")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_index("ix_models_model_id")
    op.drop_table("models")
