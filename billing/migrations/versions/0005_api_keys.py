"""tenants and hashed api keys

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 09:41:05.117342
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import gpubroker.billing.models

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "tenants",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", gpubroker.billing.models.UtcDateTime(), nullable=False),
        sa.Column("disabled_at", gpubroker.billing.models.UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=128), nullable=True),
        sa.Column("created_at", gpubroker.billing.models.UtcDateTime(), nullable=False),
        sa.Column("revoked_at", gpubroker.billing.models.UtcDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["tenant"], ["tenants.name"]),
        sa.PrimaryKeyConstraint("key_id"),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index("ix_api_keys_tenant", ["tenant"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index("ix_api_keys_tenant")

    op.drop_table("api_keys")
    op.drop_table("tenants")
