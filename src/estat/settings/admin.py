"""The fields of the admin and ops listener. ``Settings`` (``fields.py``)
inherits them."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings

from estat.settings.values import accepts, dotenv_vars, parse_addr

SCOPES = ("read", "replay", "operate")
_ENTRY = re.compile(r"([A-Za-z0-9._-]{1,64}):([a-z+]{1,40}):([0-9a-fA-F]{64})")


@dataclass(frozen=True, slots=True)
class AdminTokenEntry:
    name: str
    scopes: frozenset[str]
    digest: str  # SHA-256 of the token, lower-case hex


def parse_admin_tokens(text: str) -> list[AdminTokenEntry]:
    """``name:scopes:sha256hex`` entries separated by commas or new lines
    (``#`` starts a comment); scopes joined by ``+``."""
    out: list[AdminTokenEntry] = []
    for raw in re.split(r"[,\n]", text):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        m = _ENTRY.fullmatch(entry)
        if m is None:
            raise ValueError(
                "admin token entries are name:scopes:sha256hex, scopes joined by + "
                f"out of {', '.join(SCOPES)} (for example oncall:read+replay:<64 hex>)"
            )
        scopes = frozenset(m.group(2).split("+"))
        unknown = scopes - set(SCOPES)
        if unknown:
            raise ValueError(f"unknown admin scope {sorted(unknown)[0]!r}: {', '.join(SCOPES)}")
        out.append(AdminTokenEntry(m.group(1), scopes, m.group(3).lower()))
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise ValueError("admin token names must be unique")
    return out


DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"


def admin_url(environ: Mapping[str, str] = os.environ, dotenv: str = ".env") -> str:
    """Where estat's own commands on this host (``estat admin``, ``estat
    doctor``) find the admin listener: ``ESTAT_ADMIN_URL``, else the server's
    ``ADMIN_ADDR`` as the server reads it (the environment, then ``.env`` in
    the working directory), a wildcard host meaning this host's loopback."""
    if environ.get("ESTAT_ADMIN_URL"):
        return environ["ESTAT_ADMIN_URL"].rstrip("/")
    addr = environ.get("ADMIN_ADDR")
    if addr is None:
        addr = dotenv_vars(dotenv).get("ADMIN_ADDR")
    if not addr or addr.strip().lower() == "off":
        return DEFAULT_ADMIN_URL
    try:
        host, port = parse_addr(addr.strip())
    except ValueError:
        return DEFAULT_ADMIN_URL
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _tokens(v: SecretStr) -> SecretStr:
    parse_admin_tokens(v.get_secret_value())
    return v


def _admin_addr(v: str) -> str:
    if v.strip().lower() not in ("", "off"):
        parse_addr(v)
    return v


AdminTokens = Annotated[SecretStr, AfterValidator(_tokens)]
AdminAddress = Annotated[str, AfterValidator(_admin_addr)]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminFields(BaseSettings):
    # --- admin and ops listener ------------------------------------------------
    admin_addr: AdminAddress = Field(
        "127.0.0.1:8081",
        description="Admin and ops listener (/metrics, detailed /ready, the admin API), host:port; off: none. With --workers N, one per server. Without admin tokens it binds only a loopback address.",
        json_schema_extra=accepts("host:port, or off"),
    )
    admin_tokens: AdminTokens | None = Field(
        None,
        description="Admin API tokens: name:scopes:sha256hex entries, comma-separated; scopes joined by + out of read, replay, operate. Only the SHA-256 of a token is configured (`estat admin token create`). Unset (and no file): only /health, /ready and /metrics answer.",
        json_schema_extra=accepts("name:read+replay:sha256hex,name:read:sha256hex"),
    )
    admin_tokens_file: Path | None = Field(
        None,
        description="A file of admin token entries, one name:scopes:sha256hex per line (# comments); read at start, added to ADMIN_TOKENS.",
        json_schema_extra=accepts("a path"),
    )

    @model_validator(mode="after")
    def _admin(self) -> AdminFields:
        entries = self.admin_token_entries  # raises on a bad file
        addr = self.admin_listen
        if addr is not None and not entries and not is_loopback(addr[0]):
            raise ValueError(
                "ADMIN_ADDR is not a loopback address and no admin token is configured "
                "(ADMIN_TOKENS or ADMIN_TOKENS_FILE): refusing to expose the admin listener"
            )
        return self

    @property
    def admin_listen(self) -> tuple[str, int] | None:
        if self.admin_addr.strip().lower() in ("", "off"):
            return None
        return parse_addr(self.admin_addr)

    @property
    def admin_token_entries(self) -> list[AdminTokenEntry]:
        text = self.admin_tokens.get_secret_value() if self.admin_tokens is not None else ""
        if self.admin_tokens_file is not None:
            try:
                text += "\n" + self.admin_tokens_file.read_text()
            except OSError as e:
                raise ValueError(f"ADMIN_TOKENS_FILE cannot be read: {e.strerror}") from None
        return parse_admin_tokens(text)
