"""The source outbox (``user_activity_source_outbox``): events that must
reach the bus, durable in the database until they have.

States (seed 004 §7-1): PENDING → PUBLISHED, PENDING → FAILED, FAILED →
PUBLISHED, FAILED → FAILED. A row is *due* when it is PENDING with no
``next_retry_at`` (or one that has passed), or FAILED with a
``next_retry_at`` that has passed; FAILED with no ``next_retry_at`` is
*parked* until an operator replays it.

Relays *lease* due rows. On PostgreSQL a relay's lease (``take``) is a
transaction holding the rows' locks (``SELECT ... FOR NO KEY UPDATE SKIP
LOCKED``) until they are marked, as the dispatcher's is: two relays never
take one row, a row is written once per attempt (its mark), and the rows of
a relay that dies are free the moment its connection drops (and, when
its host died or was cut off, once the transaction has been idle
``lease_seconds``: ``hold``). The transaction lasts one publish to the bus. On SQLite (one writer), and for
an operator's replay, a lease is one statement that moves the rows'
``next_retry_at`` a lease ahead and returns them: no transaction stays open
while the bus is called; a relay that dies leaves its rows to come due
again when the lease ends; one that stops releases them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Text, and_, bindparam, cast, func, or_, select, update

from estat.model import EventRecord
from estat.retry import RetryPolicy
from estat.store.budget import estimated_rows, exact_or_estimated
from estat.store.db import Database
from estat.store.lease import commit_held, due, due_ranges, hold, lease, oldest_in
from estat.store.rows import encode, outbox_row
from estat.store.schema import ERROR_MAX, user_activity_source_outbox

T = user_activity_source_outbox

#: 10 s x 2^min(retry_count, 6): 10 s … 640 s, jittered
OUTBOX_RETRY = RetryPolicy(base=10.0, cap=640.0, exponent_cap=6, jitter="equal")


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    event_id: str
    payload: bytes
    retry_count: int


@dataclass(slots=True)
class Lease:
    """A relay's leased rows; on PostgreSQL the transaction holding their
    locks (a mark commits it, ``release`` rolls it back)."""

    rows: list[OutboxRow] = field(default_factory=list)
    conn: Connection | None = None
    held: bool = False  # PostgreSQL: by row locks, nothing written
    done: bool = False  # marked


@dataclass(frozen=True, slots=True)
class Enqueued:
    inserted: int
    duplicates: int


def utcnow(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def enqueue_rows(
    conn: Connection,
    records: Sequence[EventRecord],
    *,
    status: str = "PENDING",
    next_retry_at: datetime | None = None,
    last_error: str | None = None,
    dialect: str | None = None,
) -> Enqueued:
    """Outbox rows for ``records`` on ``conn``, inside the caller's
    transaction; an ``event_id`` already in the outbox is a duplicate."""
    if not records:
        return Enqueued(0, 0)
    from sqlalchemy.dialects import postgresql, sqlite

    name = dialect or conn.dialect.name
    ins = (postgresql.insert if name == "postgresql" else sqlite.insert)(T)
    stmt = ins.on_conflict_do_nothing(index_elements=["event_id"]).returning(T.c.event_id)
    rows: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec.event_id in rows:
            continue
        row = outbox_row(rec, encode(rec))
        row["status"] = status
        row["next_retry_at"] = next_retry_at
        row["last_error"] = last_error[:ERROR_MAX] if last_error else None
        rows[rec.event_id] = row
    inserted = len(conn.execute(stmt, list(rows.values())).all())
    return Enqueued(inserted, len(records) - inserted)


def _due(now: datetime) -> Any:
    return due(T, now)


@dataclass(frozen=True, slots=True)
class ReplayFilter:
    """Which rows an operator's replay takes: FAILED ones (parked included)
    and due PENDING ones, optionally of one event name and a ``created_at``
    range (from inclusive, to exclusive)."""

    event_name: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None

    def where(self, now: datetime) -> Any:
        cond = or_(
            T.c.status == "FAILED",
            and_(
                T.c.status == "PENDING",
                or_(T.c.next_retry_at.is_(None), T.c.next_retry_at <= now),
            ),
        )
        if self.event_name is not None:
            cond = and_(cond, T.c.event_name == self.event_name)
        if self.created_from is not None:
            cond = and_(cond, T.c.created_at >= self.created_from)
        if self.created_to is not None:
            cond = and_(cond, T.c.created_at < self.created_to)
        return cond


class SourceOutbox:
    def __init__(
        self,
        db: Database,
        *,
        max_attempts: int = 10,
        lease_seconds: float = 60.0,
        policy: RetryPolicy = OUTBOX_RETRY,
        rng: random.Random | None = None,
    ) -> None:
        self.db = db
        self.max_attempts = max_attempts
        self.lease_for = timedelta(seconds=lease_seconds)
        self.policy = policy
        self.rng = rng or random.Random()

    # -- writing ---------------------------------------------------------------
    def enqueue(
        self,
        records: Sequence[EventRecord],
        *,
        status: str = "PENDING",
        next_retry_at: datetime | None = None,
        last_error: str | None = None,
    ) -> Enqueued:
        with self.db.engine.begin() as conn:
            return enqueue_rows(
                conn,
                records,
                status=status,
                next_retry_at=next_retry_at,
                last_error=last_error,
                dialect=self.db.dialect,
            )

    # -- the relay's side ------------------------------------------------------
    def take(self, limit: int, now: datetime) -> Lease:
        """The relay's lease: due rows, oldest first. PostgreSQL: locked by
        the lease's transaction, nothing written; SQLite: ``lease``."""
        if not self.db.skip_locked:
            return Lease(self.lease(limit, now))

        def read(conn: Connection) -> list[OutboxRow]:
            rows: list[OutboxRow] = []
            for cond, order in due_ranges(T, now):
                stmt = (
                    select(T.c.id, T.c.event_id, cast(T.c.payload, Text), T.c.retry_count)
                    .where(cond)
                    .order_by(*order)
                    .limit(limit - len(rows))
                    .with_for_update(skip_locked=True, key_share=True)
                )
                rows += [
                    OutboxRow(int(r[0]), str(r[1]), str(r[2]).encode("utf-8"), int(r[3]))
                    for r in conn.execute(stmt)
                ]
                if len(rows) >= limit:
                    break
            return rows

        rows, conn = hold(self.db.engine, read, self.lease_for)
        return Lease(rows, conn, held=True)

    def _write(self, lease: Lease | None, write: Callable[[Connection], object]) -> None:
        """``write`` in the lease's transaction (committed, its locks gone),
        or in one of its own."""
        held = lease.conn if lease is not None else None
        if held is None:
            with self.db.engine.begin() as conn:
                write(conn)
        else:
            assert lease is not None
            lease.conn = None  # committed or rolled back here, either way
            commit_held(held, write)
        if lease is not None:
            lease.done = True

    def lease(
        self, limit: int, now: datetime, replay: ReplayFilter | None = None
    ) -> list[OutboxRow]:
        """Due rows, oldest first, leased (``next_retry_at`` a lease ahead);
        with ``replay``, the rows an operator's replay takes instead."""
        if replay is None:
            where, ranges = _due(now), due_ranges(T, now)
        else:
            where, ranges = replay.where(now), None
        rows = lease(self.db, T, where, limit, now, self.lease_for, ranges)
        return [OutboxRow(*r[:4]) for r in rows]

    def mark_published(self, ids: Sequence[int], now: datetime, lease: Lease | None = None) -> None:
        if not ids:
            self.release([], now, lease)
            return
        self._write(
            lease,
            lambda conn: conn.execute(
                update(T)
                .where(T.c.id.in_(list(ids)))
                .values(
                    status="PUBLISHED",
                    published_at=now,
                    next_retry_at=None,
                    last_error=None,
                    updated_at=now,
                )
            ),
        )

    def mark_failed(
        self,
        rows: Sequence[OutboxRow],
        error: str,
        now: datetime,
        not_before: float = 0.0,
        lease: Lease | None = None,
    ) -> tuple[int, int]:
        """FAILED with ``retry_count + 1`` and the next try by the policy, or
        parked (no ``next_retry_at``) once ``max_attempts`` are spent.
        Returns (scheduled, parked)."""
        scheduled = parked = 0
        params = []
        for r in rows:
            attempts = r.retry_count + 1
            if attempts >= self.max_attempts:
                nxt = None
                parked += 1
            else:
                nxt = now + timedelta(
                    seconds=self.policy.delay(attempts, self.rng, not_before=not_before)
                )
                scheduled += 1
            params.append({"i": r.id, "n": attempts, "at": nxt})
        if params:
            stmt = (
                update(T)
                .where(T.c.id == bindparam("i"))
                .values(
                    status="FAILED",
                    retry_count=bindparam("n"),
                    next_retry_at=bindparam("at"),
                    last_error=error[:ERROR_MAX],
                    updated_at=now,
                )
            )
            self._write(lease, lambda conn: conn.execute(stmt, params))
        else:
            self.release([], now, lease)
        return scheduled, parked

    def release(self, ids: Sequence[int], now: datetime, lease: Lease | None = None) -> None:
        """Leased rows this relay will not publish: due again at once (a
        held lease's transaction rolled back: its locks go, nothing was
        written)."""
        if lease is not None and (lease.done or lease.held):
            if lease.conn is not None:
                lease.conn.close()  # rolls back
                lease.conn = None
            return
        if not ids:
            return
        with self.db.engine.begin() as conn:
            conn.execute(
                update(T).where(T.c.id.in_(list(ids))).values(next_retry_at=now, updated_at=now)
            )

    # -- reading ---------------------------------------------------------------
    def count_replayable(self, replay: ReplayFilter, now: datetime, limit: int) -> int:
        """How many rows a replay of ``limit`` would take (a dry run)."""
        ids = select(T.c.id).where(replay.where(now)).limit(limit).subquery()
        with self.db.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(ids)).scalar_one())

    def summary(self) -> dict[str, Any]:
        """Seed 004's ``{pendingCount, failedCount, publishedCount,
        maxRetryCount}``, with ``publishedCountEstimated``: exact within
        ``SUMMARY_BUDGET``; past it (PostgreSQL, a large outbox) PENDING and
        FAILED exactly, PUBLISHED estimated, ``maxRetryCount`` of the rows
        still to be published."""
        counts, estimated = exact_or_estimated(
            self.db, lambda c: by_status(c, None), estimated_by_status
        )
        return {
            "pendingCount": counts.get("PENDING", (0, 0))[0],
            "failedCount": counts.get("FAILED", (0, 0))[0],
            "publishedCount": counts.get("PUBLISHED", (0, 0))[0],
            "maxRetryCount": max((m for _, m in counts.values()), default=0),
            "publishedCountEstimated": estimated,
        }


