"""The event store's contract on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import DBAPIError

from estat.activity.common import is_data_error
from estat.model import EventRecord
from estat.store.db import Database, SchemaTooNew
from estat.store.events import EventStore
from estat.store.outbox import Lease, SourceOutbox
from estat.store.rows import encode, event_row
from estat.store.schema import (
    user_activity_dispatch_outbox,
    user_activity_event,
    user_activity_source_outbox,
)

TABLES = {
    "user_activity_event",
    "user_activity_source_outbox",
    "user_activity_dispatch_outbox",
    "message_queue_trace_log",
    "admin_audit_log",
}


def rec(
    eid: str | None = None, props: bytes = b'{"source":"CLIENT"}', member: str | None = None
) -> EventRecord:
    return EventRecord(
        eid or uuid.uuid4().hex,
        "ui.page.viewed",
        "v1",
        "2026-11-30T10:00:00.000Z",
        "2026-11-30T10:00:01.000Z",
        member,
        "anon-1",
        msgspec.Raw(props),
        "CLIENT",
        "127.0.0.1",
        "ua",
    )


def store_all(store: EventStore, records: list[EventRecord]):  # type: ignore[no-untyped-def]
    return store.store([event_row(r) for r in records], [encode(r).decode() for r in records])


def count(db: Database, table: object) -> int:
    with db.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


def test_migrations_go_up_and_down(db: Database) -> None:
    assert set(inspect(db.engine).get_table_names()) >= TABLES
    assert db.current() == db.head()
    db.downgrade("base")
    assert not TABLES & set(inspect(db.engine).get_table_names())
    db.upgrade()
    assert set(inspect(db.engine).get_table_names()) >= TABLES
    idx = {i["name"] for i in inspect(db.engine).get_indexes("user_activity_event")}
    assert {"idx_user_activity_event_member_occurred", "idx_user_activity_event_occurred"} <= idx
    # one step down leaves the seed's tables and removes the audit log
    db.downgrade("0001")
    names = set(inspect(db.engine).get_table_names())
    assert "admin_audit_log" not in names
    assert names >= TABLES - {"admin_audit_log"}
    db.upgrade()
    assert db.current() == db.head()


def test_a_schema_newer_than_this_estat_is_refused(db: Database) -> None:
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaTooNew):
        db.upgrade()


def test_one_row_per_event_id_and_dispatch_rows_for_new_events_only(db: Database) -> None:
    store = EventStore(db, ["POSTHOG", "WEBHOOK"])
    a, b, c = (rec() for _ in range(3))
    first = store_all(store, [a, b, a])  # a twice in one batch
    assert first.inserted == 2
    assert first.duplicates == 1
    assert first.dispatch == {"POSTHOG": 2, "WEBHOOK": 2}
    second = store_all(store, [b, c])  # b again in a later batch
    assert second.inserted == 1
    assert second.duplicates == 1
    assert count(db, user_activity_event) == 3
    assert count(db, user_activity_dispatch_outbox) == 6
    with db.engine.connect() as conn:
        dup = conn.execute(
            text(
                "SELECT event_id, COUNT(*) FROM user_activity_event GROUP BY event_id HAVING COUNT(*) > 1"
            )
        ).all()
    assert dup == []


def test_columns_are_filled_from_the_properties(db: Database) -> None:
    store = EventStore(db)
    r = rec(
        props=b'{"sessionId":"s-1","deviceId":"d-9","platform":"web","appVersion":"1.2.3","locale":"ko-KR","path":"/home","method":"GET","source":"CLIENT"}',
        member="42",
    )
    store_all(store, [r])
    with db.engine.connect() as conn:
        row = conn.execute(select(user_activity_event)).mappings().one()
    assert (row["session_id"], row["device_id"], row["platform"], row["app_version"]) == (
        "s-1",
        "d-9",
        "web",
        "1.2.3",
    )
    assert (row["locale"], row["request_path"], row["request_method"]) == ("ko-KR", "/home", "GET")
    assert row["member_id"] == 42
    assert row["source"] == "CLIENT"
    assert row["properties"]["sessionId"] == "s-1"


def test_a_member_id_that_is_not_a_bigint_is_stored_whole_in_member_key(db: Database) -> None:
    """A JWT ``sub``, a UUID, a name: seed 004's ``member_id bigint`` cannot
    hold them, and the event used to be stored with no identity at all."""
    from estat.store.rows import BadPayload

    store = EventStore(db)
    ids = {
        "42": (42, None),
        "auth0|5f7c8ec7c33c6c004bbafe82": (None, "auth0|5f7c8ec7c33c6c004bbafe82"),
        "9223372036854775808": (None, "9223372036854775808"),  # one past bigint
        "k" * 255: (None, "k" * 255),
    }
    records = {rec(member=m).event_id: m for m in ids}
    store_all(store, [rec(eid, member=m) for eid, m in records.items()] + [rec("anon")])
    with db.engine.connect() as conn:
        got = {
            r.event_id: (r.member_id, r.member_key)
            for r in conn.execute(select(user_activity_event))
        }
        keyed = conn.execute(
            select(user_activity_event.c.event_id).where(
                user_activity_event.c.member_key == "auth0|5f7c8ec7c33c6c004bbafe82"
            )
        ).scalars()
        assert len(list(keyed)) == 1
    assert {records[e]: v for e, v in got.items() if e != "anon"} == ids
    assert got["anon"] == (None, None)
    with pytest.raises(BadPayload):  # never cut: that would be another member
        event_row(rec(member="k" * 256))


def test_a_nul_character_is_a_data_error_on_postgresql(db: Database) -> None:
    store = EventStore(db)
    bad = rec(props=b'{"note":"a\\u0000b"}')
    if db.dialect == "sqlite":
        store_all(store, [bad])  # SQLite keeps it
        return
    with pytest.raises(DBAPIError) as info:
        store_all(store, [bad])
    assert is_data_error(info.value)
    assert count(db, user_activity_event) == 0


def test_outbox_states_backoff_and_parking(db: Database) -> None:
    outbox = SourceOutbox(db, max_attempts=3, lease_seconds=60)
    records = [rec() for _ in range(5)]
    res = outbox.enqueue(records + records[:1])
    assert (res.inserted, res.duplicates) == (5, 1)
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    leased = outbox.lease(3, now)
    assert len(leased) == 3
    assert len(outbox.lease(10, now)) == 2  # the other three are leased
    assert outbox.lease(10, now) == []
    outbox.mark_published([r.id for r in leased[:2]], now)
    scheduled, parked = outbox.mark_failed(leased[2:], "boom", now)
    assert (scheduled, parked) == (1, 0)
    with db.engine.connect() as conn:
        row = (
            conn.execute(
                select(user_activity_source_outbox).where(
                    user_activity_source_outbox.c.id == leased[2].id
                )
            )
            .mappings()
            .one()
        )
    assert row["status"] == "FAILED"
    assert row["retry_count"] == 1
    assert row["last_error"] == "boom"
    wait = row["next_retry_at"].replace(tzinfo=UTC) - now
    assert timedelta(seconds=5) <= wait <= timedelta(seconds=10)  # 10 s, equal jitter
    # fails twice more: parked, never due again
    later = now + timedelta(hours=1)
    for _ in range(2):
        again = [r for r in outbox.lease(10, later) if r.id == leased[2].id]
        assert again
        outbox.mark_failed(again, "boom", later)
        later += timedelta(hours=1)
    assert all(r.id != leased[2].id for r in outbox.lease(10, later + timedelta(days=30)))
    s = outbox.summary()
    assert (s["publishedCount"], s["failedCount"], s["maxRetryCount"]) == (2, 1, 3)


@pytest.mark.parametrize("held", [False, True], ids=["lease-ahead", "held-lease"])
def test_two_relays_never_take_one_row(db: Database, held: bool) -> None:
    """PostgreSQL: with either lease (the relay's, holding the rows' locks;
    an operator's replay, moving ``next_retry_at`` ahead) a row leased by
    one relay is skipped by the other; each marked once."""
    if db.dialect == "sqlite":
        pytest.skip("SQLite has a single writer")
    outbox = SourceOutbox(db)
    outbox.enqueue([rec() for _ in range(400)])
    now = datetime.now(UTC)
    got: list[list[int]] = [[], []]

    def relay(i: int) -> None:
        while (lease := outbox.take(7, now) if held else Lease(outbox.lease(7, now))).rows:
            got[i] += [r.id for r in lease.rows]
            outbox.mark_published([r.id for r in lease.rows], now, lease)

    threads = [threading.Thread(target=relay, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got[0]) + len(got[1]) == 400
    assert not set(got[0]) & set(got[1])
    assert got[0]
    assert got[1]
    assert outbox.summary() == {
        "pendingCount": 0, "failedCount": 0, "publishedCount": 400, "maxRetryCount": 0,
        "publishedCountEstimated": False,
    }  # fmt: skip


def test_a_lease_held_by_a_relay_that_dies_is_free_at_once_and_untouched(
    db: Database,
) -> None:
    """PostgreSQL: the relay's connection drops with its lease open (the
    process killed): its rows were never written, and another relay takes
    them at once, not a lease later."""
    if db.dialect == "sqlite":
        pytest.skip("SQLite leases by next_retry_at")
    outbox = SourceOutbox(db, lease_seconds=3600)
    outbox.enqueue([rec() for _ in range(5)])
    now = datetime.now(UTC)
    held = outbox.take(3, now)
    assert len(held.rows) == 3
    other = outbox.take(10, now)
    assert len(other.rows) == 2  # another relay skips the locked three
    outbox.release([], now, other)  # and gives its two back
    assert held.conn is not None
    held.conn.invalidate()  # its socket closed, as when the relay's process dies
    again = outbox.take(10, now)
    assert len(again.rows) == 5  # the dead relay's three among them
    assert {(r.id, r.retry_count, r.payload) for r in held.rows} <= {
        (r.id, r.retry_count, r.payload) for r in again.rows
    }
    outbox.release([], now, again)
    with db.engine.connect() as conn:
        rows = conn.execute(
            select(
                user_activity_source_outbox.c.status, user_activity_source_outbox.c.next_retry_at
            )
        ).all()
    assert [tuple(r) for r in rows] == [("PENDING", None)] * 5  # nothing written by a lease


SEED_QUERIES = [
    """SELECT event_name, COUNT(*) AS cnt
