"""``user_activity_dispatch_outbox``: the dispatcher's side.

Rows are leased per target like the source outbox's (``next_retry_at``
moved a lease ahead in one ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE
SKIP LOCKED)`` on PostgreSQL), so several dispatchers never send one row at
once and no transaction stays open while a batch is on the network. Each
row is then marked by its own outcome: DISPATCHED with ``dispatched_at``;
FAILED with ``retry_count + 1`` and ``next_retry_at`` by ``DISPATCH_RETRY``
(a ``Retry-After`` as the minimum); parked (FAILED, no ``next_retry_at``)
after ``max_attempts`` or a permanent rejection, until an operator replays
it. A configuration error (401 / 403) is retried, never parked.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, select, update

from estat.retry import RetryPolicy
from estat.store.db import Database
from estat.store.lease import aware, due, lease
from estat.store.schema import ERROR_MAX
from estat.store.schema import user_activity_dispatch_outbox as T

#: 10 s x 2^min(retry_count, 10), at most 10 min, equal jitter (DISPATCH_RETRY_*)
DISPATCH_RETRY = RetryPolicy(base=10.0, cap=600.0, exponent_cap=10, jitter="equal")


@dataclass(frozen=True, slots=True)
class DispatchRow:
    id: int
    event_id: str
    payload: bytes  # the stored event's JSON
    retry_count: int
    created_at: datetime  # when the store consumer enqueued it


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

    def lease(self, target: str, limit: int, now: datetime) -> list[DispatchRow]:
        where = _due(target, now)
        return [DispatchRow(*r) for r in lease(self.db, T, where, limit, now, self.lease_for)]

    def mark(
        self,
        delivered: Sequence[DispatchRow],
        retry: Sequence[tuple[DispatchRow, str, float, bool]],
        rejected: Sequence[tuple[DispatchRow, str]],
        now: datetime,
    ) -> Marked:
        """One transaction: ``delivered`` rows DISPATCHED; ``retry`` rows
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
        with self.db.engine.begin() as conn:
            if delivered:
                conn.execute(
                    update(T)
                    .where(T.c.id.in_([r.id for r in delivered]))
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
        return Marked(len(delivered), scheduled, parked)

    def replay(
        self,
        limit: int,
        now: datetime,
        *,
        target: str | None = None,
        created_from: datetime | None = None,
        created_to: datetime | None = None,
        dry_run: bool = False,
    ) -> int:
        """An operator's replay: up to ``limit`` FAILED rows (parked ones and
        those waiting for their backoff), oldest first, PENDING and due now
        with their attempts reset (the cause was fixed: each gets the whole
        retry policy again); ``dry_run`` counts them only. ``from``
        inclusive, ``to`` exclusive, on ``created_at``."""
        cond = T.c.status == "FAILED"
        if target is not None:
            cond = and_(cond, T.c.dispatch_target == target)
        if created_from is not None:
            cond = and_(cond, T.c.created_at >= created_from)
        if created_to is not None:
            cond = and_(cond, T.c.created_at < created_to)
        ids = select(T.c.id).where(cond).order_by(T.c.id).limit(limit)
        if dry_run:
            with self.db.engine.connect() as conn:
                n = conn.execute(select(func.count()).select_from(ids.subquery())).scalar_one()
                return int(n)
        with self.db.engine.begin() as conn:
            res = conn.execute(
                update(T)
                .where(T.c.id.in_(ids.scalar_subquery()))
                .values(status="PENDING", retry_count=0, next_retry_at=None, updated_at=now)
            )
            return int(res.rowcount)

    def summary(self, now: datetime) -> dict[str, dict[str, Any]]:
        """target → rows by status (PARKED: FAILED with no next retry),
        the highest retry count, and the oldest due row's creation."""
        parked = and_(T.c.status == "FAILED", T.c.next_retry_at.is_(None))
        out: dict[str, dict[str, Any]] = {}
        with self.db.engine.connect() as conn:
            for target, status, is_parked, n, mx in conn.execute(
                select(
                    T.c.dispatch_target, T.c.status, parked, func.count(), func.max(T.c.retry_count)
                ).group_by(T.c.dispatch_target, T.c.status, parked)
            ):
                row = out.setdefault(str(target), {"maxRetryCount": 0, "oldestDue": None})
                key = "PARKED" if is_parked else str(status)
                row[key] = row.get(key, 0) + int(n)
                row["maxRetryCount"] = max(row["maxRetryCount"], int(mx or 0))
            for target, at in conn.execute(
                select(T.c.dispatch_target, func.min(T.c.created_at))
                .where(due(T, now))
                .group_by(T.c.dispatch_target)
            ):
                if at is not None and str(target) in out:
                    out[str(target)]["oldestDue"] = aware(at)
        return out

    def counts(self) -> dict[tuple[str, str], int]:
        """(target, status) → rows."""
        stmt = select(T.c.dispatch_target, T.c.status, func.count()).group_by(
            T.c.dispatch_target, T.c.status
        )
        with self.db.engine.connect() as conn:
            return {(t, s): int(n) for t, s, n in conn.execute(stmt)}
