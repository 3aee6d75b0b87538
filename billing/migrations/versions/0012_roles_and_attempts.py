"""API keys get a role (tenant or operator); task_attempts keeps which agent ran each attempt

Revision ID: 0012
Revises: 0011
Create Date: 2027-01-05 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gpubroker.billing.models import UtcDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("role", sa.String(16), nullable=False, server_default="tenant")
        )
    op.create_table(
        "task_attempts",
        sa.Column("task_id", sa.String(32), primary_key=True),
        sa.Column("attempt", sa.Integer(), primary_key=True),
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("gpu_type", sa.String(64), nullable=False),
        sa.Column("started_at", UtcDateTime(), nullable=False),
        sa.Column("ended_at", UtcDateTime(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("task_attempts")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("role")
