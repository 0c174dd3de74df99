"""User-activity tables of seed 004: event, source outbox, dispatch outbox,
message-queue trace log.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(JSONB(), "postgresql")
Ts = sa.DateTime(timezone=True)


def _id() -> sa.Column[Any]:
    return sa.Column("id", Id, primary_key=True, autoincrement=True)


def _outbox_state(finished: str) -> list[sa.Column[Any]]:
    return [
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("retry_count", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("next_retry_at", Ts),
        sa.Column("last_error", sa.String(1000)),
        sa.Column(finished, Ts),
        sa.Column("created_at", Ts, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", Ts, nullable=False, server_default=sa.func.now()),
    ]


def upgrade() -> None:
    op.create_table(
        "user_activity_event",
        _id(),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("event_name", sa.String(100), nullable=False),
        sa.Column("event_version", sa.String(20), nullable=False),
        sa.Column("occurred_at", Ts, nullable=False),
        sa.Column("member_id", sa.BigInteger),
        sa.Column("anonymous_id", sa.String(100)),
        sa.Column("session_id", sa.String(100)),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("request_path", sa.String(500)),
        sa.Column("request_method", sa.String(10)),
        sa.Column("device_id", sa.String(100)),
        sa.Column("platform", sa.String(30)),
        sa.Column("app_version", sa.String(30)),
        sa.Column("locale", sa.String(20)),
        sa.Column("properties", Json, nullable=False, server_default=sa.text("'{}'")),
        sa.Column("created_at", Ts, nullable=False, server_default=sa.func.now()),
    )
    op.create_index(
        "idx_user_activity_event_member_occurred",
        "user_activity_event",
        ["member_id", sa.text("occurred_at DESC")],
    )
    op.create_index(
        "idx_user_activity_event_name_occurred",
        "user_activity_event",
        ["event_name", sa.text("occurred_at DESC")],
    )
    op.create_index(
        "idx_user_activity_event_occurred", "user_activity_event", [sa.text("occurred_at DESC")]
    )

    op.create_table(
        "user_activity_source_outbox",
        _id(),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("event_name", sa.String(100), nullable=False),
        sa.Column("event_version", sa.String(20), nullable=False),
        sa.Column("occurred_at", Ts, nullable=False),
        sa.Column("member_id", sa.BigInteger),
        sa.Column("payload", Json, nullable=False),
        *_outbox_state("published_at"),
    )
    op.create_index(
        "idx_user_activity_source_outbox_status_retry",
        "user_activity_source_outbox",
        ["status", "next_retry_at", "id"],
    )
    op.create_index(
        "idx_user_activity_source_outbox_created",
        "user_activity_source_outbox",
        ["created_at", "id"],
    )

    op.create_table(
        "user_activity_dispatch_outbox",
        _id(),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("dispatch_target", sa.String(30), nullable=False),
        sa.Column("payload", Json, nullable=False),
        *_outbox_state("dispatched_at"),
        sa.UniqueConstraint(
            "event_id", "dispatch_target", name="uk_user_activity_dispatch_outbox_event_target"
        ),
    )
    op.create_index(
        "idx_user_activity_dispatch_outbox_status_retry",
        "user_activity_dispatch_outbox",
        ["status", "next_retry_at", "id"],
    )
    op.create_index(
        "idx_user_activity_dispatch_outbox_target_status",
        "user_activity_dispatch_outbox",
        ["dispatch_target", "status", "id"],
    )

    op.create_table(
        "message_queue_trace_log",
        _id(),
        sa.Column("message_id", sa.String(64), nullable=False),
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("provider", sa.String(30), nullable=False),
        sa.Column("message_key", sa.String(200)),
        sa.Column("consumer_group", sa.String(100)),
        sa.Column("stage", sa.String(30), nullable=False),
        sa.Column("processing_millis", sa.BigInteger),
        sa.Column("error_message", sa.String(1000)),
        sa.Column("created_at", Ts, nullable=False, server_default=sa.func.now()),
    )
    op.create_index(
        "idx_message_queue_trace_log_message",
        "message_queue_trace_log",
        ["message_id", sa.text("id DESC")],
    )
    op.create_index(
        "idx_message_queue_trace_log_topic_stage",
        "message_queue_trace_log",
        ["topic", "stage", sa.text("id DESC")],
    )


def downgrade() -> None:
    op.drop_table("message_queue_trace_log")
    op.drop_table("user_activity_dispatch_outbox")
    op.drop_table("user_activity_source_outbox")
    op.drop_table("user_activity_event")