def by_status(conn: Connection, where: Any) -> dict[str, tuple[int, int]]:
    """status → (rows, highest retry count) of the rows ``where`` says (all: ``None``)."""
    stmt = select(T.c.status, func.count(), func.max(T.c.retry_count)).group_by(T.c.status)
    if where is not None:
        stmt = stmt.where(where)
    return {s: (int(n), int(m or 0)) for s, n, m in conn.execute(stmt)}


def estimated_by_status(conn: Connection) -> dict[str, tuple[int, int]]:
    """``by_status`` when counting every row overran its budget: PENDING and
    FAILED exactly (their index), PUBLISHED estimated."""
    counts = by_status(conn, T.c.status.in_(("PENDING", "FAILED")))
    still = sum(n for n, _ in counts.values())
    counts["PUBLISHED"] = (max(0, estimated_rows(conn, T.name)[""] - still), 0)
    return counts


def requeue_failed(db: Database, limit: int, now: datetime) -> int:
    """FAILED rows (parked or waiting for their backoff), oldest first: due
    now, for the relay to publish (``estat outbox replay``). Their
    ``retry_count`` is kept; a parked row gets one more attempt."""
    cond, order = oldest_in(db, T, "FAILED")
    ids = select(T.c.id).where(cond).order_by(*order).limit(limit).scalar_subquery()
    with db.engine.begin() as conn:
        return int(
            conn.execute(
                update(T).where(T.c.id.in_(ids)).values(next_retry_at=now, updated_at=now)
            ).rowcount
        )
