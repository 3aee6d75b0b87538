"""monthly budgets per tenant

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 16:37:19.538858
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import gpubroker.billing.models

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "budgets",
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("monthly_limit_nanousd", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", gpubroker.billing.models.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant"),
    )


def downgrade() -> None:

    op.drop_table("budgets")
