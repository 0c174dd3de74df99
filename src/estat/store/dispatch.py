"""``user_activity_dispatch_outbox``: the dispatcher's side.

Rows are leased per target, due FAILED rows first, then PENDING ones, the
oldest first. On PostgreSQL a lease is a transaction holding the rows'
locks (``SELECT ... FOR NO KEY UPDATE SKIP LOCKED``) until they are marked:
several dispatchers never send one row at once, a row is never written
twice per attempt, and the rows of a dispatcher that dies are free the
moment its connection drops, or once the transaction has been idle a
lease when its host died or was cut off (``hold``). The transaction lasts
one send: at most the destination's timeouts. SQLite has one writer, so there a lease moves
``next_retry_at`` a lease ahead instead (``store/lease.py``) and no
transaction stays open while a batch is on the network. Each row is then
marked by its own outcome: DISPATCHED with ``dispatched_at``;
FAILED with ``retry_count + 1`` and ``next_retry_at`` by ``DISPATCH_RETRY``
(a ``Retry-After`` as the minimum); parked (FAILED, no ``next_retry_at``)
after ``max_attempts`` or a permanent rejection, until an operator replays
it. A configuration error (401 / 403) is retried, never parked.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    and_,
    bindparam,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from estat.retry import RetryPolicy
from estat.store.budget import estimated_rows, exact_or_estimated
from estat.store.db import Database
from estat.store.lease import aware, commit_held, due, hold, lease, oldest_in
from estat.store.schema import ERROR_MAX
from estat.store.schema import user_activity_dispatch_outbox as T

#: 10 s x 2^min(retry_count, 10), at most 10 min, equal jitter (DISPATCH_RETRY_*)
DISPATCH_RETRY = RetryPolicy(base=10.0, cap=600.0, exponent_cap=10, jitter="equal")


def estimated_by_status(conn: Connection) -> dict[str, dict[str, Any]]:
    """``by_status`` when counting every row overran its budget: the rows
    still to be sent exactly (their index), DISPATCHED estimated
    (``estimated``), the highest retry count of the rows still to be sent."""
    out = by_status(conn, T.c.status.in_(("PENDING", "FAILED")))
    for target, rows in estimated_rows(conn, T.name, "dispatch_target").items():
        if target:
            row = out.setdefault(target, {"maxRetryCount": 0, "oldestDue": None})
            still = sum(row.get(k, 0) for k in ("PENDING", "FAILED", "PARKED"))
            row["DISPATCHED"] = max(0, rows - still)
    for row in out.values():
        row["estimated"] = True
    return out


def by_status(conn: Connection, where: Any) -> dict[str, dict[str, Any]]:
    """target → rows by status (PARKED apart) and the highest retry count,
    of the rows ``where`` says (all: ``None``)."""
    parked = and_(T.c.status == "FAILED", T.c.next_retry_at.is_(None))
    stmt = select(
        T.c.dispatch_target, T.c.status, parked, func.count(), func.max(T.c.retry_count)
    ).group_by(T.c.dispatch_target, T.c.status, parked)
    if where is not None:
        stmt = stmt.where(where)
    out: dict[str, dict[str, Any]] = {}
    for target, status, is_parked, n, mx in conn.execute(stmt):
        row = out.setdefault(str(target), {"maxRetryCount": 0, "oldestDue": None})
        key = "PARKED" if is_parked else str(status)
        row[key] = row.get(key, 0) + int(n)
        row["maxRetryCount"] = max(row["maxRetryCount"], int(mx or 0))
    return out


class Replayed(NamedTuple):
    rows: int
    last_id: int | None  # the highest id replayed (the next call's ``after_id``)


class DispatchRow(NamedTuple):
    id: int
    event_id: str
    payload: bytes  # the stored event's JSON
    retry_count: int
    created_at: datetime  # when the store consumer enqueued it


# The PostgreSQL lease in plain SQL on the driver's connection, binary
# results straight into ``DispatchRow`` tuples: the rows a lease returns are
# the dispatcher's hottest path, and SQLAlchemy's statement and row
# machinery cost more CPU per row than the database's own work for it
# (``docs/benchmarks.md``). Due FAILED rows first, then PENDING ones, each
# from its own index range; the second query asks only for what the first
# left, so no row is locked and not sent.
#
# Only the partial (dispatch_target, status, id) index can give the order
# asked for: the target as a one-element ``= ANY`` (which the planner does not
# fold into an equality, so ``ORDER BY dispatch_target, id`` is an order the
# primary key cannot give). With a plain ``ORDER BY id`` the planner may walk
# the primary key from the first row, past every DISPATCHED one, whenever its
# statistics were taken while most rows were PENDING (a backlog after an
# outage): each lease then reads the whole sent history and the drain slows
# to a crawl until the next ANALYZE (``tests/store/test_scale_reads.py``).
_COLS = (
    "SELECT id, event_id, convert_to(payload::text, 'UTF8'), retry_count, created_at"
    " FROM user_activity_dispatch_outbox WHERE dispatch_target = ANY(ARRAY[%(t)s]) AND "
)
_LOCK = " ORDER BY dispatch_target, id LIMIT %(n)s FOR NO KEY UPDATE SKIP LOCKED"
LEASE_FAILED = _COLS + "status = 'FAILED' AND next_retry_at <= %(now)s" + _LOCK
LEASE_PENDING = (
    _COLS + "status = 'PENDING' AND (next_retry_at IS NULL OR next_retry_at <= %(now)s)" + _LOCK
)

#: one array parameter: planned once, however many rows
MARK_DISPATCHED = (
    "UPDATE user_activity_dispatch_outbox SET status = 'DISPATCHED', dispatched_at = %(now)s,"
    " next_retry_at = NULL, last_error = NULL, updated_at = %(now)s WHERE id = ANY(%(ids)s)"
)


@contextlib.contextmanager
def _driver_cursor(conn: Connection) -> Iterator[Any]:
    """A binary cursor on the driver's connection. Its errors are raised as
    SQLAlchemy's (what every caller handles as a database failure), and a
    connection that broke is dropped from the pool."""
    import psycopg  # PostgreSQL only

    raw = conn.connection.driver_connection
    assert raw is not None
    try:
        with raw.cursor(binary=True) as cur:
            yield cur
    except psycopg.Error as e:
        broken = bool(raw.broken or raw.closed)
        if broken:
            conn.invalidate(e)
        raise DBAPIError.instance(
            None, None, e, psycopg.Error, connection_invalidated=broken
        ) from e


def _lease_pg(conn: Connection, target: str, limit: int, now: datetime) -> list[DispatchRow]:
    out: list[DispatchRow] = []
    with _driver_cursor(conn) as cur:
        for sql in (LEASE_FAILED, LEASE_PENDING):
            cur.execute(sql, {"t": target, "n": limit - len(out), "now": now})
            out += [DispatchRow(*r) for r in cur.fetchall()]
            if len(out) >= limit:
                break
    return out


@dataclass(slots=True)
class Leased:
    """Leased rows; on PostgreSQL the transaction that holds their locks
    (``mark`` commits it, ``release`` rolls it back)."""

    rows: list[DispatchRow]
    conn: Connection | None = None
    done: bool = False  # marked


@dataclass(frozen=True, slots=True)
class Marked:
    delivered: int = 0
    scheduled: int = 0
    parked: int = 0


def _due(target: str, now: datetime) -> Any:
    return and_(T.c.dispatch_target == target, due(T, now))


class DispatchOutbox:
    def __init__(
        self,
        db: Database,
        *,
        max_attempts: int = 20,
        lease_seconds: float = 60.0,
        policy: RetryPolicy = DISPATCH_RETRY,
        rng: random.Random | None = None,
    ) -> None:
        self.db = db
        self.max_attempts = max_attempts
        self.lease_for = timedelta(seconds=lease_seconds)
        self.policy = policy
        self.rng = rng or random.Random()
        #: where leases take their connection (PostgreSQL: held until marked)
        self.lanes: Engine = db.engine

    def reserve(self, lanes: int) -> None:
        """PostgreSQL: ``lanes`` connections for the leases alone, so each
        lane with a lease open holds one of its own (``Database.reserve``)."""
        if self.db.skip_locked:
            self.lanes = self.db.reserve(lanes)

    def lease(self, target: str, limit: int, now: datetime) -> Leased:
        if not self.db.skip_locked:
            where = _due(target, now)
            return Leased(
                [DispatchRow(*r) for r in lease(self.db, T, where, limit, now, self.lease_for)]
            )
        rows, conn = hold(
            self.lanes, lambda conn: _lease_pg(conn, target, limit, now), self.lease_for
        )
        return Leased(rows, conn)

    def release(self, leased: Leased, now: datetime) -> None:
        """Give leased rows back unmarked (a send that could not finish):
        due again now."""
        if leased.done:
            return
        if leased.conn is not None:
            leased.conn.close()  # rolls back: the locks go
            leased.conn = None
            return
        if leased.rows:
            with self.db.engine.begin() as conn:
                conn.execute(
                    update(T)
                    .where(T.c.id.in_([r.id for r in leased.rows]))
                    .values(next_retry_at=now, updated_at=now)
                )

    def mark(
        self,
        delivered: Sequence[DispatchRow],
        retry: Sequence[tuple[DispatchRow, str, float, bool]],
        rejected: Sequence[tuple[DispatchRow, str]],
        now: datetime,
        leased: Leased | None = None,
        untouched: Sequence[DispatchRow] = (),
    ) -> Marked:
        """One transaction (the lease's, on PostgreSQL): ``untouched`` rows
        (not sent) as they were; ``delivered`` rows DISPATCHED; ``retry`` rows
        (row, reason, not-before seconds, configuration error) FAILED with
        the next try, or parked once their attempts are spent (never for a
        configuration error); ``rejected`` rows parked with the reason."""
        failed: list[dict[str, Any]] = []
        scheduled = parked = 0
        for row, reason, not_before, config_error in retry:
            attempts = row.retry_count + 1
            if attempts >= self.max_attempts and not config_error:
                nxt = None
                parked += 1
            else:
                delay = self.policy.delay(attempts, self.rng, not_before=not_before)
                nxt = now + timedelta(seconds=delay)
                scheduled += 1
            failed.append({"i": row.id, "n": attempts, "at": nxt, "e": reason[:ERROR_MAX]})
        for row, reason in rejected:
            failed.append(
                {
                    "i": row.id,
                    "n": row.retry_count + 1,
                    "at": None,
                    "e": f"rejected: {reason}"[:ERROR_MAX],
                }
            )
            parked += 1
        held = leased.conn if leased is not None else None
        if held is not None:
            assert leased is not None
            leased.conn = None  # committed or rolled back here, either way
            # the untouched rows' locks go with the commit
            commit_held(held, lambda conn: self._write(conn, delivered, failed, now))
        else:
            with self.db.engine.begin() as conn:
                self._write(conn, delivered, failed, now)
                if untouched:  # leased ahead: due again, as they were
                    conn.execute(
                        update(T)
                        .where(T.c.id.in_([r.id for r in untouched]))
                        .values(next_retry_at=now, updated_at=now)
                    )
        if leased is not None:
            leased.done = True
        return Marked(len(delivered), scheduled, parked)

    @staticmethod
    def _write(
        conn: Connection,
        delivered: Sequence[DispatchRow],
        failed: list[dict[str, Any]],
        now: datetime,
    ) -> None:
        if delivered:
            ids = [r.id for r in delivered]
            if conn.dialect.name == "postgresql":
                with _driver_cursor(conn) as cur:
                    cur.execute(MARK_DISPATCHED, {"ids": ids, "now": now})
            else:
                conn.execute(
                    update(T)
                    .where(T.c.id.in_(ids))
                    .values(
                        status="DISPATCHED",
                        dispatched_at=now,
                        next_retry_at=None,
                        last_error=None,
                        updated_at=now,
                    )
                )
        if failed:
            conn.execute(
                update(T)
                .where(T.c.id == bindparam("i"))
                .values(
                    status="FAILED",
                    retry_count=bindparam("n"),
                    next_retry_at=bindparam("at"),
                    last_error=bindparam("e"),
                    updated_at=now,
                ),
                failed,
            )

    def replay(
        self,
        limit: int,
        now: datetime,
        *,
        target: str | None = None,
        created_from: datetime | None = None,
        created_to: datetime | None = None,
        after_id: int | None = None,
        dry_run: bool = False,
    ) -> Replayed:
        """An operator's replay: up to ``limit`` FAILED rows (parked ones and
        those waiting for their backoff), oldest first, PENDING and due now
        with their attempts reset (the cause was fixed: each gets the whole
        retry policy again); ``dry_run`` counts them only. ``from``
        inclusive, ``to`` exclusive, on ``created_at``; ``after_id``: rows
        after that id only (the last one of the previous call: a run of
        calls takes each row once, never one that failed again since)."""
        cond, order = oldest_in(self.db, T, "FAILED")
        if target is not None:
            cond = and_(cond, T.c.dispatch_target == target)
        if created_from is not None:
            cond = and_(cond, T.c.created_at >= created_from)
        if created_to is not None:
            cond = and_(cond, T.c.created_at < created_to)
        if after_id is not None:
            cond = and_(cond, T.c.id > after_id)
        ids = select(T.c.id).where(cond).order_by(*order).limit(limit)
        if dry_run:
            with self.db.engine.connect() as conn:
                sub = ids.subquery()
                n, last = conn.execute(select(func.count(), func.max(sub.c.id))).one()
                return Replayed(int(n), last)
        with self.db.engine.begin() as conn:
            done = (
                conn.execute(
                    update(T)
                    .where(T.c.id.in_(ids.scalar_subquery()))
                    .values(status="PENDING", retry_count=0, next_retry_at=None, updated_at=now)
                    .returning(T.c.id)
                )
                .scalars()
                .all()
            )
            return Replayed(len(done), max(done, default=None))

    def discard(self, target: str, limit: int, *, dry_run: bool = False) -> int:
        """An operator's discard, for a target no longer configured: up to
        ``limit`` of its rows still to be sent (PENDING, FAILED, parked)
        deleted; ``dry_run`` counts them only. The events stay in the store
        and DISPATCHED rows are left to the retention. On PostgreSQL a row a
        dispatcher holds in a lease is skipped (it marks it)."""
        cond = and_(T.c.dispatch_target == target, T.c.status.in_(("PENDING", "FAILED")))
        ids = select(T.c.id).where(cond).limit(limit)
        if dry_run:
            with self.db.engine.connect() as conn:
                n = conn.execute(select(func.count()).select_from(ids.subquery())).scalar_one()
                return int(n)
        if self.db.skip_locked:
            ids = ids.with_for_update(skip_locked=True)
        with self.db.engine.begin() as conn:
            return int(conn.execute(delete(T).where(T.c.id.in_(ids.scalar_subquery()))).rowcount)

    def summary(self, now: datetime) -> dict[str, dict[str, Any]]:
        """target → rows by status (PARKED: FAILED with no next retry),
        the highest retry count, and the oldest due row's creation. Exact
        within ``SUMMARY_BUDGET``; past it (PostgreSQL, a large outbox) the
        rows still to be sent exactly, DISPATCHED estimated and
        ``maxRetryCount`` of the rows still to be sent (``estimated``)."""
        out, _ = exact_or_estimated(self.db, lambda c: by_status(c, None), estimated_by_status)
        with self.db.engine.connect() as conn:
            for target, at in conn.execute(
                select(T.c.dispatch_target, func.min(T.c.created_at))
                .where(due(T, now))
                .group_by(T.c.dispatch_target)
            ):
                if at is not None and str(target) in out:
                    out[str(target)]["oldestDue"] = aware(at)
        return out
