"""The admin API's audit log and the workers' pause state.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(JSONB(), "postgresql")
Ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "admin_audit_log",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("created_at", Ts, nullable=False, server_default=sa.func.now()),
        sa.Column("token_name", sa.String(64)),
        sa.Column("client", sa.String(100), nullable=False),
        sa.Column("method", sa.String(10), nullable=False),
        sa.Column("route", sa.String(200), nullable=False),
        sa.Column("parameters", Json, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("effect", Json),
    )
    op.create_index("idx_admin_audit_log_created", "admin_audit_log", ["created_at", "id"])
    op.create_table(
        "estat_worker_state",
        sa.Column("name", sa.String(50), primary_key=True),
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("updated_at", Ts, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_by", sa.String(64)),
    )


def downgrade() -> None:
    op.drop_table("estat_worker_state")
    op.drop_table("admin_audit_log")
