"""The dispatcher's circuit breaker state, shared by dispatcher processes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "estat_dispatch_circuit",
        sa.Column("target", sa.String(30), primary_key=True),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("opened_until", sa.Float, nullable=False),
        sa.Column("open_for", sa.Float, nullable=False),
        sa.Column("probe_until", sa.Float),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )


def downgrade() -> None:
    op.drop_table("estat_dispatch_circuit")
