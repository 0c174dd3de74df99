"""From *the* event (``EventRecord``) to the rows of the store's tables.

The bus carries the record's JSON (the same line as the lake's); the event
row takes its columns from it, and the columns seed 004 left empty
(``session_id``, ``device_id``, ``platform``, ``app_version``, ``locale``,
``request_path``, ``request_method``) from the event's properties when they
are there, under either spelling (``sessionId`` or ``session_id``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from estat.model import MEMBER_ID_MAX, EventRecord


class _Payload(msgspec.Struct, kw_only=True):
    """An event as the bus carries it; the fields a service writing the
    outbox by hand may leave out have defaults."""

    event_id: str
    event_name: str
    event_version: str = "v1"
    occurred_at: str
    received_at: str = ""
    member_id: str | int | None = None
    anonymous_id: str | None = None
    properties: msgspec.Raw = msgspec.Raw(b"{}")
    source: str = "SERVER"
    ip: str = ""
    user_agent: str = ""


_decoder = msgspec.json.Decoder(_Payload)


class _Context(msgspec.Struct):
    """The properties that fill columns; every other key is skipped by the
    decoder without being built."""

    sessionId: Any = None
    session_id: Any = None
    deviceId: Any = None
    device_id: Any = None
    platform: Any = None
    appVersion: Any = None
    app_version: Any = None
    locale: Any = None
    requestPath: Any = None
    request_path: Any = None
    path: Any = None
    requestMethod: Any = None
    request_method: Any = None
    method: Any = None


_context = msgspec.json.Decoder(_Context)
_encode = msgspec.json.encode

#: column → the property names it is filled from, and its width
_FROM_PROPERTIES: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("session_id", ("sessionId", "session_id"), 100),
    ("device_id", ("deviceId", "device_id"), 100),
    ("platform", ("platform",), 30),
    ("app_version", ("appVersion", "app_version"), 30),
    ("locale", ("locale",), 20),
    ("request_path", ("requestPath", "request_path", "path"), 500),
    ("request_method", ("requestMethod", "request_method", "method"), 10),
)

#: a member id that fits ``bigint`` goes to ``member_id``, any other to ``member_key``
_BIGINT = 2**63 - 1


class BadPayload(ValueError):
    """A bus message that is not an event: it can never be stored."""


def decode(payload: bytes) -> EventRecord:
    try:
        p = _decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise BadPayload(f"not an event: {str(e)[:200]}") from None
    return EventRecord(
        p.event_id,
        p.event_name,
        p.event_version,
        p.occurred_at,
        p.received_at or p.occurred_at,
        None if p.member_id is None else str(p.member_id),
        p.anonymous_id,
        p.properties,
        p.source,
        p.ip,
        p.user_agent,
    )


def encode(record: EventRecord) -> bytes:
    return _encode(record)


def timestamp(iso: str) -> datetime:
    try:
        dt = datetime.fromisoformat(iso)
    except ValueError:
        raise BadPayload(f"occurred_at is not ISO-8601: {iso[:40]!r}") from None
    return dt.astimezone(UTC) if dt.tzinfo else dt.replace(tzinfo=UTC)


def member_bigint(member_id: str | None) -> int | None:
    """The member id as ``bigint`` when it is one (a JWT ``sub`` need not be)."""
    if member_id is None:
        return None
    try:
        n = int(member_id)
    except ValueError:
        return None
    return n if -_BIGINT <= n <= _BIGINT else None


def event_row(rec: EventRecord) -> dict[str, Any]:
    raw = bytes(rec.properties)
    member_id = member_bigint(rec.member_id)
    if rec.member_id is not None and len(rec.member_id) > MEMBER_ID_MAX:
        raise BadPayload(f"member_id longer than {MEMBER_ID_MAX} characters")
    row: dict[str, Any] = {
        "event_id": rec.event_id,
        "event_name": rec.event_name,
        "event_version": rec.event_version[:20],
        "occurred_at": timestamp(rec.occurred_at),
        "member_id": member_id,
        # a member id seed 004's bigint cannot hold, whole (never cut: that
        # would make it another member's)
        "member_key": rec.member_id if member_id is None and rec.member_id else None,
        "anonymous_id": rec.anonymous_id[:100] if rec.anonymous_id else None,
        "source": rec.source,
        "properties": raw.decode("utf-8"),
    }
    try:
        ctx = _context.decode(raw) if raw else _Context()
    except msgspec.DecodeError:
        raise BadPayload("properties are not a JSON object") from None
    for column, names, width in _FROM_PROPERTIES:
        value = None
        for name in names:
            v = getattr(ctx, name)
            if isinstance(v, str | int | float) and not isinstance(v, bool):
                value = str(v)[:width]
                break
        row[column] = value
    return row


def outbox_row(rec: EventRecord, payload: bytes) -> dict[str, Any]:
    return {
        "event_id": rec.event_id,
        "event_name": rec.event_name,
        "event_version": rec.event_version[:20],
        "occurred_at": timestamp(rec.occurred_at),
        "member_id": member_bigint(rec.member_id),
        "payload": payload.decode("utf-8"),
    }