FROM user_activity_event
WHERE occurred_at >= NOW() - INTERVAL '30 minutes'
GROUP BY event_name
ORDER BY cnt DESC;""",
    """SELECT event_id, COUNT(*) AS dup_cnt
FROM user_activity_event
GROUP BY event_id
HAVING COUNT(*) > 1;""",
    """SELECT status, COUNT(*) AS cnt, MAX(retry_count) AS max_retry
FROM user_activity_source_outbox
GROUP BY status;""",
    """SELECT id, event_id, status, retry_count, next_retry_at, last_error, updated_at
FROM user_activity_source_outbox
WHERE status IN ('PENDING', 'FAILED')
ORDER BY id ASC
LIMIT 200;""",
    """SELECT dispatch_target, status, COUNT(*) AS cnt
FROM user_activity_dispatch_outbox
GROUP BY dispatch_target, status
ORDER BY dispatch_target, status;""",
]


def test_the_seed_004_sql_playbook_runs_unchanged_on_postgresql(db: Database) -> None:
    if db.dialect != "postgresql":
        pytest.skip("the playbook is PostgreSQL SQL")
    store = EventStore(db, ["POSTHOG"])
    r = rec()
    r.occurred_at = datetime.now(UTC).isoformat()
    store_all(store, [r])
    SourceOutbox(db).enqueue([rec()])
    with db.engine.connect() as conn:
        results = [[tuple(r) for r in conn.exec_driver_sql(q).all()] for q in SEED_QUERIES]
    assert results[0] == [("ui.page.viewed", 1)]
    assert results[1] == []
    assert results[2] == [("PENDING", 1, 0)]
    assert len(results[3]) == 1
    assert results[4] == [("POSTHOG", "PENDING", 1)]


def test_the_transactional_outbox_commits_or_rolls_back_with_the_callers_transaction(
    db: Database,
) -> None:
    from estat.outbox import enqueue
    from estat.store.rows import decode

    ev = {
        "eventId": "order-1",
        "eventName": "order.completed",
        "memberId": 42,
        "properties": {"orderId": 9},
    }

    def failing_business_change() -> None:
        with db.engine.begin() as conn:
            enqueue(conn, [ev])
            raise RuntimeError("the business change failed")

    with pytest.raises(RuntimeError):
        failing_business_change()
    assert count(db, user_activity_source_outbox) == 0
    with db.engine.begin() as conn:
        assert enqueue(conn, [ev, ev]).inserted == 1
    rows = SourceOutbox(db).lease(10, datetime.now(UTC))
    assert [r.event_id for r in rows] == ["order-1"]
    r = decode(rows[0].payload)
    assert (r.member_id, r.source, r.event_name) == ("42", "SERVER", "order.completed")
    # a row written by hand with the documented minimal payload decodes too
    minimal = b'{"event_id":"x","event_name":"n","occurred_at":"2026-11-30T00:00:00Z","member_id":"7","properties":{"a":1}}'
    assert event_row(decode(minimal))["member_id"] == 7
    with pytest.raises(ValueError, match="memberId must be 1 to 255"), db.engine.begin() as conn:
        enqueue(conn, [{**ev, "eventId": "order-2", "memberId": "m" * 256}])


def _has_expression(index: object) -> bool:
    exprs = getattr(index, "expressions", ())
    return any("DESC" in str(e) for e in exprs)


def test_the_migrations_create_exactly_the_declared_schema(db: Database) -> None:
    """``schema.py`` (what the code queries) and the migrations (what a
    database gets) agree: tables, columns, indexes and their predicates."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from estat.store.schema import metadata

    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        found = compare_metadata(ctx, metadata)
        # alembic cannot compare indexes on expressions ("occurred_at DESC"):
        # it reports them removed and added again
        exprs = {d[1].name for d in found if d[0] == "add_index" and _has_expression(d[1])}
        diff = [(d[0], d[1].name) for d in found if getattr(d[1], "name", None) not in exprs]
        partial = {
            i["name"]: i.get("dialect_options", {})
            for i in inspect(conn).get_indexes("user_activity_dispatch_outbox")
        }
    assert diff == []
    where = partial["idx_user_activity_dispatch_outbox_target_status"]
    assert "PENDING" in str(where.get(f"{db.dialect}_where", ""))


