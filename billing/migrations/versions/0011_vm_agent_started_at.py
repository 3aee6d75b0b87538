"""vm_instances record when each machine's agent process started (its install phase's end)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-20 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gpubroker.billing.models import UtcDateTime

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vm_instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("agent_started_at", UtcDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vm_instances", schema=None) as batch_op:
        batch_op.drop_column("agent_started_at")
