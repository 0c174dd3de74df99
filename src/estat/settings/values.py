"""The value types and parsers the settings fields use: durations,
addresses, origins, bucket names, the default allowlist and instance id."""

from __future__ import annotations

import re
import secrets
import socket
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
)

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


def parse_addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError("expected host:port such as :8080 or 127.0.0.1:8080")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port} is out of range (0-65535)")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)
