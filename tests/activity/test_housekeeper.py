"""The housekeeper: backlog gauges from the real tables, trace retention."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text

from estat.activity.housekeeper import Housekeeper
from estat.bus.base import Message
from estat.bus.memory import MemoryBus
from estat.clock import FakeClock
from estat.ops.metrics import Metrics
from estat.store.db import Database
from estat.store.outbox import SourceOutbox
from estat.store.schema import message_queue_trace_log, user_activity_dispatch_outbox
from estat.store.trace import TraceLog
from tests.activity.test_flow import rec, value
from tests.servers import table_locked


async def test_backlog_gauges_count_rows_by_status_and_parked_apart(db: Database) -> None:
    m = Metrics()
    bus = MemoryBus()
    await bus.publish([Message("a", "k", "", b"{}"), Message("b", "k", "", b"{}")])
    outbox = SourceOutbox(db, max_attempts=1)
    outbox.enqueue([rec() for _ in range(5)])
    now = datetime.now(UTC)
    leased = outbox.lease(3, now)
    outbox.mark_published([leased[0].id], now)
    outbox.mark_failed(leased[1:], "boom", now)  # max_attempts 1: parked
    # the two rows never leased were enqueued ~30 s before the housekeeper looks
    clock = FakeClock(time.time() + 30)
    hk = Housekeeper(db, bus, None, retention=60, metrics=m, clock=clock)
    await hk.refresh_backlog()
    await hk.refresh_finished()
    assert 29 <= value(m, "source_outbox_oldest_due_age_seconds") <= 40
    assert value(m, "source_outbox_rows", status="PENDING") == 2
    assert value(m, "source_outbox_rows", status="PUBLISHED") == 1
    assert value(m, "source_outbox_rows", status="PARKED") == 2
    assert value(m, "source_outbox_rows", status="FAILED") == 0
    assert value(m, "mq_pending_messages", topic="user-activity", provider="memory") == 2
    assert (hk.database_status, hk.bus_status) == ("ok", "ok")
    outbox.mark_published([r.id for r in outbox.lease(5, now)], now)  # the relay catches up
    await hk.refresh_backlog()
    assert value(m, "source_outbox_oldest_due_age_seconds") == 0


async def test_trace_rows_older_than_the_retention_are_deleted_in_batches(db: Database) -> None:
    m = Metrics()
    clock = FakeClock()
    trace = TraceLog(db, "all", "memory", "user-activity", "g")
    old = datetime.fromtimestamp(clock.time(), UTC) - timedelta(days=8)
    new = datetime.fromtimestamp(clock.time(), UTC) - timedelta(days=1)
    for i in range(120):
        trace.add("CONSUME_SUCCESS", f"old-{i}", "k", old, 3)
    for i in range(7):
        trace.add("CONSUME_FAIL", f"new-{i}", "k", new, 3, "boom")
    assert trace.flush() == 127
    hk = Housekeeper(db, None, trace, retention=7 * 86400, metrics=m, clock=clock)
    assert await hk.purge_traces() == 120
    with db.engine.connect() as conn:
        left = conn.execute(select(func.count()).select_from(message_queue_trace_log)).scalar_one()
    assert left == 7
    assert value(m, "mq_trace_rows_total", action="deleted") == 120


def test_the_failures_mode_traces_only_failures(db: Database) -> None:
    trace = TraceLog(db, "failures", "memory", "user-activity", "g")
    now = datetime.now(UTC)
    trace.add("PUBLISH", "a", "k", now)
    trace.add("CONSUME_SUCCESS", "a", "k", now, 1)
    trace.add("CONSUME_FAIL", "a", "k", now, 1, "x" * 5000)
    assert trace.flush() == 1
    with db.engine.connect() as conn:
        row = conn.execute(select(message_queue_trace_log)).mappings().one()
    assert row["stage"] == "CONSUME_FAIL"
    assert len(row["error_message"]) == 1000


async def test_dispatch_gauges_by_target_parked_apart_and_the_oldest_due_age(
    db: Database,
) -> None:
    import time

    from estat.store.dispatch import DispatchOutbox
    from estat.store.events import EventStore
    from estat.store.rows import encode, event_row

    records = [rec() for _ in range(6)]
    EventStore(db, ["POSTHOG", "WEBHOOK"]).store(
        [event_row(r) for r in records], [encode(r).decode() for r in records]
    )
    box = DispatchOutbox(db, max_attempts=1)
    now = datetime.now(UTC)
    leased = box.lease("POSTHOG", 3, now)
    a, b, c = leased.rows
    box.mark([a], [(b, "HTTP 500", 0.0, False)], [(c, "HTTP 400")], now, leased)  # b, c parked
    m = Metrics()
    clock = FakeClock(time.time() + 30)  # the oldest due rows were enqueued ~30 s ago
    hk = Housekeeper(
        db, None, None, retention=60, metrics=m, clock=clock, targets=("POSTHOG", "WEBHOOK")
    )
    await hk.refresh_backlog()
    await hk.refresh_finished()
    for target, want in (
        ("POSTHOG", {"PENDING": 3, "FAILED": 0, "PARKED": 2, "DISPATCHED": 1}),
        ("WEBHOOK", {"PENDING": 6, "FAILED": 0, "PARKED": 0, "DISPATCHED": 0}),
    ):
        got = {s: value(m, "dispatch_outbox_rows", status=s, target=target) for s in want}
        assert got == want
        age = value(m, "dispatch_oldest_due_age_seconds", target=target)
        assert 29 <= age <= 40
    # WEBHOOK taken out of the configuration, its rows discarded: its gauges
    # go back to 0 (they stayed at their last value, and the alert on)
    hk.targets = ("POSTHOG",)
    assert box.discard("WEBHOOK", 100) == 6
    await hk.refresh_backlog()
    assert value(m, "dispatch_outbox_rows", status="PENDING", target="WEBHOOK") == 0
    assert value(m, "dispatch_oldest_due_age_seconds", target="WEBHOOK") == 0


async def test_retention_deletes_finished_rows_only_in_bounded_batches(db: Database) -> None:
    import uuid

    from sqlalchemy import insert

    from estat.pause import Pauses
    from estat.store.retention import purge, rules
    from estat.store.schema import (
        admin_audit_log,
        estat_ledger,
        user_activity_dispatch_outbox,
        user_activity_source_outbox,
    )

    now = datetime.now(UTC)
    old, recent = now - timedelta(days=10), now - timedelta(days=1)
    s, d, a = user_activity_source_outbox, user_activity_dispatch_outbox, admin_audit_log

    def src(status: str, at: datetime | None) -> dict[str, object]:
        return {
            "event_id": uuid.uuid4().hex, "event_name": "e", "event_version": "v1",
            "occurred_at": now, "payload": {}, "status": status, "published_at": at,
            "created_at": old, "updated_at": old,
        }  # fmt: skip

    def dis(status: str, at: datetime | None) -> dict[str, object]:
        return {
            "event_id": uuid.uuid4().hex, "dispatch_target": "POSTHOG", "payload": {},
            "status": status, "dispatched_at": at, "created_at": old, "updated_at": old,
        }  # fmt: skip

    with db.engine.begin() as conn:
        conn.execute(insert(s), [src("PUBLISHED", old) for _ in range(7)])
        conn.execute(insert(s), [src("PUBLISHED", recent), src("FAILED", None)])
        conn.execute(insert(d), [dis("DISPATCHED", old) for _ in range(5)])
        conn.execute(insert(d), [dis("DISPATCHED", recent), dis("FAILED", None)])
        conn.execute(insert(d), [dis("PENDING", None)])
        conn.execute(
            insert(a),
            [
                {"created_at": t, "client": "127.0.0.1", "method": "GET", "route": "/x",
                 "parameters": {}, "status": 200}
                for t in (old, old, recent)
            ],
        )  # fmt: skip
        conn.execute(
            insert(estat_ledger),
            [
                {"dataset": "raw", "hour": t, "stage": stage, "events": 1, "updated_at": t}
                for t in (old, recent)
                for stage in ("accepted", "lake")
            ],
        )
    # one bounded batch at a time
    assert purge(db, rules()["source_outbox"], now - timedelta(days=7), batch=3) == 3
    m = Metrics()
    pauses = Pauses()
    ages = {
        "source_outbox": 7 * 86400.0, "dispatch_outbox": 7 * 86400.0, "audit": 0.0,
        "ledger": 7 * 86400.0,
    }  # fmt: skip
    hk = Housekeeper(
        db, None, None, retention=60, metrics=m, clock=FakeClock(now.timestamp()),
        ages=ages, pauses=pauses,
    )  # fmt: skip
    pauses.set("retention", True)
    assert await hk.purge_done() == {}  # paused: nothing deleted
    pauses.set("retention", False)
    # a table the database refuses (a real error): the pass ends there, what it
    # deleted counted; the next tables wait for the next pass instead of each
    # waiting as long for a database that does not answer
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE user_activity_dispatch_outbox RENAME TO dispatch_away"))
    assert await hk.purge_done() == {"source_outbox": 4, "dispatch_outbox": 0}
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE dispatch_away RENAME TO user_activity_dispatch_outbox"))
    assert await hk.purge_done() == {"source_outbox": 0, "dispatch_outbox": 5, "ledger": 2}
    assert value(m, "retention_rows_deleted_total", table="source_outbox") == 4
    assert value(m, "retention_rows_deleted_total", table="dispatch_outbox") == 5
    with db.engine.connect() as conn:
        left_s = sorted(r.status for r in conn.execute(select(s.c.status)))
        left_d = sorted(r.status for r in conn.execute(select(d.c.status)))
        audit = conn.execute(select(func.count()).select_from(a)).scalar_one()
    assert left_s == ["FAILED", "PUBLISHED"]  # work to do, and the recent one
    assert left_d == ["DISPATCHED", "FAILED", "PENDING"]
    assert audit == 3  # AUDIT_RETENTION 0: kept forever


async def test_a_database_that_stops_leaves_the_gauges_as_they_were_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """PostgreSQL stopped for real between two refreshes: the backlog and the
    finished-row gauges keep their last values, nothing raises, /ready's
    verdict says unavailable, once in the log (not every 10 s); back, the
    next refresh counts again and says so."""
    from estat.store.events import EventStore
    from estat.store.rows import encode, event_row
    from tests.conftest import free_port
    from tests.servers import PostgresServer

    pg = PostgresServer(free_port())
    pg.start()
    try:
        db = Database(pg.create_database())
        db.upgrade()
        records = [rec() for _ in range(4)]
        EventStore(db, ["POSTHOG"]).store(
            [event_row(r) for r in records], [encode(r).decode() for r in records]
        )
        m = Metrics()
        hk = Housekeeper(db, None, None, retention=60, metrics=m, clock=FakeClock(),
                         targets=("POSTHOG",))  # fmt: skip
        await hk.refresh_backlog()
        await hk.refresh_finished()
        assert hk.database_status == "ok"
        assert value(m, "dispatch_outbox_rows", status="PENDING", target="POSTHOG") == 4
        pg.stop()
        capsys.readouterr()
        for _ in range(3):
            await hk.refresh_backlog()
        await hk.refresh_finished()
        assert hk.database_status.startswith("unavailable: ")
        assert capsys.readouterr().out.count("backlog gauges: database unavailable") == 1
        assert value(m, "dispatch_outbox_rows", status="PENDING", target="POSTHOG") == 4
        assert value(m, "dispatch_outbox_rows", status="DISPATCHED", target="POSTHOG") == 0
        pg.start()
        with db.engine.begin() as conn:
            conn.execute(
                user_activity_dispatch_outbox.update()
                .where(user_activity_dispatch_outbox.c.event_id == records[0].event_id)
                .values(status="DISPATCHED")
            )
        await hk.refresh_backlog()
        await hk.refresh_finished()
        assert hk.database_status == "ok"
        assert "backlog gauges: database available again" in capsys.readouterr().out
        assert value(m, "dispatch_outbox_rows", status="PENDING", target="POSTHOG") == 3
        assert value(m, "dispatch_outbox_rows", status="DISPATCHED", target="POSTHOG") == 1
        db.close()
    finally:
        pg.destroy()


async def test_the_count_of_finished_rows_does_not_hold_up_the_store(db: Database) -> None:
    """The PUBLISHED / DISPATCHED gauges read whole tables (seconds on large
    ones): while that read waits (here for a lock another session holds on
    the source outbox), the store of the same process keeps writing."""
    import asyncio

    import pytest

    from estat.store.events import EventStore
    from estat.store.rows import encode, event_row

    if db.dialect != "postgresql":
        pytest.skip("a reader waiting behind another session's lock")
    m = Metrics()
    hk = Housekeeper(
        db, None, None, retention=60, metrics=m, clock=FakeClock(), targets=["POSTHOG"]
    )
    records = [rec() for _ in range(3)]
    with table_locked(db.url, "user_activity_source_outbox") as holder:
        counting = asyncio.create_task(hk.refresh_finished())
        await asyncio.sleep(0.3)  # the count is waiting for the lock
        assert not counting.done()
        store = EventStore(db, ["POSTHOG"])
        stored = await asyncio.wait_for(
            db.run(
                lambda: store.store(
                    [event_row(r) for r in records], [encode(r).decode() for r in records]
                )
            ),
            10,
        )  # not behind the count
        holder.rollback()
    await counting
    assert stored.inserted == 3
    assert value(m, "dispatch_outbox_rows", status="DISPATCHED", target="POSTHOG") == 0


async def test_a_purge_waiting_on_a_lock_does_not_hold_up_server_events(db: Database) -> None:
    """PostgreSQL: the retention purge of the dispatch outbox waits for
    another session's lock on it; a server event's outbox write in the same
    process (the database's own thread) is not behind it."""
    import pytest

    if db.dialect != "postgresql":
        pytest.skip("SQLite has one writer: the housekeeper shares its thread")
    hk = Housekeeper(
        db, None, None, retention=60, metrics=Metrics(), clock=FakeClock(time.time()),
        ages={"dispatch_outbox": 3600},
    )  # fmt: skip
    outbox = SourceOutbox(db)
    with table_locked(db.url, "user_activity_dispatch_outbox") as holder:
        purging = asyncio.create_task(hk.purge_done())
        await asyncio.sleep(0.3)  # the purge is waiting for the lock
        assert not purging.done()
        written = await asyncio.wait_for(db.run(lambda: outbox.enqueue([rec()])), 10)
        holder.rollback()
    assert await purging == {"dispatch_outbox": 0}
    assert written.inserted == 1


@pytest.mark.servers  # starts its own server
async def test_a_bus_that_is_down_is_said_once_and_its_return_too(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from estat.bus.redis_stream import RedisStreamBus
    from tests.conftest import RedisServer, free_port

    db = Database(f"sqlite:///{tmp_path / 'e.db'}")
    db.upgrade()
    server = RedisServer(free_port(), tmp_path)
    bus = RedisStreamBus(server.url, timeout=0.5)
    hk = Housekeeper(db, bus, None, retention=60, metrics=Metrics(), clock=FakeClock())
    capsys.readouterr()
    for _ in range(3):  # every 10 s in a server
        await hk.refresh_backlog()
    assert hk.bus_status == "unavailable"
    assert capsys.readouterr().out.count("backlog gauges: bus unavailable") == 1
    server.start()
    try:
        await bus.start()
        await hk.refresh_backlog()
        assert hk.bus_status == "ok"
        assert "backlog gauges: bus available again" in capsys.readouterr().out
    finally:
        await bus.close()
        server.stop()
        db.close()


async def test_a_database_outage_is_said_once_and_the_trace_rows_kept(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    """The trace log's and the finished rows' tables go missing (a real error
    from the database) for several passes: each failure said once, the
    trace rows kept and written when the table is back, and that said."""
    from sqlalchemy import text

    m = Metrics()
    trace = TraceLog(db, "all", "memory", "user-activity", "g")
    hk = Housekeeper(db, None, trace, retention=60, metrics=m, clock=FakeClock())
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE message_queue_trace_log RENAME TO trace_away"))
        conn.execute(text("ALTER TABLE user_activity_source_outbox RENAME TO source_away"))
    capsys.readouterr()
    now = datetime.now(UTC)
    for i in range(4):  # the housekeeper's passes through the outage
        trace.add("CONSUME_SUCCESS", f"e-{i}", "k", now, 1)
        await hk.flush_traces()
        await hk.refresh_finished()
    said = capsys.readouterr().out
    assert said.count("trace log: write failed") == 1
    assert said.count("finished rows: database unavailable") == 1
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE trace_away RENAME TO message_queue_trace_log"))
        conn.execute(text("ALTER TABLE source_away RENAME TO user_activity_source_outbox"))
    await hk.flush_traces()
    await hk.refresh_finished()
    said = capsys.readouterr().out
    assert "trace log: written again" in said
    assert "finished rows: database available again" in said
    with db.engine.connect() as conn:
        kept = conn.execute(select(func.count()).select_from(message_queue_trace_log)).scalar_one()
    assert kept == 4  # every row traced through the outage
    assert value(m, "mq_trace_rows_total", action="written") == 4
