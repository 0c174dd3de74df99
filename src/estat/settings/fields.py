"""The fields of ``Settings``, grouped by the stage they configure, with their
defaults, limits, descriptions and validators. The collector's variable
names and defaults are a contract (upper case, no prefix)."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from estat.settings.activity import ActivityFields
from estat.settings.admin import AdminFields
from estat.settings.dispatch import DispatchFields
from estat.settings.values import (
    DEFAULT_ALLOWLIST,
    Address,
    BucketName,
    Duration,
    EndpointUrl,
    InstanceId,
    KeyPrefix,
    Origins,
    PemPublicKey,
    RedisUrl,
    TimeZone,
    accepts,
    default_instance_id,
    parse_addr,
)

#: the environment ``load_settings(env=...)`` reads instead of the process's
INJECTED_ENV: ContextVar[Mapping[str, str] | None] = ContextVar("estat_env", default=None)


class _MappingSource(EnvSettingsSource):
    """Environment variables from an injected mapping (tests, tools)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env = INJECTED_ENV.get() or {}
        return parse_env_vars(
            env, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


class Settings(ActivityFields, DispatchFields, AdminFields):
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if INJECTED_ENV.get() is not None:  # only the mapping: no process environment, no .env
            return (init_settings, _MappingSource(settings_cls))
        return (init_settings, env_settings, dotenv_settings, file_secret_settings)

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        case_sensitive=False,
        validate_default=True,
    )

    # --- object store ------------------------------------------------------
    aws_region: str | None = Field(
        None, description="S3 region (S3 mode).", json_schema_extra=accepts("a region name")
    )
    raw_bucket: BucketName | None = Field(
        None,
        description="Bucket of the raw data lake. Unset: the embedded local lake under LAKE_DIR.",
        json_schema_extra=accepts("a bucket name"),
    )
    raw_prefix: KeyPrefix = Field(
        "raw", description="Key prefix of good data.", json_schema_extra=accepts("a key prefix")
    )
    dlq_prefix: KeyPrefix = Field(
        "raw_dlq",
        description="Key prefix for data that cannot be encoded or validated (quarantine).",
        json_schema_extra=accepts("a key prefix"),
    )
    s3_endpoint_url: EndpointUrl | None = Field(
        None,
        validation_alias=AliasChoices("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
        description="S3-compatible endpoint (MinIO, Ceph, moto...). AWS_ENDPOINT_URL is honoured too.",
        json_schema_extra=accepts("an http:// or https:// URL"),
    )
    s3_timeout: Duration = Field(
        3.0, description="Timeout of one upload attempt.", json_schema_extra=accepts("a duration")
    )
    s3_app_retries: int = Field(
        2,
        ge=0,
        le=100,
        description="Application-level retries of an upload (SDK retries are off).",
        json_schema_extra=accepts("an integer from 0 to 100"),
    )
    lake_failure_threshold: int = Field(
        5,
        ge=1,
        le=1000,
        description="Consecutive failed upload attempts after which the lake is marked failing: new batches go straight to the DLQ and one probe upload tests the lake.",
        json_schema_extra=accepts("an integer from 1 to 1000"),
    )
    lake_probe_interval: Duration = Field(
        5.0,
        gt=0,
        description="Wait before the first probe upload once the lake is marked failing; doubles after each failed probe, up to LAKE_PROBE_MAX_INTERVAL.",
        json_schema_extra=accepts("a duration"),
    )
    lake_probe_max_interval: Duration = Field(
        60.0,
        gt=0,
        description="Longest wait between probe uploads while the lake is failing.",
        json_schema_extra=accepts("a duration"),
    )
    lake_startup_check: Literal["warn", "require"] = Field(
        "warn",
        description="At start, one bounded request checks the lake (bucket or directory). warn: log and report it in /ready and lake_healthy, and start anyway (the DLQ absorbs); require: exit with status 2 when the check fails.",
        json_schema_extra=accepts("warn or require"),
    )
    partition_tz: TimeZone = Field(
        "UTC",
        description="Time zone of the dt=/hr= partitions of object keys.",
        json_schema_extra=accepts("an IANA time zone such as UTC or Asia/Seoul"),
    )
    completeness_grace: Duration = Field(
        900.0,
        gt=0,
        description="How long after a lake partition hour closes its late batches may still arrive (the batch age, upload retries, the DLQ's replay); after it, events accepted for the hour and not in the lake are a completeness gap (completeness_gap_events).",
        json_schema_extra=accepts("a duration"),
    )

    # --- HTTP --------------------------------------------------------------
    http_addr: Address = Field(
        ":8080",
        description="Ingest listener address, host:port (empty host: all interfaces).",
        json_schema_extra=accepts("host:port, e.g. :8080 or 127.0.0.1:8080"),
    )
    max_body_size: int = Field(
        16384,
        gt=0,
        description="Largest /collect request body in bytes; larger gets 413.",
        json_schema_extra=accepts("a positive integer"),
    )
    http_max_header_size: int = Field(
        16384,
        ge=1024,
        description="Largest request line plus headers in bytes; larger gets 431.",
        json_schema_extra=accepts("an integer >= 1024"),
    )
    max_connections: int = Field(
        0,
        ge=0,
        description="Open connections per worker; above it the oldest idle keep-alive connection is closed (or the new one, when every connection is busy). 0: three quarters of the open-file limit (raised to its hard limit at start), less a reserve for the lake, the DLQ and logs.",
        json_schema_extra=accepts("0 or a positive integer"),
    )
    http_header_timeout: Duration = Field(
        10.0,
        gt=0,
        description="Time a client has to send a request's headers, from accepting the connection or from the previous answer; then 408 (or a quiet close when nothing was sent).",
        json_schema_extra=accepts("a duration"),
    )
    http_body_timeout: Duration = Field(
        30.0,
        gt=0,
        description="Time a client has to send a request's body; then 408.",
        json_schema_extra=accepts("a duration"),
    )
    http_keepalive_timeout: Duration = Field(
        75.0,
        gt=0,
        description="Idle keep-alive connections are closed after this (keep above your load balancer's idle timeout).",
        json_schema_extra=accepts("a duration"),
    )

    # --- pipeline ----------------------------------------------------------
    channel_size: int = Field(
        4000,
        gt=0,
        description="Event queue capacity in events; full gets 503 with Retry-After.",
        json_schema_extra=accepts("a positive integer"),
    )
    channel_max_bytes: int = Field(
        64 * 1024 * 1024,
        gt=0,
        description="Event queue capacity in bytes of serialised records; full gets 503.",
        json_schema_extra=accepts("a positive integer"),
    )
    batch_size: int = Field(
        5000,
        gt=0,
        description="Events per object.",
        json_schema_extra=accepts("a positive integer"),
    )
    batch_max_bytes: int = Field(
        32 * 1024 * 1024,
        gt=0,
        description="Uncompressed bytes per object; a batch is cut when the next record would pass it.",
        json_schema_extra=accepts("a positive integer"),
    )
    flush_interval: Duration = Field(
        120.0,
        gt=0,
        description="Maximum age of a batch (from its first event) before it is cut.",
        json_schema_extra=accepts("a duration"),
    )
    upload_queue: int = Field(
        4,
        gt=0,
        description="Batches waiting for upload; when full, the event queue backs up.",
        json_schema_extra=accepts("a positive integer"),
    )
    upload_concurrency: int = Field(
        4,
        gt=0,
        le=64,
        description="Uploads in flight at once per process.",
        json_schema_extra=accepts("an integer from 1 to 64"),
    )

    # --- client event API ------------------------------------------------------
    events_prefix: KeyPrefix = Field(
        "events",
        description="Key prefix of the client events dataset (POST /api/v1/analytics/events).",
        json_schema_extra=accepts("a key prefix"),
    )
    events_channel_size: int = Field(
        50_000,
        gt=0,
        description="Event queue capacity of the client events dataset, in events (requests carry up to ANALYTICS_MAX_BATCH_SIZE each).",
        json_schema_extra=accepts("a positive integer"),
    )
    analytics_max_batch_size: int = Field(
        50,
        gt=0,
        le=10000,
        description="Most events in one request; more gets 400 ANALYTICS_INGEST_BATCH_LIMIT_EXCEEDED.",
        json_schema_extra=accepts("an integer from 1 to 10000"),
    )
    analytics_allowlist: str = Field(
        ",".join(DEFAULT_ALLOWLIST),
        description="Comma-separated event names accepted; `*` accepts every name.",
        json_schema_extra=accepts("event names separated by commas, or *"),
    )
    analytics_max_body_size: int = Field(
        1024 * 1024,
        gt=0,
        description="Largest request body on the wire (compressed or not); larger gets 413.",
        json_schema_extra=accepts("a positive integer"),
    )
    analytics_max_decompressed_size: int = Field(
        4 * 1024 * 1024,
        gt=0,
        description="Largest body after Content-Encoding: gzip is undone; larger gets 413.",
        json_schema_extra=accepts("a positive integer"),
    )
    analytics_max_compression_ratio: int = Field(
        100,
        gt=1,
        description="Largest decompressed/compressed ratio of a gzip body (bomb guard); larger gets 413.",
        json_schema_extra=accepts("an integer > 1"),
    )
    analytics_max_event_size: int = Field(
        32 * 1024,
        gt=0,
        description="Largest serialised properties of one event in bytes; larger gets 400.",
        json_schema_extra=accepts("a positive integer"),
    )
    analytics_max_properties_depth: int = Field(
        8,
        gt=0,
        le=64,
        description="Deepest nesting of objects and arrays inside properties; deeper gets 400.",
        json_schema_extra=accepts("an integer from 1 to 64"),
    )
    analytics_rate_limit_max_requests: int = Field(
        120,
        gt=0,
        description="Requests allowed per identity (member or anonymous id) per window.",
        json_schema_extra=accepts("a positive integer"),
    )
    analytics_rate_limit_window: Duration = Field(
        60.0, gt=0, description="Rate-limit window.", json_schema_extra=accepts("a duration")
    )
    rate_limit_redis_url: RedisUrl | None = Field(
        None,
        description="Redis shared by every replica for rate limits. Unset: the workers of one server share one in-memory limit (kept by the supervisor process).",
        json_schema_extra=accepts("redis://host:port/db"),
    )
    auth_jwt_secret: SecretStr | None = Field(
        None,
        description="HS256 secret verifying `Authorization: Bearer` tokens (claim sub is the member id).",
        json_schema_extra=accepts("a secret string"),
    )
    auth_jwt_public_key: PemPublicKey | None = Field(
        None,
        description="PEM public key verifying RS256/ES256 bearer tokens (instead of AUTH_JWT_SECRET).",
        json_schema_extra=accepts("a PEM public key"),
    )
    cors_allow_origins: Origins = Field(
        "*",
        description="Origins allowed to send events from browsers (comma-separated, or *); no credentials.",
        json_schema_extra=accepts("* or origins separated by commas"),
    )

    # --- local storage -----------------------------------------------------
    data_dir: Path = Field(
        Path("./data"),
        description="Root of the embedded defaults.",
        json_schema_extra=accepts("a directory path"),
    )
    lake_dir: Path | None = Field(
        None,
        description="Local lake directory used when RAW_BUCKET is unset. Default: $DATA_DIR/lake.",
        json_schema_extra=accepts("a directory path"),
    )
    dlq_dir: Path | None = Field(
        None,
        description="Local dead-letter queue directory. Default: $DATA_DIR/dlq.",
        json_schema_extra=accepts("a directory path"),
    )
    dlq_max_age: Duration = Field(
        86400.0,
        gt=0,
        description="DLQ file time to live.",
        json_schema_extra=accepts("a duration"),
    )
    dlq_max_size_bytes: int = Field(
        19327352832,
        gt=0,
        description="DLQ capacity in bytes.",
        json_schema_extra=accepts("a positive integer"),
    )

    # --- process -----------------------------------------------------------
    instance_id: InstanceId = Field(
        default_factory=default_instance_id,
        description="Name of this instance in object keys. Default: host name plus a random suffix per start; each worker appends -w<N>.",
        json_schema_extra=accepts("letters, digits, '.', '-'"),
    )
    shutdown_timeout: Duration = Field(
        25.0,
        gt=0,
        description="Bound on the graceful drain after SIGTERM/SIGINT.",
        json_schema_extra=accepts("a duration"),
    )
    deploy_env: str = Field(
        "local",
        description="Deployment name written in every log line's env field.",
        json_schema_extra=accepts("any short name, e.g. prod"),
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info",
        description="Lowest level logged.",
        json_schema_extra=accepts("debug, info, warning, error"),
    )
    log_pretty: bool = Field(
        False,
        description="Human-readable console logs instead of JSON lines.",
        json_schema_extra=accepts("true or false"),
    )
    log_sample_n: int = Field(
        1,
        gt=0,
        description="Log 1 of every N repeated per-request warnings (they are always counted).",
        json_schema_extra=accepts("a positive integer"),
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    # --- derived -----------------------------------------------------------
    @property
    def lake_path(self) -> Path:
        return self.lake_dir if self.lake_dir is not None else self.data_dir / "lake"

    @property
    def database(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{self.data_dir / 'estat.db'}"

    @property
    def database_args(self) -> dict[str, Any]:
        """``Database(**settings.database_args)``: the URL and how the
        connections are kept."""
        return {"url": self.database, "dead_peer_after": self.database_dead_peer_timeout}

    @property
    def spool_path(self) -> Path:
        return self.data_dir / "spool"

    @property
    def dlq_path(self) -> Path:
        return self.dlq_dir if self.dlq_dir is not None else self.data_dir / "dlq"

    @property
    def listen(self) -> tuple[str, int]:
        return parse_addr(self.http_addr)

    @property
    def allowlist(self) -> frozenset[str] | None:
        """The accepted event names, or None when every name is accepted."""
        names = {n.strip() for n in self.analytics_allowlist.split(",") if n.strip()}
        return None if "*" in names else frozenset(names)

    @property
    def cors_origins(self) -> frozenset[str] | None:
        """The allowed origins, or None for any origin."""
        names = {n.strip() for n in self.cors_allow_origins.split(",") if n.strip()}
        return None if "*" in names else frozenset(names)