def test_concurrent_migrations_of_one_database_do_not_collide(db: Database) -> None:
    """The workers of a server migrate one fresh database at the same time."""
    import threading

    db.downgrade("base")
    others = [Database(db.url) for _ in range(4)]
    errors: list[BaseException] = []

    def migrate(d: Database) -> None:
        try:
            d.upgrade()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=migrate, args=(d,)) for d in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for d in others:
        d.close()
    assert errors == []
    assert db.current() == db.head()


def test_a_migration_behind_a_long_query_gives_way_instead_of_stalling_the_store(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An analyst's long transaction reads ``user_activity_event`` while a
    new estat adds a column to it. Waiting for its lock, the ALTER would
    queue every other session's statement on the table behind it (the store
    stalls for the whole query); it waits ``MIGRATION_LOCK_TIMEOUT`` only,
    gives way, names the blocker and retries, and completes once the query
    ends. Without the limit, the store's insert below waits until then."""
    import estat.store.db as dbmod

    monkeypatch.setattr(dbmod, "MIGRATION_LOCK_TIMEOUT", 0.3)
    old = Database(pg_url)
    old.upgrade("0005")  # the schema before member_key
    analyst = old.engine.connect()
    analyst.begin()
    analyst.execute(text("SELECT count(*) FROM user_activity_event"))  # holds ACCESS SHARE
    new = Database(pg_url)
    done: list[BaseException | None] = []

    def migrate() -> None:
        try:
            new.upgrade()
            done.append(None)
        except BaseException as e:  # reported below
            done.append(e)

    t = threading.Thread(target=migrate)
    t.start()
    try:
        time.sleep(1.0)  # the migration has tried, given way, and waits to retry
        with old.engine.begin() as store:  # an old estat's store keeps storing
            store.execute(text("SET LOCAL lock_timeout = 3000"))
            store.execute(
                text(
                    "INSERT INTO user_activity_event (event_id, event_name, event_version, "
                    "occurred_at, source) VALUES ('during', 'n', 'v1', now(), 'CLIENT')"
                )
            )
        assert not done  # still waiting for the analyst
        assert old.current() == "0005"
        said = capsys.readouterr().out
        assert "migration waiting" in said
        assert "SELECT count(*) FROM user_activity_event" in said  # the blocker, named
    finally:
        analyst.rollback()
        analyst.close()
    t.join(timeout=60)
    assert done == [None]
    assert new.current() == new.head()
    assert "member_key" in {
        c["name"] for c in inspect(new.engine).get_columns("user_activity_event")
    }
    new.close()
    old.close()


