"""The value types and parsers the settings fields use: durations,
addresses, origins, bucket names, the default allowlist and instance id."""

from __future__ import annotations

import re
import secrets
import socket
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BeforeValidator, SecretStr

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


def accepts(text: str) -> Any:
    return {"accepts": text}


def default_instance_id() -> str:
    """Host name plus a random suffix, new at every start.

    The suffix keeps object keys unique when a container restarts with the
    same host name (and the same PID 1) within the same second.
    """
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "estat"
    return f"{host}-{secrets.token_hex(3)}"


ORIGIN_RE = re.compile(r"https?://[A-Za-z0-9.-]+(:\d{1,5})?")
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def dotenv_vars(path: str = ".env") -> dict[str, str]:
    """The variables a ``.env`` file sets (names upper-cased, as the
    settings read them; none when there is no file)."""
    import os

    if not os.path.isfile(path):
        return {}
    from dotenv import dotenv_values

    return {k.upper(): v for k, v in dotenv_values(path).items() if v is not None}


def parse_addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError("expected host:port such as :8080 or 127.0.0.1:8080")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port} is out of range (0-65535)")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


# --- checked value types: each validates itself, wherever a field uses it ----------


def _time_zone(v: str) -> str:
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError("unknown time zone") from e
    return v


def _address(v: str) -> str:
    parse_addr(v)
    return v


def _instance(v: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9.-]{1,64}", v):
        raise ValueError("must be 1-64 letters, digits, '.' or '-'")
    return v


def _url(v: str) -> str:
    if not re.match(r"^https?://[^/\s]+", v):
        raise ValueError("must be an http:// or https:// URL")
    return v


def _redis(v: SecretStr) -> SecretStr:
    if not re.match(r"^(redis|rediss|unix)://", v.get_secret_value()):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return v


def _public_key(v: SecretStr) -> SecretStr:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(v.get_secret_value().encode())
    except (ValueError, TypeError):
        raise ValueError("not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ValueError("must be an RSA (RS256) or EC P-256 (ES256) public key")
    return v


def _origins(v: str) -> str:
    for origin in (o.strip() for o in v.split(",")):
        if origin and origin != "*" and not ORIGIN_RE.fullmatch(origin):
            raise ValueError(
                f"{origin!r} is not an origin: scheme://host[:port], e.g. https://shop.example"
            )
    return v


def _bucket(v: str) -> str:
    if not BUCKET_RE.fullmatch(v) or ".." in v or re.fullmatch(r"[\d.]+", v):
        raise ValueError(
            "not an S3 bucket name: 3-63 lower-case letters, digits, '.' or '-', "
            "starting and ending with a letter or digit"
        )
    return v


def _prefix(v: str) -> str:
    v = v.strip("/")
    if not v or not re.fullmatch(r"[A-Za-z0-9._/=-]+", v):
        raise ValueError("must be a non-empty key prefix of letters, digits, . _ - = /")
    return v


TimeZone = Annotated[str, AfterValidator(_time_zone)]
Address = Annotated[str, AfterValidator(_address)]
InstanceId = Annotated[str, AfterValidator(_instance)]
EndpointUrl = Annotated[str, AfterValidator(_url)]
RedisUrl = Annotated[SecretStr, AfterValidator(_redis)]
PemPublicKey = Annotated[SecretStr, AfterValidator(_public_key)]
Origins = Annotated[str, AfterValidator(_origins)]
BucketName = Annotated[str, AfterValidator(_bucket)]
KeyPrefix = Annotated[str, AfterValidator(_prefix)]


def _database(v: SecretStr) -> SecretStr:
    if not re.match(r"^(sqlite|postgresql|postgres|postgresql\+psycopg)://", v.get_secret_value()):
        raise ValueError(
            "must be sqlite:///path, postgresql://user:pass@host:port/db or postgresql+psycopg://…"
        )
    return v


def _nats(v: SecretStr) -> SecretStr:
    if not re.match(r"^(nats|tls|ws|wss)://", v.get_secret_value()):
        raise ValueError("must be a nats:// (or tls://) URL")
    return v


def _tokens(v: SecretStr) -> SecretStr:
    for entry in (e.strip() for e in v.get_secret_value().split(",")):
        if entry and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}:[0-9a-fA-F]{64}", entry):
            raise ValueError(
                "entries must be name:sha256hex (the SHA-256 of the token in hex), "
                "separated by commas"
            )
    return v


def _targets(v: str) -> str:
    for t in (t.strip() for t in v.split(",")):
        if t and not re.fullmatch(r"[A-Z][A-Z0-9_]{0,29}", t.upper()):
            raise ValueError(f"{t!r} is not a destination name (letters, digits, _; 30 at most)")
    return v


def _mq_prefix(v: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,50}", v):
        raise ValueError("must be 1-50 letters, digits, '_' or '-'")
    return v


DatabaseUrl = Annotated[SecretStr, AfterValidator(_database)]
NatsUrl = Annotated[SecretStr, AfterValidator(_nats)]
TokenHashes = Annotated[SecretStr, AfterValidator(_tokens)]
Targets = Annotated[str, AfterValidator(_targets)]
MqPrefix = Annotated[str, AfterValidator(_mq_prefix)]
