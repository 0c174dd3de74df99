"""The completeness ledger: events per dataset, hour and stage; the lake
objects of every hour and the manifests written for complete hours.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "estat_ledger",
        sa.Column("dataset", sa.String(200), primary_key=True),
        sa.Column("hour", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("stage", sa.String(60), primary_key=True),
        sa.Column("events", sa.BigInteger, nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )

    op.create_table(
        "estat_lake_objects",
        sa.Column("key", sa.String(500), primary_key=True),
        sa.Column("dataset", sa.String(200), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("events", sa.BigInteger, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column(
            "stored_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_index("idx_estat_lake_objects_hour", "estat_lake_objects", ["dataset", "hour"])
    op.create_table(
        "estat_manifests",
        sa.Column("dataset", sa.String(200), primary_key=True),
        sa.Column("hour", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("key", sa.String(500), nullable=False),
        sa.Column("written_at", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    op.drop_table("estat_manifests")
    op.drop_table("estat_lake_objects")
    op.drop_table("estat_ledger")
