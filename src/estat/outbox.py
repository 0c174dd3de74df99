"""The transactional outbox for Python services that share estat's
database: ``enqueue(connection, events)`` writes source-outbox rows inside
the caller's own SQLAlchemy transaction, so an event exists exactly when the
business change it describes committed. The relay publishes them.

``events`` are dicts in the client API's shape: ``eventId``, ``eventName``,
optional ``eventVersion`` (``v1``), ``occurredAt`` (ISO-8601; now),
``memberId``, ``anonymousId``, ``properties``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy import Connection

from estat.model import MEMBER_ID_MAX, EventRecord
from estat.store.outbox import Enqueued, enqueue_rows

__all__ = ["Enqueued", "enqueue"]


def _record(e: Mapping[str, Any], now: str) -> EventRecord:
    event_id, name = e.get("eventId"), e.get("eventName")
    if not isinstance(event_id, str) or not 0 < len(event_id) <= 64:
        raise ValueError("eventId must be a string of 1 to 64 characters")
    if not isinstance(name, str) or not 0 < len(name) <= 100:
        raise ValueError("eventName must be a string of 1 to 100 characters")
    member = e.get("memberId")
    if member is not None and not 0 < len(str(member)) <= MEMBER_ID_MAX:
        raise ValueError(f"memberId must be 1 to {MEMBER_ID_MAX} characters")
    props = {k: v for k, v in dict(e.get("properties") or {}).items() if v is not None}
    props["source"] = "SERVER"
    return EventRecord(
        event_id,
        name,
        str(e.get("eventVersion") or "v1"),
        str(e.get("occurredAt") or now),
        now,
        None if member is None else str(member),
        e.get("anonymousId"),
        msgspec.Raw(msgspec.json.encode(props)),
        "SERVER",
        "",
        "",
    )


def enqueue(connection: Connection, events: Iterable[Mapping[str, Any]]) -> Enqueued:
    """Outbox rows for ``events`` in ``connection``'s transaction (PENDING);
    an ``eventId`` already in the outbox is counted as a duplicate."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return enqueue_rows(connection, [_record(e, now) for e in events])
