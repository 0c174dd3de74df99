"""The admin summaries on PostgreSQL when counting every row takes longer
than ``SUMMARY_BUDGET`` (a large outbox): the rows still to be sent are
counted exactly, the finished ones estimated, and the answer says so;
within the budget every count is exact."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

import estat.store.budget as budget
from estat.store.db import Database
from estat.store.dispatch import DispatchOutbox
from estat.store.outbox import SourceOutbox

DISPATCH = (
    "INSERT INTO user_activity_dispatch_outbox (event_id, dispatch_target, payload, status, "
    "retry_count, next_retry_at, dispatched_at) SELECT :t || '-' || :s || :r || '-' || g, :t, "
    "'{}'::jsonb, :s, :r, CASE WHEN :due THEN now() END, "
    "CASE WHEN :s = 'DISPATCHED' THEN now() END FROM generate_series(1, :n) g"
)
SOURCE = (
    "INSERT INTO user_activity_source_outbox (event_id, event_name, event_version, "
    "occurred_at, payload, status, retry_count) SELECT :s || '-' || g, 'n', 'v1', now(), "
    "'{}'::jsonb, :s, :r FROM generate_series(1, :n) g"
)


@pytest.fixture
def big(pg_url: str) -> Iterator[Database]:
    """90,000 dispatch rows for two targets and 50,010 source rows, most of
    them finished, analysed as autovacuum would have."""
    db = Database(pg_url)
    db.upgrade()
    with db.engine.begin() as conn:
        for t, s, n, r, due in (
            ("POSTHOG", "DISPATCHED", 80_000, 0, False),
            ("POSTHOG", "PENDING", 50, 0, False),
            ("POSTHOG", "FAILED", 10, 3, True),  # waiting for a retry
            ("POSTHOG", "FAILED", 10, 20, False),  # parked
            ("WEBHOOK", "DISPATCHED", 10_000, 0, False),
            ("WEBHOOK", "PENDING", 5, 0, False),
        ):
            conn.execute(text(DISPATCH), {"t": t, "s": s, "n": n, "r": r, "due": due})
        for s, n, r in (("PUBLISHED", 50_000, 0), ("PENDING", 7, 0), ("FAILED", 3, 2)):
            conn.execute(text(SOURCE), {"s": s, "n": n, "r": r})
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE user_activity_dispatch_outbox, user_activity_source_outbox"))
    yield db
    db.close()


def test_within_the_budget_every_count_is_exact(big: Database) -> None:
    rows = DispatchOutbox(big).summary(datetime.now(UTC))
    assert "estimated" not in rows["POSTHOG"]
    assert (rows["POSTHOG"]["DISPATCHED"], rows["WEBHOOK"]["DISPATCHED"]) == (80_000, 10_000)
    assert SourceOutbox(big).summary() == {
        "pendingCount": 7, "failedCount": 3, "publishedCount": 50_000, "maxRetryCount": 2,
        "publishedCountEstimated": False,
    }  # fmt: skip


def test_past_the_budget_the_rows_to_send_are_exact_and_the_rest_estimated(
    big: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(budget, "SUMMARY_BUDGET", 0.001)  # 1 ms: no whole-table count fits
    rows = DispatchOutbox(big).summary(datetime.now(UTC))
    ph, hook = rows["POSTHOG"], rows["WEBHOOK"]
    assert ph["estimated"] is True
    assert hook["estimated"] is True
    assert (ph["PENDING"], ph["FAILED"], ph["PARKED"], hook["PENDING"]) == (50, 10, 10, 5)
    assert ph["maxRetryCount"] == 20  # of the rows still to be sent
    assert ph["oldestDue"] is not None
    assert ph["DISPATCHED"] == pytest.approx(80_000, rel=0.05)
    assert hook["DISPATCHED"] == pytest.approx(10_000, rel=0.05)
    s = SourceOutbox(big).summary()
    assert s["publishedCountEstimated"] is True
    assert (s["pendingCount"], s["failedCount"], s["maxRetryCount"]) == (7, 3, 2)
    assert s["publishedCount"] == pytest.approx(50_000, rel=0.05)


async def test_the_store_counts_past_the_budget_are_flagged_estimates(
    big: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GET /api/v1/admin/user-activity/store``'s reader, on the same rows."""
    from types import SimpleNamespace
    from typing import Any, cast

    from estat.admin.build import _store_counts

    counts = _store_counts(cast(Any, SimpleNamespace(db=big, bus=None)))
    exact = await counts()
    assert exact["estimated"] is False
    assert exact["dispatchOutbox"]["POSTHOG"] == {"PENDING": 50, "FAILED": 20, "DISPATCHED": 80_000}
    monkeypatch.setattr(budget, "SUMMARY_BUDGET", 0.001)
    guessed = await counts()
    assert guessed["estimated"] is True
    ph = guessed["dispatchOutbox"]["POSTHOG"]
    assert (ph["PENDING"], ph["FAILED"]) == (50, 20)  # still to be sent: exact
    assert ph["DISPATCHED"] == pytest.approx(80_000, rel=0.05)
    assert guessed["sourceOutbox"]["PUBLISHED"] == pytest.approx(50_000, rel=0.05)
    assert (guessed["sourceOutbox"]["PENDING"], guessed["sourceOutbox"]["FAILED"]) == (7, 3)
