"""The dispatch outbox's dispatcher side on SQLite and PostgreSQL: lease per
target, mark each row by its own outcome, backoff, parking, no row leased
twice by concurrent dispatchers."""

from __future__ import annotations

import random
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from estat.store.db import Database
from estat.store.dispatch import DispatchOutbox
from estat.store.events import EventStore
from estat.store.rows import encode, event_row
from estat.store.schema import user_activity_dispatch_outbox as T
from tests.store.test_store import rec


def stored(db: Database, n: int, targets: list[str]) -> list[str]:
    records = [rec() for _ in range(n)]
    EventStore(db, targets).store(
        [event_row(r) for r in records], [encode(r).decode() for r in records]
    )
    return [r.event_id for r in records]


def rows(db: Database) -> dict[tuple[str, str], dict[str, object]]:
    with db.engine.connect() as conn:
        return {(r.event_id, r.dispatch_target): dict(r._mapping) for r in conn.execute(select(T))}


def counts(db: Database) -> dict[tuple[str, str], int]:
    """(target, status) → rows."""
    return dict(Counter((str(r["dispatch_target"]), str(r["status"])) for r in rows(db).values()))


def test_lease_is_per_target_and_a_leased_row_is_not_due(db: Database) -> None:
    ids = stored(db, 5, ["POSTHOG", "WEBHOOK"])
    box = DispatchOutbox(db)
    now = datetime.now(UTC)
    first = box.lease("POSTHOG", 3, now)
    got = first.rows
    assert [r.event_id for r in got] == ids[:3]
    assert b'"event_id"' in got[0].payload  # the stored event's JSON
    second = box.lease("POSTHOG", 10, now)
    assert [r.event_id for r in second.rows] == ids[3:]
    assert box.lease("POSTHOG", 10, now).rows == []  # all leased
    webhook = box.lease("WEBHOOK", 10, now)
    assert len(webhook.rows) == 5  # another target's rows are its own
    if db.dialect == "sqlite":
        # a lease that ran out (the dispatcher died): due again
        assert len(box.lease("POSTHOG", 10, now + timedelta(minutes=2)).rows) == 5
    else:
        # the rows are locked by the lease's transaction, whatever the time
        assert box.lease("POSTHOG", 10, now + timedelta(minutes=2)).rows == []
        second.conn.close()  # type: ignore[union-attr]  # the dispatcher died: free at once
        freed = box.lease("POSTHOG", 10, now)
        assert len(freed.rows) == 2
        box.release(freed, now)
    box.release(first, now)  # given back unmarked: due now
    again = box.lease("POSTHOG", 10, now + timedelta(seconds=1))
    assert [r.event_id for r in again.rows][:3] == ids[:3]
    for lease in (again, webhook):
        box.release(lease, now)


def test_each_row_is_marked_by_its_own_outcome(db: Database) -> None:
    ids = stored(db, 4, ["POSTHOG"])
    box = DispatchOutbox(db, max_attempts=3, rng=random.Random(1))
    now = datetime.now(UTC)
    leased = box.lease("POSTHOG", 10, now)
    a, b, c, d = leased.rows
    m = box.mark(
        [a],
        [(b, "HTTP 500", 0.0, False), (c, "HTTP 429", 900.0, False)],
        [(d, "HTTP 400: invalid")],
        now,
        leased,
    )
    assert leased.done
    assert leased.conn is None
    assert (m.delivered, m.scheduled, m.parked) == (1, 2, 1)
    r = rows(db)
    assert r[(ids[0], "POSTHOG")]["status"] == "DISPATCHED"
    assert r[(ids[0], "POSTHOG")]["dispatched_at"] is not None
    rb = r[(ids[1], "POSTHOG")]
    assert (rb["status"], rb["retry_count"], rb["last_error"]) == ("FAILED", 1, "HTTP 500")
    due_b = rb["next_retry_at"]
    assert isinstance(due_b, datetime)
    # first retry: 10 s with equal jitter (5..10 s)
    assert timedelta(seconds=5) <= due_b.replace(tzinfo=UTC) - now <= timedelta(seconds=10)
    due_c = r[(ids[2], "POSTHOG")]["next_retry_at"]
    assert isinstance(due_c, datetime)
    assert due_c.replace(tzinfo=UTC) - now >= timedelta(seconds=900)  # Retry-After is the minimum
    rd = r[(ids[3], "POSTHOG")]
    assert (rd["status"], rd["next_retry_at"]) == ("FAILED", None)  # parked at once
    assert str(rd["last_error"]).startswith("rejected: HTTP 400")


