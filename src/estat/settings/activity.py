"""The fields of the user-activity pipeline (seed 004): database, bus,
publisher, relay, store consumer, trace log, server events (the dispatcher's
are in ``dispatch.py``). ``Settings``
(``fields.py``) inherits them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings

from estat.settings.values import (
    DatabaseUrl,
    Duration,
    MqPrefix,
    NatsUrl,
    RedisUrl,
    TokenHashes,
    accepts,
)


class ActivityFields(BaseSettings):
    # --- event store ---------------------------------------------------------
    database_url: DatabaseUrl | None = Field(
        None,
        description="Event store database. Default: sqlite:///$DATA_DIR/estat.db (WAL). PostgreSQL: postgresql://user:pass@host:port/db (psycopg 3).",
        json_schema_extra=accepts("sqlite:///path or postgresql://user:pass@host:port/db"),
    )
    database_dead_peer_timeout: Duration = Field(
        30.0,
        ge=2,
        le=600,
        description="PostgreSQL: a database host that stops answering (frozen, unplugged, the old primary after a failover) fails a statement in flight or a pooled connection within about this long (TCP keepalives, tcp_user_timeout), and the stage retries on a new connection; libpq's keepalives_* / tcp_user_timeout in DATABASE_URL win.",
        json_schema_extra=accepts("a duration, 2s to 10m"),
    )
    auto_migrate: bool = Field(
        True,
        description="Migrate the database to this version's schema at start (every role); false: refuse to start on an older schema (run `estat migrate`).",
        json_schema_extra=accepts("true or false"),
    )
    # --- message bus ---------------------------------------------------------
    mq_provider: Literal["memory", "redis-stream", "nats", "none"] = Field(
        "memory",
        description="Message bus between ingest and the event store. memory: in-process (embedded); none: client events go to the lake only.",
        json_schema_extra=accepts("memory, redis-stream, nats or none"),
    )
    mq_redis_url: RedisUrl | None = Field(
        None,
        description="Redis for MQ_PROVIDER=redis-stream.",
        json_schema_extra=accepts("redis://host:port/db"),
    )
    mq_nats_url: NatsUrl | None = Field(
        None,
        description="NATS server (JetStream enabled) for MQ_PROVIDER=nats.",
        json_schema_extra=accepts("nats://host:port"),
    )
    mq_prefix: MqPrefix = Field(
        "estat",
        description="Prefix of the stream: <MQ_PREFIX>:user-activity (Redis), <MQ_PREFIX>.user-activity (NATS).",
        json_schema_extra=accepts("letters, digits, '_' or '-'"),
    )
    mq_consumer_group: MqPrefix = Field(
        "estat-store",
        description="Consumer group (Redis) or durable consumer (NATS) of the store consumers.",
        json_schema_extra=accepts("letters, digits, '_' or '-'"),
    )
    mq_claim_idle: Duration = Field(
        60.0,
        gt=0,
        description="A message unacked this long (its consumer died) goes to another consumer; also the retry delay on Redis.",
        json_schema_extra=accepts("a duration"),
    )
    mq_max_deliveries: int = Field(
        5,
        ge=1,
        le=1000,
        description="Deliveries of a message that cannot be stored before it is parked (<stream>:dlq).",
        json_schema_extra=accepts("an integer from 1 to 1000"),
    )
    mq_memory_capacity: int = Field(
        100_000,
        ge=1,
        description="Messages the in-process bus holds unacked; beyond, publishes fall back to the source outbox.",
        json_schema_extra=accepts("a positive integer"),
    )
    mq_publish_queue_size: int = Field(
        10_000,
        ge=1,
        description="Accepted client events waiting to be published; when full the API answers 503.",
        json_schema_extra=accepts("a positive integer"),
    )
    mq_publish_batch_size: int = Field(
        1000,
        ge=1,
        le=10_000,
        description="Events per bus publish (up to 8 publishes in flight).",
        json_schema_extra=accepts("an integer from 1 to 10000"),
    )
    mq_redis_entry: Literal["batch", "event"] = Field(
        "batch",
        description="Redis Streams entries: batch (one entry per published batch, the events' JSON Lines in its events field; the fast default) or event (one entry per event with seed 004's fields, for other readers of the stream). Both are always read.",
        json_schema_extra=accepts("batch or event"),
    )
    mq_trace: Literal["all", "failures", "off"] = Field(
        "failures",
        description="message_queue_trace_log rows: all (PUBLISH, CONSUME_SUCCESS, CONSUME_FAIL), failures (CONSUME_FAIL) or off.",
        json_schema_extra=accepts("all, failures or off"),
    )
    mq_trace_retention: Duration = Field(
        7 * 86400.0,
        gt=0,
        description="Trace rows older than this are deleted (in bounded batches).",
        json_schema_extra=accepts("a duration"),
    )
    outbox_retention: Duration = Field(
        7 * 86400.0,
        ge=0,
        description="PUBLISHED source outbox rows older than this (by published_at) are deleted, in bounded batches; 0 keeps them. A server event sent again after its row is gone is published again and found a duplicate by the event store.",
        json_schema_extra=accepts("a duration, 0 to keep"),
    )
    dispatch_retention: Duration = Field(
        7 * 86400.0,
        ge=0,
        description="DISPATCHED dispatch outbox rows older than this (by dispatched_at) are deleted, in bounded batches; 0 keeps them.",
        json_schema_extra=accepts("a duration, 0 to keep"),
    )
    audit_retention: Duration = Field(
        90 * 86400.0,
        ge=0,
        description="admin_audit_log rows older than this are deleted, in bounded batches; 0 keeps them.",
        json_schema_extra=accepts("a duration, 0 to keep"),
    )
    ledger_retention: Duration = Field(
        90 * 86400.0,
        ge=0,
        description="Completeness ledger rows (counts, lake objects, manifests written) of hours older than this are deleted; 0 keeps them.",
        json_schema_extra=accepts("a duration, 0 to keep"),
    )
    # --- store consumer and relay -----------------------------------------------
    store_batch_size: int = Field(
        500,
        ge=1,
        le=5000,
        description="Messages the store consumer reads and writes per transaction.",
        json_schema_extra=accepts("an integer from 1 to 5000"),
    )
    outbox_batch_size: int = Field(
        200,
        ge=1,
        le=1000,
        description="Source outbox rows the relay leases and publishes at a time.",
        json_schema_extra=accepts("an integer from 1 to 1000"),
    )
    outbox_poll_interval: Duration = Field(
        1.0,
        gt=0,
        description="How often an idle relay looks for due outbox rows.",
        json_schema_extra=accepts("a duration"),
    )
    outbox_lease: Duration = Field(
        60.0,
        gt=0,
        description="SQLite, and an operator's replay: how long leased source outbox rows stay invisible to other relays (a relay that dies leaves them due after this). On PostgreSQL a relay's lease is its transaction's row locks, gone the moment a relay dies, and ended by the database once idle this long (a relay whose host died or was cut off; a publish slower than this is done again).",
        json_schema_extra=accepts("a duration"),
    )
    outbox_max_attempts: int = Field(
        10,
        ge=1,
        le=1000,
        description="Publish attempts of a source outbox row before it is parked (FAILED, no next retry) until replayed.",
        json_schema_extra=accepts("an integer from 1 to 1000"),
    )
    # --- server events -----------------------------------------------------------
    server_event_tokens: TokenHashes | None = Field(
        None,
        description="Service tokens for POST /api/v1/server-events: name:sha256hex entries (the SHA-256 of each token), comma-separated. Unset: the route answers 403.",
        json_schema_extra=accepts("name:sha256hex,name:sha256hex"),
    )

    @model_validator(mode="after")
    def _bus_url(self) -> ActivityFields:
        if self.mq_provider == "redis-stream" and self.mq_redis_url is None:
            raise ValueError("MQ_PROVIDER=redis-stream needs MQ_REDIS_URL")
        if self.mq_provider == "nats" and self.mq_nats_url is None:
            raise ValueError("MQ_PROVIDER=nats needs MQ_NATS_URL")
        return self

    @property
    def server_tokens(self) -> dict[str, str]:
        """sha256 hex (lower case) → token name."""
        if self.server_event_tokens is None:
            return {}
        out = {}
        for entry in self.server_event_tokens.get_secret_value().split(","):
            if entry.strip():
                name, digest = entry.strip().split(":", 1)
                out[digest.lower()] = name
        return out
