"""Leasing outbox rows, shared by the source outbox and the dispatch
outbox: a row is due when PENDING (and not leased) or FAILED with its
retry time passed; ``lease`` moves ``next_retry_at`` a lease ahead in one
``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)`` (PostgreSQL),
so two workers never take one row and no transaction stays open while the
rows are on the network. It is the lease on SQLite and of an operator's
replay; on PostgreSQL the relay and the dispatcher hold their rows' locks
instead (``SourceOutbox.take``, ``DispatchOutbox.lease``), over the same
index ranges.

On PostgreSQL the due rows are leased in two index ranges of the partial
``(status, next_retry_at, id)`` index: rows whose retry time (or lease)
has passed, the earliest first, then new PENDING rows, the oldest first.
Each asks for an order only that index gives (``status`` as an ``= ANY``,
which the planner does not fold into an equality). With ``ORDER BY id`` the
planner may walk the primary key from the first row, past every row already
sent, whenever its statistics were taken while most rows were due (a
backlog after an outage): each lease then reads the whole sent history and
the drain slows to a crawl until the next ANALYZE
(``tests/store/test_scale_reads.py``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Table, Text, and_, any_, cast, literal_column, or_, select, update
from sqlalchemy.engine import Connection, Engine

from estat.store.db import Database

R = TypeVar("R")


def due(t: Table, now: datetime) -> Any:
    c = t.c
    return or_(
        and_(c.status == "PENDING", or_(c.next_retry_at.is_(None), c.next_retry_at <= now)),
        and_(c.status == "FAILED", c.next_retry_at <= now),
    )


def _one_of(*statuses: str) -> Any:
    """``= ANY (ARRAY['A', ...])`` with the statuses written in the statement:
    as bound parameters, a generic plan could not prove the partial index's
    predicate."""
    assert all(s.isalpha() and s.isupper() for s in statuses)
    return any_(literal_column("ARRAY[" + ", ".join(f"'{s}'" for s in statuses) + "]"))


def due_ranges(t: Table, now: datetime) -> list[tuple[Any, tuple[Any, ...]]]:
    """PostgreSQL: the due rows as (condition, order) index ranges, leased
    in this order (see the module's doc)."""
    c = t.c
    order = (c.status, c.next_retry_at, c.id)
    return [
        (and_(c.status == _one_of("FAILED", "PENDING"), c.next_retry_at <= now), order),
        (and_(c.status == _one_of("PENDING"), c.next_retry_at.is_(None)), order),
    ]


def oldest_in(db: Database, t: Table, status: str) -> tuple[Any, tuple[Any, ...]]:
    """(condition, order): the rows in ``status``, oldest first, by an order
    only a status index gives on PostgreSQL (see the module's doc)."""
    if db.skip_locked:
        return t.c.status == _one_of(status), (t.c.status, t.c.id)
    return t.c.status == status, (t.c.id,)


Leased = list[tuple[int, str, bytes, int, datetime]]


def lease(
    db: Database,
    t: Table,
    where: Any,
    limit: int,
    now: datetime,
    lease_for: timedelta,
    ranges: list[tuple[Any, tuple[Any, ...]]] | None = None,
) -> Leased:
    """(id, event_id, payload JSON, retry_count, created_at) of up to ``limit`` rows
    matching ``where``, oldest first, leased until ``now + lease_for``. On
    PostgreSQL, ``ranges`` (the same rows as ``where``, by index range) are
    leased one after the other instead."""
    parts = ranges if ranges is not None and db.skip_locked else [(where, (t.c.id,))]
    out: Leased = []
    with db.engine.begin() as conn:
        for cond, order in parts:
            ids = select(t.c.id).where(cond).order_by(*order).limit(limit - len(out))
            if db.skip_locked:
                ids = ids.with_for_update(skip_locked=True)
            stmt = (
                update(t)
                .where(t.c.id.in_(ids.scalar_subquery()))
                .values(next_retry_at=now + lease_for, updated_at=now)
                .returning(
                    t.c.id, t.c.event_id, cast(t.c.payload, Text), t.c.retry_count, t.c.created_at
                )
            )
            rows = sorted(conn.execute(stmt).all(), key=lambda r: int(r[0]))
            out += [
                (int(r[0]), str(r[1]), str(r[2]).encode("utf-8"), int(r[3]), aware(r[4]))
                for r in rows
            ]
            if len(out) >= limit:
                break
    return out


def hold(
    engine: Engine, read: Callable[[Connection], list[R]], lease_for: timedelta
) -> tuple[list[R], Connection | None]:
    """PostgreSQL's held lease: ``read`` (a ``SELECT ... FOR NO KEY UPDATE
    SKIP LOCKED``) in a transaction left open with the rows' locks, and its
    connection; none when no row was found (the transaction ended).

    The server ends the transaction once it has been idle ``lease_for``
    (``idle_in_transaction_session_timeout``): a worker that dies lets go
    of its rows at once because its connection closes, but one whose host
    died or was cut off sends nothing, and the server would otherwise keep
    the rows locked, skipped by every other worker, until its TCP keepalive
    gives up (two hours and more by default)."""
    conn = engine.connect()
    try:
        conn.begin()
        ms = max(1000, int(lease_for.total_seconds() * 1000))
        conn.exec_driver_sql(f"SET LOCAL idle_in_transaction_session_timeout = {ms}")
        rows = read(conn)
    except BaseException:
        conn.close()  # rolls back
        raise
    if not rows:
        conn.close()
        return rows, None
    return rows, conn


def lease_ended(e: BaseException) -> bool:
    """``e`` is PostgreSQL ending a held lease idle longer than its lease
    (``idle_in_transaction_session_timeout``, SQLSTATE 25P03)."""
    return getattr(getattr(e, "orig", None), "sqlstate", None) == "25P03"


def commit_held(conn: Connection, write: Callable[[Connection], object]) -> None:
    """``write`` in a held lease's transaction, committed (its locks go with
    it), the connection given back either way."""
    try:
        write(conn)
        conn.commit()
    finally:
        conn.close()


def aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)  # SQLite keeps no zone
