"""One frozen ``Settings`` object, built once from the environment.

Variable names and defaults are the collector's contract (upper case, no
prefix). A ``.env`` file in the working directory is read too; real
environment variables win. ``docs/configuration.md`` is generated from the
fields below (``estat config --markdown``) and a test keeps it current.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from estat.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``"3s"``, ``"2m"``, ``"24h"``, ``"250ms"``, or a bare number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration such as 500ms, 3s, 2m or 24h")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


DEFAULT_ALLOWLIST = (
    "ui.page.viewed",
    "ui.page.dwelled",
    "ui.restaurant.clicked",
    "ui.restaurant.viewed",
    "ui.review.write_started",
    "ui.review.submitted",
    "ui.search.executed",
    "ui.group.clicked",
    "ui.group.viewed",
    "ui.favorite.sheet_opened",
    "ui.favorite.updated",
    "ui.event.clicked",
    "ui.tab.changed",
    "ui.restaurant.shared",
)


def _accepts(text: str) -> Any:
    return {"accepts": text}


def default_instance_id() -> str:
    """Host name plus a random suffix, new at every start.

    The suffix keeps object keys unique when a container restarts with the
    same host name (and the same PID 1) within the same second.
    """
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "estat"
    return f"{host}-{secrets.token_hex(3)}"


class Settings(BaseSettings):
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
        None, description="S3 region (S3 mode).", json_schema_extra=_accepts("a region name")
    )
    raw_bucket: str | None = Field(
        None,
        description="Bucket of the raw data lake. Unset: the embedded local lake under LAKE_DIR.",
        json_schema_extra=_accepts("a bucket name"),
    )
    raw_prefix: str = Field(
        "raw", description="Key prefix of good data.", json_schema_extra=_accepts("a key prefix")
    )
    dlq_prefix: str = Field(
        "raw_dlq",
        description="Key prefix for data that cannot be encoded or validated (quarantine).",
        json_schema_extra=_accepts("a key prefix"),
    )
    s3_endpoint_url: str | None = Field(
        None,
        validation_alias=AliasChoices("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
        description="S3-compatible endpoint (MinIO, Ceph, moto...). AWS_ENDPOINT_URL is honoured too.",
        json_schema_extra=_accepts("an http:// or https:// URL"),
    )
    s3_timeout: Duration = Field(
        3.0, description="Timeout of one upload attempt.", json_schema_extra=_accepts("a duration")
    )
    s3_app_retries: int = Field(
        2,
        ge=0,
        le=100,
        description="Application-level retries of an upload (SDK retries are off).",
        json_schema_extra=_accepts("an integer from 0 to 100"),
    )
    lake_failure_threshold: int = Field(
        5,
        ge=1,
        le=1000,
        description="Consecutive failed upload attempts after which the lake is marked failing: new batches go straight to the DLQ and one probe upload tests the lake.",
        json_schema_extra=_accepts("an integer from 1 to 1000"),
    )
    lake_probe_interval: Duration = Field(
        5.0,
        gt=0,
        description="Wait before the first probe upload once the lake is marked failing; doubles after each failed probe, up to LAKE_PROBE_MAX_INTERVAL.",
        json_schema_extra=_accepts("a duration"),
    )
    lake_probe_max_interval: Duration = Field(
        60.0,
        gt=0,
        description="Longest wait between probe uploads while the lake is failing.",
        json_schema_extra=_accepts("a duration"),
    )
    lake_startup_check: Literal["warn", "require"] = Field(
        "warn",
        description="At start, one bounded request checks the lake (bucket or directory). warn: log and report it in /ready and lake_healthy, and start anyway (the DLQ absorbs); require: exit with status 2 when the check fails.",
        json_schema_extra=_accepts("warn or require"),
    )
    partition_tz: str = Field(
        "UTC",
        description="Time zone of the dt=/hr= partitions of object keys.",
        json_schema_extra=_accepts("an IANA time zone such as UTC or Asia/Seoul"),
    )

    # --- HTTP --------------------------------------------------------------
    http_addr: str = Field(
        ":8080",
        description="Ingest listener address, host:port (empty host: all interfaces).",
        json_schema_extra=_accepts("host:port, e.g. :8080 or 127.0.0.1:8080"),
    )
    max_body_size: int = Field(
        16384,
        gt=0,
        description="Largest /collect request body in bytes; larger gets 413.",
        json_schema_extra=_accepts("a positive integer"),
    )
    http_max_header_size: int = Field(
        16384,
        ge=1024,
        description="Largest request line plus headers in bytes; larger gets 431.",
        json_schema_extra=_accepts("an integer >= 1024"),
    )
    max_connections: int = Field(
        0,
        ge=0,
        description="Open connections per worker; above it the oldest idle keep-alive connection is closed (or the new one, when every connection is busy). 0: three quarters of the open-file limit (raised to its hard limit at start), less a reserve for the lake, the DLQ and logs.",
        json_schema_extra=_accepts("0 or a positive integer"),
    )
    http_header_timeout: Duration = Field(
        10.0,
        gt=0,
        description="Time a client has to send a request's headers, from accepting the connection or from the previous answer; then 408 (or a quiet close when nothing was sent).",
        json_schema_extra=_accepts("a duration"),
    )
    http_body_timeout: Duration = Field(
        30.0,
        gt=0,
        description="Time a client has to send a request's body; then 408.",
        json_schema_extra=_accepts("a duration"),
    )
    http_keepalive_timeout: Duration = Field(
        75.0,
        gt=0,
        description="Idle keep-alive connections are closed after this (keep above your load balancer's idle timeout).",
        json_schema_extra=_accepts("a duration"),
    )

    # --- pipeline ----------------------------------------------------------
    channel_size: int = Field(
        4000,
        gt=0,
        description="Event queue capacity in events; full gets 503 with Retry-After.",
        json_schema_extra=_accepts("a positive integer"),
    )
    channel_max_bytes: int = Field(
        64 * 1024 * 1024,
        gt=0,
        description="Event queue capacity in bytes of serialised records; full gets 503.",
        json_schema_extra=_accepts("a positive integer"),
    )
    batch_size: int = Field(
        5000,
        gt=0,
        description="Events per object.",
        json_schema_extra=_accepts("a positive integer"),
    )
    batch_max_bytes: int = Field(
        32 * 1024 * 1024,
        gt=0,
        description="Uncompressed bytes per object; a batch is cut when the next record would pass it.",
        json_schema_extra=_accepts("a positive integer"),
    )
    flush_interval: Duration = Field(
        120.0,
        gt=0,
        description="Maximum age of a batch (from its first event) before it is cut.",
        json_schema_extra=_accepts("a duration"),
    )
    upload_queue: int = Field(
        4,
        gt=0,
        description="Batches waiting for upload; when full, the event queue backs up.",
        json_schema_extra=_accepts("a positive integer"),
    )
    upload_concurrency: int = Field(
        4,
        gt=0,
        le=64,
        description="Uploads in flight at once per process.",
        json_schema_extra=_accepts("an integer from 1 to 64"),
    )

    # --- client event API ------------------------------------------------------
    events_prefix: str = Field(
        "events",
        description="Key prefix of the client events dataset (POST /api/v1/analytics/events).",
        json_schema_extra=_accepts("a key prefix"),
    )
    events_channel_size: int = Field(
        50_000,
        gt=0,
        description="Event queue capacity of the client events dataset, in events (requests carry up to ANALYTICS_MAX_BATCH_SIZE each).",
        json_schema_extra=_accepts("a positive integer"),
    )
    analytics_max_batch_size: int = Field(
        50,
        gt=0,
        le=10000,
        description="Most events in one request; more gets 400 ANALYTICS_INGEST_BATCH_LIMIT_EXCEEDED.",
        json_schema_extra=_accepts("an integer from 1 to 10000"),
    )
    analytics_allowlist: str = Field(
        ",".join(DEFAULT_ALLOWLIST),
        description="Comma-separated event names accepted; `*` accepts every name.",
        json_schema_extra=_accepts("event names separated by commas, or *"),
    )
    analytics_max_body_size: int = Field(
        1024 * 1024,
        gt=0,
        description="Largest request body on the wire (compressed or not); larger gets 413.",
        json_schema_extra=_accepts("a positive integer"),
    )
    analytics_max_decompressed_size: int = Field(
        4 * 1024 * 1024,
        gt=0,
        description="Largest body after Content-Encoding: gzip is undone; larger gets 413.",
        json_schema_extra=_accepts("a positive integer"),
    )
    analytics_max_compression_ratio: int = Field(
        100,
        gt=1,
        description="Largest decompressed/compressed ratio of a gzip body (bomb guard); larger gets 413.",
        json_schema_extra=_accepts("an integer > 1"),
    )
    analytics_max_event_size: int = Field(
        32 * 1024,
        gt=0,
        description="Largest serialised properties of one event in bytes; larger gets 400.",
        json_schema_extra=_accepts("a positive integer"),
    )
    analytics_max_properties_depth: int = Field(
        8,
        gt=0,
        le=64,
        description="Deepest nesting of objects and arrays inside properties; deeper gets 400.",
        json_schema_extra=_accepts("an integer from 1 to 64"),
    )
    analytics_rate_limit_max_requests: int = Field(
        120,
        gt=0,
        description="Requests allowed per identity (member or anonymous id) per window.",
        json_schema_extra=_accepts("a positive integer"),
    )
    analytics_rate_limit_window: Duration = Field(
        60.0, gt=0, description="Rate-limit window.", json_schema_extra=_accepts("a duration")
    )
    rate_limit_redis_url: SecretStr | None = Field(
        None,
        description="Redis shared by every replica for rate limits. Unset: the workers of one server share one in-memory limit (kept by the supervisor process).",
        json_schema_extra=_accepts("redis://host:port/db"),
    )
    auth_jwt_secret: SecretStr | None = Field(
        None,
        description="HS256 secret verifying `Authorization: Bearer` tokens (claim sub is the member id).",
        json_schema_extra=_accepts("a secret string"),
    )
    auth_jwt_public_key: SecretStr | None = Field(
        None,
        description="PEM public key verifying RS256/ES256 bearer tokens (instead of AUTH_JWT_SECRET).",
        json_schema_extra=_accepts("a PEM public key"),
    )
    cors_allow_origins: str = Field(
        "*",
        description="Origins allowed to send events from browsers (comma-separated, or *); no credentials.",
        json_schema_extra=_accepts("* or origins separated by commas"),
    )

    # --- local storage -----------------------------------------------------
    data_dir: Path = Field(
        Path("./data"),
        description="Root of the embedded defaults.",
        json_schema_extra=_accepts("a directory path"),
    )
    lake_dir: Path | None = Field(
        None,
        description="Local lake directory used when RAW_BUCKET is unset. Default: $DATA_DIR/lake.",
        json_schema_extra=_accepts("a directory path"),
    )
    dlq_dir: Path | None = Field(
        None,
        description="Local dead-letter queue directory. Default: $DATA_DIR/dlq.",
        json_schema_extra=_accepts("a directory path"),
    )
    dlq_max_age: Duration = Field(
        86400.0,
        gt=0,
        description="DLQ file time to live.",
        json_schema_extra=_accepts("a duration"),
    )
    dlq_max_size_bytes: int = Field(
        19327352832,
        gt=0,
        description="DLQ capacity in bytes.",
        json_schema_extra=_accepts("a positive integer"),
    )

    # --- process -----------------------------------------------------------
    instance_id: str = Field(
        default_factory=default_instance_id,
        description="Name of this instance in object keys. Default: host name plus a random suffix per start; each worker appends -w<N>.",
        json_schema_extra=_accepts("letters, digits, '.', '-'"),
    )
    shutdown_timeout: Duration = Field(
        25.0,
        gt=0,
        description="Bound on the graceful drain after SIGTERM/SIGINT.",
        json_schema_extra=_accepts("a duration"),
    )
    deploy_env: str = Field(
        "local",
        description="Deployment name written in every log line's env field.",
        json_schema_extra=_accepts("any short name, e.g. prod"),
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info",
        description="Lowest level logged.",
        json_schema_extra=_accepts("debug, info, warning, error"),
    )
    log_pretty: bool = Field(
        False,
        description="Human-readable console logs instead of JSON lines.",
        json_schema_extra=_accepts("true or false"),
    )
    log_sample_n: int = Field(
        1,
        gt=0,
        description="Log 1 of every N repeated per-request warnings (they are always counted).",
        json_schema_extra=_accepts("a positive integer"),
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("partition_tz")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError("unknown time zone") from e
        return v

    @field_validator("http_addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        parse_addr(v)
        return v

    @field_validator("instance_id")
    @classmethod
    def _instance(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,64}", v):
            raise ValueError("must be 1-64 letters, digits, '.' or '-'")
        return v

    @field_validator("s3_endpoint_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v

    @field_validator("rate_limit_redis_url")
    @classmethod
    def _redis(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not re.match(r"^(redis|rediss|unix)://", v.get_secret_value()):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return v

    @field_validator("auth_jwt_public_key")
    @classmethod
    def _public_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            from cryptography.hazmat.primitives.asymmetric import ec, rsa
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            try:
                key = load_pem_public_key(v.get_secret_value().encode())
            except (ValueError, TypeError):
                raise ValueError("not a PEM public key") from None
            if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
                raise ValueError("must be an RSA (RS256) or EC P-256 (ES256) public key")
        return v

    @field_validator("cors_allow_origins")
    @classmethod
    def _origins(cls, v: str) -> str:
        for origin in (o.strip() for o in v.split(",")):
            if origin and origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{origin!r} is not an origin: scheme://host[:port], e.g. https://shop.example"
                )
        return v

    @field_validator("raw_bucket")
    @classmethod
    def _bucket(cls, v: str | None) -> str | None:
        if v is not None and (not _BUCKET.fullmatch(v) or ".." in v or re.fullmatch(r"[\d.]+", v)):
            raise ValueError(
                "not an S3 bucket name: 3-63 lower-case letters, digits, '.' or '-', "
                "starting and ending with a letter or digit"
            )
        return v

    @field_validator("raw_prefix", "dlq_prefix", "events_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.strip("/")
        if not v or not re.fullmatch(r"[A-Za-z0-9._/=-]+", v):
            raise ValueError("must be a non-empty key prefix of letters, digits, . _ - = /")
        return v

    # --- derived -----------------------------------------------------------
    @property
    def lake_path(self) -> Path:
        return self.lake_dir if self.lake_dir is not None else self.data_dir / "lake"

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


_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:\d{1,5})?")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def parse_addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError("expected host:port such as :8080 or 127.0.0.1:8080")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port} is out of range (0-65535)")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


def env_name(field: str) -> str:
    info = Settings.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        return str(first)
    return field.upper()


def load_settings(**overrides: Any) -> Settings:
    """Build the settings; on bad values raise ``ConfigError`` naming every
    invalid variable (``ConfigError.problems``: variable → one line)."""
    try:
        return Settings(**overrides)
    except ValidationError as e:
        problems: dict[str, str] = {}
        for err in e.errors():
            name, line = _problem(err)
            problems.setdefault(name, line)
        lines = list(problems.values())
        text = lines[0] if len(lines) == 1 else "\n  ".join(["", *lines])
        raise ConfigError(f"invalid configuration: {text}", problems) from None


def _problem(err: Any) -> tuple[str, str]:
    field = str(err["loc"][0]) if err["loc"] else "?"
    field = _ALIASES.get(field.upper(), field)
    name = env_name(field) if field in Settings.model_fields else field.upper()
    info = Settings.model_fields.get(field)
    extra = info.json_schema_extra if info is not None else None
    accepts = extra.get("accepts") if isinstance(extra, dict) else None
    raw = os.environ.get(name, err.get("input"))
    msg = str(err["msg"]).removeprefix("Value error, ")
    hint = f" (accepts {accepts})" if accepts else ""
    shown = "****" if name in SECRET_VARIABLES else repr(raw)
    return name, f"{name}={shown}: {msg}{hint}"


_ALIASES = {
    str(choice).upper(): name
    for name, info in Settings.model_fields.items()
    if isinstance(info.validation_alias, AliasChoices)
    for choice in info.validation_alias.choices
}

#: variables whose values are never printed (typed ``SecretStr``)
SECRET_VARIABLES = frozenset(
    env_name(f) for f, info in Settings.model_fields.items() if "SecretStr" in str(info.annotation)
)


def effective_config(settings: Settings) -> list[tuple[str, str]]:
    """(variable, value) pairs of the effective configuration, secrets masked."""
    rows: list[tuple[str, str]] = []
    for field in Settings.model_fields:
        name = env_name(field)
        value = getattr(settings, field)
        if field == "lake_dir":
            value = settings.lake_path
        elif field == "dlq_dir":
            value = settings.dlq_path
        if _is_duration(field) and isinstance(value, float):
            text = _fmt_seconds(value)
        elif isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, SecretStr):
            text = "****"
        else:
            text = "" if value is None else str(value)
        rows.append((name, text))
    return rows


def raw_config() -> list[tuple[str, str]]:
    """(variable, value) as set in the environment or ``.env`` (or the default),
    secrets masked: what ``estat config`` shows when the values do not validate."""
    from dotenv import dotenv_values

    dotenv = {k.upper(): v for k, v in dotenv_values(".env").items() if v is not None}
    rows: list[tuple[str, str]] = []
    for field in Settings.model_fields:
        name = env_name(field)
        value = os.environ.get(name, dotenv.get(name))
        if value is None:
            text = "(default)"
        elif name in SECRET_VARIABLES:
            text = "****"
        else:
            text = value
        rows.append((name, text))
    return rows


def markdown_table() -> str:
    """The configuration reference, generated from the fields above."""
    lines = [
        "# Configuration",
        "",
        "<!-- Generated by `estat config --markdown`; do not edit by hand. -->",
        "",
        "estat reads its configuration from environment variables and from a `.env`",
        "file in the working directory (environment variables win). Durations accept",
        "`500ms`, `3s`, `2m`, `24h`, `1d` or a bare number of seconds. An invalid",
        "value stops start-up with one line naming the variable and what it accepts.",
        "`estat config` prints the effective configuration.",
        "",
        "| variable | default | meaning | accepts |",
        "|---|---|---|---|",
    ]
    for field, info in Settings.model_fields.items():
        name = env_name(field)
        if info.default_factory is not None:
            default = "(generated)"
        elif info.default is None:
            default = "–"
        else:
            d = info.default
            default = _fmt_default(field, d)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        lines.append(
            f"| `{name}` | {default} | {info.description or ''} | {extra.get('accepts', '')} |"
        )
    return "\n".join(lines) + "\n"


def _is_duration(field: str) -> bool:
    return any(isinstance(m, BeforeValidator) for m in Settings.model_fields[field].metadata)


def _fmt_default(field: str, value: Any) -> str:
    if _is_duration(field) and isinstance(value, int | float):
        return f"`{_fmt_seconds(float(value))}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _fmt_seconds(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
