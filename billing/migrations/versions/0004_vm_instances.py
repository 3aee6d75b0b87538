"""vm uptime: vm_instances

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 10:12:41.503218
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import gpubroker.billing.models

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "vm_instances",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("zone", sa.String(length=64), nullable=False),
        sa.Column("gpu_type", sa.String(length=64), nullable=False),
        sa.Column("machine_type", sa.String(length=64), nullable=False),
        sa.Column("spot", sa.Boolean(), nullable=False),
        sa.Column("price_per_hour_nanousd", sa.BigInteger(), nullable=False),
        sa.Column("price_version", sa.String(length=32), nullable=False),
        sa.Column("created_at", gpubroker.billing.models.UtcDateTime(), nullable=False),
        sa.Column("running_at", gpubroker.billing.models.UtcDateTime(), nullable=True),
        sa.Column("deleted_at", gpubroker.billing.models.UtcDateTime(), nullable=True),
        sa.Column("end_reason", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:

    op.drop_table("vm_instances")