def test_attempts_spent_park_a_row_but_a_configuration_error_never_does(db: Database) -> None:
    ids = stored(db, 2, ["POSTHOG"])
    box = DispatchOutbox(db, max_attempts=2)
    t = datetime.now(UTC)
    for _ in range(4):
        t += timedelta(hours=1)  # every row due again
        leased = box.lease("POSTHOG", 10, t)
        retry = [(r, "HTTP 401", 0.0, r.event_id == ids[1]) for r in leased.rows]
        box.mark([], retry, [], t, leased)
    r = rows(db)
    assert r[(ids[0], "POSTHOG")]["next_retry_at"] is None  # parked after 2 attempts
    assert r[(ids[0], "POSTHOG")]["retry_count"] == 2
    assert r[(ids[1], "POSTHOG")]["next_retry_at"] is not None  # still retried
    assert r[(ids[1], "POSTHOG")]["retry_count"] == 4
    assert counts(db) == {("POSTHOG", "FAILED"): 2}


def test_two_dispatchers_never_lease_one_row(db: Database) -> None:
    if db.dialect == "sqlite":
        pytest.skip("SQLite has a single writer")
    stored(db, 300, ["POSTHOG"])
    box = DispatchOutbox(db)
    now = datetime.now(UTC)
    got: list[list[int]] = [[], []]

    def dispatcher(i: int) -> None:
        while (leased := box.lease("POSTHOG", 7, now)).rows:
            got[i] += [r.id for r in leased.rows]
            box.mark(leased.rows, [], [], now, leased)

    threads = [threading.Thread(target=dispatcher, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got[0]) + len(got[1]) == 300
    assert not set(got[0]) & set(got[1])


def test_due_failed_rows_come_first_and_a_lease_holds_only_the_rows_it_returns(
    db: Database,
) -> None:
    ids = stored(db, 10, ["POSTHOG"])
    box = DispatchOutbox(db, rng=random.Random(1))
    t = datetime.now(UTC)
    first = box.lease("POSTHOG", 3, t)
    box.mark([], [(r, "HTTP 500", 0.0, False) for r in first.rows], [], t, first)
    later = t + timedelta(hours=1)  # the three FAILED rows are due again
    a = box.lease("POSTHOG", 5, later)
    assert [r.event_id for r in a.rows] == ids[:3] + ids[3:5]  # FAILED first, then PENDING
    assert [r.retry_count for r in a.rows] == [1, 1, 1, 0, 0]
    # another dispatcher meanwhile gets every other due row: none is held
    # by the first lease without being sent
    b = box.lease("POSTHOG", 10, later)
    assert [r.event_id for r in b.rows] == ids[5:]
    for lease in (a, b):
        box.mark(lease.rows, [], [], later, lease)
    assert counts(db) == {("POSTHOG", "DISPATCHED"): 10}


def test_a_discard_deletes_only_the_target_rows_still_to_be_sent(db: Database) -> None:
    """A target taken out of DISPATCH_TARGETS: its PENDING, FAILED and parked
    rows go; its DISPATCHED rows, another target's rows and the events stay;
    a row a dispatcher holds in a lease (PostgreSQL) is left to it."""
    ids = stored(db, 6, ["POSTHOG", "WEBHOOK"])
    box = DispatchOutbox(db, max_attempts=1)
    now = datetime.now(UTC)
    leased = box.lease("WEBHOOK", 3, now)
    a, b, _ = leased.rows
    box.mark([a], [(b, "HTTP 500", 0.0, False)], [], now, leased)  # b parked: 1 attempt
    assert rows(db)[(b.event_id, "WEBHOOK")]["next_retry_at"] is None
    assert box.discard("WEBHOOK", 100, dry_run=True) == 5  # b, c, and three PENDING
    held = box.lease("WEBHOOK", 1, now)  # c again
    if db.dialect == "postgresql":
        assert box.discard("WEBHOOK", 2) == 2  # not the held one
        assert box.discard("WEBHOOK", 100) == 2
        box.release(held, now)
        assert box.discard("WEBHOOK", 100) == 1
    else:
        assert box.discard("WEBHOOK", 2) == 2
        assert box.discard("WEBHOOK", 100) == 3
    left = rows(db)
    assert {k for k in left if k[1] == "WEBHOOK"} == {(a.event_id, "WEBHOOK")}  # DISPATCHED
    assert {k[0] for k in left if k[1] == "POSTHOG"} == set(ids)
    assert box.discard("WEBHOOK", 100) == 0
