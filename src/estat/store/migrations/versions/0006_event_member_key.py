"""``user_activity_event.member_key``: a member id that is not a ``bigint``
(a JWT ``sub`` such as ``auth0|5f7c…``, a UUID, ``user-abc``), which seed
004's ``member_id bigint`` cannot hold; before, such an event was stored
with no identity at all. Indexed for the rows that have one only: a store
whose member ids are numbers writes no index entry for it.

On PostgreSQL, building the index reads ``user_activity_event`` once while
new events wait (they stay on the bus meanwhile): about a minute per 30 GB.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

KEYED = sa.text("member_key IS NOT NULL")


def upgrade() -> None:
    op.add_column("user_activity_event", sa.Column("member_key", sa.String(255)))
    op.create_index(
        "idx_user_activity_event_member_key_occurred",
        "user_activity_event",
        ["member_key", sa.text("occurred_at DESC")],
        postgresql_where=KEYED,
        sqlite_where=KEYED,
    )


def downgrade() -> None:
    op.drop_index("idx_user_activity_event_member_key_occurred", table_name="user_activity_event")
    op.drop_column("user_activity_event", "member_key")
