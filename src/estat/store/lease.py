"""Leasing outbox rows, shared by the source outbox (the relay) and the
dispatch outbox (the dispatcher): a row is due when PENDING (and not
leased) or FAILED with its retry time passed; a lease moves
``next_retry_at`` a lease ahead in one ``UPDATE ... WHERE id IN (SELECT ...
FOR UPDATE SKIP LOCKED)`` (PostgreSQL), so two workers never take one row
and no transaction stays open while the rows are on the network."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Table, Text, and_, cast, or_, select, update

from estat.store.db import Database


def due(t: Table, now: datetime) -> Any:
    c = t.c
    return or_(
        and_(c.status == "PENDING", or_(c.next_retry_at.is_(None), c.next_retry_at <= now)),
        and_(c.status == "FAILED", c.next_retry_at <= now),
    )


def lease(
    db: Database, t: Table, where: Any, limit: int, now: datetime, lease_for: timedelta
) -> list[tuple[int, str, bytes, int, datetime]]:
    """(id, event_id, payload JSON, retry_count, created_at) of up to ``limit`` rows
    matching ``where``, oldest first, leased until ``now + lease_for``."""
    ids = select(t.c.id).where(where).order_by(t.c.id).limit(limit)
    if db.skip_locked:
        ids = ids.with_for_update(skip_locked=True)
    stmt = (
        update(t)
        .where(t.c.id.in_(ids.scalar_subquery()))
        .values(next_retry_at=now + lease_for, updated_at=now)
        .returning(t.c.id, t.c.event_id, cast(t.c.payload, Text), t.c.retry_count, t.c.created_at)
    )
    with db.engine.begin() as conn:
        rows = sorted(conn.execute(stmt).all(), key=lambda r: int(r[0]))
    return [(int(r[0]), str(r[1]), str(r[2]).encode("utf-8"), int(r[3]), aware(r[4])) for r in rows]


def aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)  # SQLite keeps no zone
