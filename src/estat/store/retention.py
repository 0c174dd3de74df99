"""Retention: rows whose work is done, deleted once older than their age,
in bounded batches (a statement never holds many locks or a long
transaction, and a busy table is never scanned whole):

- ``user_activity_source_outbox`` PUBLISHED rows, by ``published_at``;
- ``user_activity_dispatch_outbox`` DISPATCHED rows, by ``dispatched_at``;
- ``admin_audit_log`` rows, by ``created_at``;
- the completeness ledger (``estat_ledger``, ``estat_lake_objects``,
  ``estat_manifests``), by the hour counted.

(``message_queue_trace_log`` has its own, ``store/trace.py``.) FAILED and
PENDING rows are never deleted: they are work still to do. After a source
outbox row is gone, a server event sent again with its ``eventId`` is
accepted as new, published, and found a duplicate by the event store
(``UNIQUE (event_id)``): nothing is stored twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Connection, Table, and_, delete, func, select

from estat.store.db import Database
from estat.store.lease import aware
from estat.store.schema import (
    admin_audit_log,
    estat_lake_objects,
    estat_ledger,
    estat_manifests,
    user_activity_dispatch_outbox,
    user_activity_source_outbox,
)

BATCH = 5000


@dataclass(frozen=True, slots=True)
class Rule:
    name: str  # the metric's table label
    table: Table
    column: Column[Any]  # the time compared with the age
    where: Any = None  # which rows are done
    by: str = "id"  # the column a batch is chosen by


def rules() -> dict[str, Rule]:
    s, d, a = user_activity_source_outbox, user_activity_dispatch_outbox, admin_audit_log
    return {
        "source_outbox": Rule("source_outbox", s, s.c.published_at, s.c.status == "PUBLISHED"),
        "dispatch_outbox": Rule(
            "dispatch_outbox", d, d.c.dispatched_at, d.c.status == "DISPATCHED"
        ),
        "audit": Rule("audit", a, a.c.created_at),
        "ledger": Rule("ledger", estat_ledger, estat_ledger.c.hour, by="hour"),
        "lake_objects": Rule(
            "lake_objects", estat_lake_objects, estat_lake_objects.c.hour, by="key"
        ),
        "manifests": Rule("manifests", estat_manifests, estat_manifests.c.hour, by="hour"),
    }


def created_before(conn: Connection, t: Table, before: datetime) -> int | None:
    """About the highest id of ``t``'s rows created before ``before`` (None:
    none is): a binary search on the primary key, ids being handed out in
    the order rows are created (give or take the transactions in flight;
    a row just past the answer waits for the next purge)."""
    first = conn.execute(select(t.c.id, t.c.created_at).order_by(t.c.id).limit(1)).first()
    if first is None or aware(first[1]) >= before:
        return None
    lo, hi = int(first[0]), int(conn.execute(select(func.max(t.c.id))).scalar_one())
    while lo < hi:  # the row at lo was created before; none past hi was
        mid = (lo + hi + 1) // 2
        row = conn.execute(
            select(t.c.id, t.c.created_at).where(t.c.id >= mid).order_by(t.c.id).limit(1)
        ).first()
        if row is not None and aware(row[1]) < before:
            lo = int(row[0])
        else:
            hi = mid - 1
    return lo


def purge(db: Database, rule: Rule, before: datetime, batch: int = BATCH) -> int:
    """Delete one batch of ``rule``'s rows older than ``before``; how many.

    Rows chosen by id (``by="id"``) are looked for only up to the last row
    created before ``before`` (``created_before``): the rule's time is never
    earlier than a row's creation, so no row past it can be old enough, and
    the last batch of a purge does not read the rest of the table (days of
    rows kept by the retention) to find that nothing more is."""
    t = rule.table
    cond = rule.column < before
    if rule.where is not None:
        cond = and_(rule.where, cond)
    col = t.c[rule.by]
    with db.engine.begin() as conn:
        if rule.by == "id":
            last = created_before(conn, t, before)
            if last is None:
                return 0
            cond = and_(cond, col <= last)
        ids = select(col).where(cond).group_by(col).order_by(col).limit(batch)
        return int(conn.execute(delete(t).where(col.in_(ids.scalar_subquery()))).rowcount)