def test_a_migration_blocked_past_its_patience_fails_naming_the_blocker(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import estat.store.db as dbmod

    monkeypatch.setattr(dbmod, "MIGRATION_LOCK_TIMEOUT", 0.2)
    monkeypatch.setattr(dbmod, "MIGRATION_LOCK_PATIENCE", 1.0)
    old = Database(pg_url)
    old.upgrade("0005")
    with old.engine.connect() as analyst:
        analyst.begin()
        analyst.execute(text("SELECT count(*) FROM user_activity_event"))
        new = Database(pg_url)
        with pytest.raises(dbmod.MigrationBlocked, match=r"pid \d+ \(idle in transaction"):
            new.upgrade()
        new.close()
    assert old.current() == "0005"  # nothing half-done
    old.close()


def test_the_changelog_sql_gives_earlier_events_their_member_key(db: Database) -> None:
    """The UPDATE the CHANGELOG gives for events stored before migration
    0006, from the dispatch outbox rows the retention still keeps."""
    import re
    from pathlib import Path

    if db.dialect != "postgresql":
        pytest.skip("the statement is PostgreSQL SQL")
    log = (Path(__file__).resolve().parents[2] / "CHANGELOG.md").read_text()
    (sql,) = [s for s in re.findall(r"```sql\n(.*?)```", log, re.S) if "member_key" in s]
    named, numbered, anonymous = rec(member="user-abc"), rec(member="42"), rec()
    store_all(EventStore(db, ["POSTHOG"]), [named, numbered, anonymous])
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE user_activity_event SET member_key = NULL"))  # as before 0006
        conn.execute(text(sql.strip().rstrip(";")))
        rows = conn.execute(text("SELECT event_id, member_key FROM user_activity_event"))
        got = {str(r[0]): r[1] for r in rows}
    assert got == {named.event_id: "user-abc", numbered.event_id: None, anonymous.event_id: None}


def test_the_printed_upgrade_sql_applies_with_psql_and_gives_way_to_a_long_query(
    pg_url: str, postgres_server: Any, tmp_path: Path
) -> None:
    """``estat migrate upgrade FROM:head --sql`` for a DBA who applies
    migrations by hand: it applies with psql, and behind a session holding
    the table it fails within the lock timeout, changing nothing (it would
    otherwise queue every statement on the table behind it), and applies
    once that session ends."""
    import os
    import subprocess
    import sys

    from tests.servers import libpq, pg_bin, table_locked

    def estat_sql(*args: str) -> Path:
        out = subprocess.run(
            [sys.executable, "-m", "estat", "migrate", *args, "--sql"],
            env={**os.environ, "DATABASE_URL": pg_url}, capture_output=True, text=True,
            check=True, timeout=60,
        )  # fmt: skip
        path = tmp_path / f"upgrade-{len(list(tmp_path.iterdir()))}.sql"
        path.write_text(out.stdout)
        return path

    def psql(path: Path, url: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [pg_bin("psql"), libpq(url), "-q", "-v", "ON_ERROR_STOP=1", "-f", str(path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    db = Database(pg_url)
    db.upgrade("0005")
    up = estat_sql("upgrade", "0005:head")
    assert "SET lock_timeout = '5s';" in up.read_text()
    with table_locked(pg_url, "user_activity_event"):
        t0 = time.monotonic()
        blocked = psql(up, pg_url)
        assert time.monotonic() - t0 < 30
    assert blocked.returncode != 0
    assert "lock timeout" in blocked.stderr
    assert db.current() == "0005"  # nothing changed
    done = psql(up, pg_url)
    assert done.returncode == 0, done.stderr
    assert db.current() == db.head()
    assert "member_key" in {
        c["name"] for c in inspect(db.engine).get_columns("user_activity_event")
    }
    db.close()
    typo = subprocess.run(
        [sys.executable, "-m", "estat", "migrate", "upgrade", "0500:head", "--sql"],
        env={**os.environ, "DATABASE_URL": pg_url}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert typo.returncode == 2
    assert "Can't locate revision identified by '0500'" in typo.stderr
    assert "Traceback" not in typo.stderr
    # from an empty database: the whole schema
    empty = postgres_server.create_database()
    full = psql(estat_sql(), empty)
    assert full.returncode == 0, full.stderr
    fresh = Database(empty)
    assert fresh.current() == fresh.head()
    fresh.close()


@pytest.mark.parametrize(("command", "status"), [("migrate", 1), ("store", 2)])
def test_a_blocked_migration_fails_the_command_or_the_start_naming_the_blocker(
    pg_url: str, tmp_path: Path, command: str, status: int
) -> None:
    """`estat migrate` exits 1, a role's start exits 2 (it did not start),
    each saying which session holds the lock; nothing is half-migrated."""
    import os
    import subprocess
    import sys

    shorter = (
        "import sys, estat.store.db as d\n"
        "d.MIGRATION_LOCK_TIMEOUT, d.MIGRATION_LOCK_PATIENCE = 0.2, 1.0\n"
        "from estat.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )  # the patience is 10 minutes
    old = Database(pg_url)
    old.upgrade("0005")
    with old.engine.connect() as analyst:
        analyst.begin()
        analyst.execute(text("SELECT count(*) FROM user_activity_event"))
        run = subprocess.run(
            [sys.executable, "-c", shorter, command],
            env={**os.environ, "DATABASE_URL": pg_url, "DATA_DIR": str(tmp_path / "d"),
                 "ADMIN_ADDR": "off"},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    said = run.stdout + run.stderr
    assert run.returncode == status, said
    assert "SELECT count(*) FROM user_activity_event" in said
    assert "Traceback" not in said
    assert old.current() == "0005"
    old.close()
