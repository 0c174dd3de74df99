"""The pipeline's tables, with seed 004's names, columns, states and indexes,
so that the seed's SQL playbook runs unchanged on PostgreSQL.

Types are portable: ``jsonb`` and ``timestamptz`` on PostgreSQL, JSON text
and ISO timestamps on SQLite; ``bigserial`` keys are SQLite's integer rowid.
The migration (``migrations/versions``) creates exactly these tables; a test
compares the two.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

#: ``bigserial`` on PostgreSQL, the rowid on SQLite
Id = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")
Ts = DateTime(timezone=True)

ERROR_MAX = 1000

#: the outboxes' status indexes hold the rows still to be sent only
OPEN = text("status IN ('PENDING', 'FAILED')")

user_activity_event = Table(
    "user_activity_event",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False, unique=True),
    Column("event_name", String(100), nullable=False),
    Column("event_version", String(20), nullable=False),
    Column("occurred_at", Ts, nullable=False),
    Column("member_id", BigInteger),
    Column("anonymous_id", String(100)),
    Column("session_id", String(100)),
    Column("source", String(20), nullable=False),
    Column("request_path", String(500)),
    Column("request_method", String(10)),
    Column("device_id", String(100)),
    Column("platform", String(30)),
    Column("app_version", String(30)),
    Column("locale", String(20)),
    Column("properties", Json, nullable=False, server_default=text("'{}'")),
    Column("created_at", Ts, nullable=False, server_default=func.now()),
    # a member id that is not a bigint (estat's; migration 0006)
    Column("member_key", String(255)),
    Index("idx_user_activity_event_member_occurred", "member_id", text("occurred_at DESC")),
    Index(
        "idx_user_activity_event_member_key_occurred",
        "member_key",
        text("occurred_at DESC"),
        postgresql_where=text("member_key IS NOT NULL"),
        sqlite_where=text("member_key IS NOT NULL"),
    ),
    Index("idx_user_activity_event_name_occurred", "event_name", text("occurred_at DESC")),
    Index("idx_user_activity_event_occurred", text("occurred_at DESC")),
)

user_activity_source_outbox = Table(
    "user_activity_source_outbox",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False, unique=True),
    Column("event_name", String(100), nullable=False),
    Column("event_version", String(20), nullable=False),
    Column("occurred_at", Ts, nullable=False),
    Column("member_id", BigInteger),
    Column("payload", Json, nullable=False),
    Column("status", String(20), nullable=False),
    Column("retry_count", Integer, nullable=False, server_default=text("0")),
    Column("next_retry_at", Ts),
    Column("last_error", String(ERROR_MAX)),
    Column("published_at", Ts),
    Column("created_at", Ts, nullable=False, server_default=func.now()),
    Column("updated_at", Ts, nullable=False, server_default=func.now()),
    Index(
        "idx_user_activity_source_outbox_status_retry",
        "status",
        "next_retry_at",
        "id",
        postgresql_where=OPEN,
        sqlite_where=OPEN,
    ),
    Index("idx_user_activity_source_outbox_created", "created_at", "id"),
)

user_activity_dispatch_outbox = Table(
    "user_activity_dispatch_outbox",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False),
    Column("dispatch_target", String(30), nullable=False),
    Column("payload", Json, nullable=False),
    Column("status", String(20), nullable=False),
    Column("retry_count", Integer, nullable=False, server_default=text("0")),
    Column("next_retry_at", Ts),
    Column("last_error", String(ERROR_MAX)),
    Column("dispatched_at", Ts),
    Column("created_at", Ts, nullable=False, server_default=func.now()),
    Column("updated_at", Ts, nullable=False, server_default=func.now()),
    UniqueConstraint(
        "event_id", "dispatch_target", name="uk_user_activity_dispatch_outbox_event_target"
    ),
    Index(
        "idx_user_activity_dispatch_outbox_status_retry",
        "status",
        "next_retry_at",
        "id",
        postgresql_where=OPEN,
        sqlite_where=OPEN,
    ),
    Index(
        "idx_user_activity_dispatch_outbox_target_status",
        "dispatch_target",
        "status",
        "id",
        postgresql_where=OPEN,
        sqlite_where=OPEN,
    ),
)

message_queue_trace_log = Table(
    "message_queue_trace_log",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("message_id", String(64), nullable=False),
    Column("topic", String(200), nullable=False),
    Column("provider", String(30), nullable=False),
    Column("message_key", String(200)),
    Column("consumer_group", String(100)),
    Column("stage", String(30), nullable=False),
    Column("processing_millis", BigInteger),
    Column("error_message", String(ERROR_MAX)),
    Column("created_at", Ts, nullable=False, server_default=func.now()),
    Index("idx_message_queue_trace_log_message", "message_id", text("id DESC")),
    Index("idx_message_queue_trace_log_topic_stage", "topic", "stage", text("id DESC")),
)

#: every call of the admin API, refused ones included (never the token)
admin_audit_log = Table(
    "admin_audit_log",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("created_at", Ts, nullable=False, server_default=func.now()),
    Column("token_name", String(64)),
    Column("client", String(100), nullable=False),
    Column("method", String(10), nullable=False),
    Column("route", String(200), nullable=False),
    Column("parameters", Json, nullable=False),
    Column("status", Integer, nullable=False),
    Column("effect", Json),
    Index("idx_admin_audit_log_created", "created_at", "id"),
)

#: workers an operator paused (admin API); every process follows it
estat_worker_state = Table(
    "estat_worker_state",
    metadata,
    Column("name", String(50), primary_key=True),
    Column("paused", Boolean, nullable=False),
    Column("updated_at", Ts, nullable=False, server_default=func.now()),
    Column("updated_by", String(64)),
)

#: the dispatcher's circuit breaker per target, shared by every dispatcher
#: process (``store/circuit.py``); times are epoch seconds
estat_dispatch_circuit = Table(
    "estat_dispatch_circuit",
    metadata,
    Column("target", String(30), primary_key=True),
    Column("state", String(10), nullable=False),
    Column("failures", Integer, nullable=False),
    Column("opened_until", Float, nullable=False),
    Column("open_for", Float, nullable=False),
    Column("probe_until", Float),
    Column("version", BigInteger, nullable=False),
    Column("updated_at", Ts, nullable=False, server_default=func.now()),
)

#: the completeness ledger: events per dataset, partition hour and stage,
#: added to by every process (``store/ledger.py``)
estat_ledger = Table(
    "estat_ledger",
    metadata,
    Column("dataset", String(200), primary_key=True),
    Column("hour", Ts, primary_key=True),
    Column("stage", String(60), primary_key=True),
    Column("events", BigInteger, nullable=False),
    Column("updated_at", Ts, nullable=False, server_default=func.now()),
)

#: every lake object stored, for its hour's manifest
estat_lake_objects = Table(
    "estat_lake_objects",
    metadata,
    Column("key", String(500), primary_key=True),
    Column("dataset", String(200), nullable=False),
    Column("hour", Ts, nullable=False),
    Column("events", BigInteger, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("stored_at", Ts, nullable=False, server_default=func.now()),
    Index("idx_estat_lake_objects_hour", "dataset", "hour"),
)

#: the manifests written (or being written: a claim) per dataset and hour
estat_manifests = Table(
    "estat_manifests",
    metadata,
    Column("dataset", String(200), primary_key=True),
    Column("hour", Ts, primary_key=True),
    Column("key", String(500), nullable=False),
    Column("written_at", Ts),
)
