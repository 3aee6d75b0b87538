"""results expire: tasks remember when their outputs were deleted; spool directories' history

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-10 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import gpubroker.billing.models

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("outputs_expired_at", gpubroker.billing.models.UtcDateTime(), nullable=True)
        )
        batch_op.create_index(
            "ix_tasks_outputs_expiry", ["outputs_expired_at", "finished_at"], unique=False
        )
    op.create_table(
        "spools",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("spool_id", sa.String(length=32), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("started_at", gpubroker.billing.models.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )


def downgrade() -> None:
    op.drop_table("spools")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_outputs_expiry")
        batch_op.drop_column("outputs_expired_at")
