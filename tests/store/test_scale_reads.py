"""On PostgreSQL the periodic and hot reads of the outboxes read the rows
they are about, not the history retention keeps:

- a lease: after a backlog (statistics taken while most rows were due, then
  most of them sent) the planner, asked for ``ORDER BY id``, walks the
  primary key from the first row past every sent one; the leases (and an
  operator's replays) ask for an order only the partial status indexes give;
- the backlog gauges (every 10 s) count the rows still to be sent from those
  indexes;
- a retention purge's last batch looks only at the rows created before its
  cut.

Measured as the buffers a statement's choice of rows touches (EXPLAIN
ANALYZE), against the thousands a walk of the table touches."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, text

from estat.activity.housekeeper import backlog, finished
from estat.store.db import Database
from estat.store.dispatch import LEASE_FAILED, LEASE_PENDING, DispatchOutbox
from estat.store.outbox import Lease, SourceOutbox, requeue_failed
from estat.store.retention import purge, rules
from tests.store.test_dispatch_outbox import stored
from tests.store.test_store import rec

SENT = 4000  # rows sent before the lease, after the statistics were taken
DUE = 400
LEASE = 100
#: choosing 100 rows touches a few hundred buffers at most; a walk past
#: 4,000 sent rows touches one or more per row
MAX_BUFFERS = 1000


@pytest.fixture
def pg(pg_url: str) -> Iterator[Database]:
    db = Database(pg_url)
    db.upgrade()
    yield db
    db.close()


def limit_node(plan: dict[str, Any]) -> dict[str, Any]:
    if plan["Node Type"] == "Limit":
        return plan
    for child in plan.get("Plans", []):
        with contextlib.suppress(LookupError):
            return limit_node(child)
    raise LookupError("no Limit node")


def buffers(db: Database, sql: str, params: Any) -> int:
    """Shared buffers the choosing of a statement's rows touches (its LIMIT
    node: the rows found and locked, not the writing of the leased ones), in
    a transaction rolled back."""
    with db.engine.connect() as conn:
        plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params)
        doc = plan.scalar_one()
        conn.rollback()
    node = limit_node((json.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"])
    return int(node["Shared Hit Blocks"]) + int(node["Shared Read Blocks"])


def stale_statistics(db: Database, table: str, done: str, where: str) -> None:
    """Statistics taken while every row was due, then most of them sent."""
    with db.engine.connect() as conn:
        conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
        conn.commit()
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(f"ANALYZE {table}"))
        conn.execute(
            text(
                f"UPDATE {table} SET status = :done WHERE id IN "
                f"(SELECT id FROM {table} WHERE {where} ORDER BY id LIMIT {SENT})"
            ),
            {"done": done},
        )
        conn.commit()


def oldest(db: Database, table: str, status: str) -> list[int]:
    """The ids of the oldest ``LEASE`` rows left in ``status``."""
    with db.engine.connect() as conn:
        q = f"SELECT id FROM {table} WHERE status = :s ORDER BY id LIMIT {LEASE}"
        return [int(i) for i in conn.execute(text(q), {"s": status}).scalars()]


def test_a_dispatch_lease_does_not_walk_the_sent_rows(pg: Database) -> None:
    stored(pg, SENT + DUE, ["POSTHOG"])
    stale_statistics(
        pg, "user_activity_dispatch_outbox", "DISPATCHED", "dispatch_target = 'POSTHOG'"
    )
    now = datetime.now(UTC)
    params = {"t": "POSTHOG", "n": LEASE, "now": now}
    for sql in (LEASE_PENDING, LEASE_FAILED):
        assert buffers(pg, sql, params) < MAX_BUFFERS
    leased = DispatchOutbox(pg).lease("POSTHOG", LEASE, now)
    assert leased.conn is not None
    leased.conn.close()
    assert [r.id for r in leased.rows] == oldest(pg, "user_activity_dispatch_outbox", "PENDING")


@contextlib.contextmanager
def statements(db: Database, verb: str = "") -> Iterator[list[tuple[str, Any]]]:
    """The statements starting with ``verb`` (and their parameters) run on
    ``db`` meanwhile."""
    seen: list[tuple[str, Any]] = []

    def before(_c: Any, _cur: Any, sql: str, params: Any, _ctx: Any, _many: bool) -> None:
        if sql.lstrip().upper().startswith(verb):
            seen.append((sql, params))

    event.listen(db.engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(db.engine, "before_cursor_execute", before)


@pytest.mark.parametrize("held", [False, True], ids=["lease-ahead", "held-lease"])
def test_a_source_outbox_lease_does_not_walk_the_published_rows(pg: Database, held: bool) -> None:
    """The relay's lease (row locks held) and the one moving ``next_retry_at``
    ahead (SQLite's, a replay's) read the due rows from their index ranges."""
    box = SourceOutbox(pg)
    box.enqueue([rec() for _ in range(SENT + DUE)])
    stale_statistics(pg, "user_activity_source_outbox", "PUBLISHED", "TRUE")
    now = datetime.now(UTC)
    with statements(pg, "SELECT" if held else "UPDATE") as seen:
        lease = box.take(LEASE, now) if held else Lease(box.lease(LEASE, now))
    box.release([], now, lease)
    assert [r.id for r in lease.rows] == oldest(pg, "user_activity_source_outbox", "PENDING")
    assert seen
    for sql, params in seen:  # the same statements again: the next rows
        assert buffers(pg, sql, params) < MAX_BUFFERS


def test_replays_do_not_walk_the_sent_rows(pg: Database) -> None:
    """An operator's replay of FAILED rows after a backlog that failed."""
    stored(pg, SENT + DUE, ["POSTHOG"])
    SourceOutbox(pg).enqueue([rec() for _ in range(SENT + DUE)], status="FAILED")
    with pg.engine.begin() as conn:
        conn.execute(text("UPDATE user_activity_dispatch_outbox SET status = 'FAILED'"))
    stale_statistics(pg, "user_activity_dispatch_outbox", "DISPATCHED", "TRUE")
    stale_statistics(pg, "user_activity_source_outbox", "PUBLISHED", "TRUE")
    now = datetime.now(UTC)
    with statements(pg, "UPDATE") as seen:
        assert DispatchOutbox(pg).replay(LEASE, now, target="POSTHOG").rows == LEASE
        assert DispatchOutbox(pg).replay(LEASE, now).rows == LEASE
        assert requeue_failed(pg, LEASE, now) == LEASE
    assert len(seen) == 3
    for sql, params in seen:
        assert buffers(pg, sql, params) < MAX_BUFFERS


def test_the_backlog_gauges_read_the_rows_still_to_be_sent_not_the_table(pg: Database) -> None:
    """Every 10 s the housekeeper counts the rows still to be sent: from the
    partial status indexes, however many finished rows retention keeps."""
    payload = '{"event_id": "x"}'
    with pg.engine.begin() as conn:
        for table, extra, values, done in (
            ("user_activity_source_outbox", "event_name, event_version, occurred_at, ",
             "'ui.page.viewed', 'v1', now(), ", "PUBLISHED"),
            ("user_activity_dispatch_outbox", "dispatch_target, ", "'POSTHOG', ", "DISPATCHED"),
        ):  # fmt: skip
            conn.execute(
                text(
                    f"INSERT INTO {table} (event_id, {extra}payload, status) SELECT md5(i::text),"
                    f" {values}CAST(:p AS jsonb), CASE WHEN i <= 50000 THEN :done"
                    " ELSE 'PENDING' END FROM generate_series(1, 50100) i"
                ),
                {"p": payload, "done": done},
            )
    with pg.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
    with statements(pg) as selects:
        src, dis, oldest, first = backlog(pg, datetime.now(UTC))
    assert src == {"PENDING": 100, "FAILED": 0, "PARKED": 0}
    assert dis == {("PENDING", "POSTHOG"): 100}
    assert set(oldest) == {"POSTHOG"}
    assert first is not None
    assert len(selects) == 4
    for sql, params in selects:
        with pg.engine.connect() as conn:
            plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params)
            top = plan.scalar_one()[0]["Plan"]
        assert int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"]) < 200, sql
    assert finished(pg) == (50000, {"POSTHOG": 50000})


def test_the_last_batch_of_a_purge_does_not_read_the_rows_kept(pg: Database) -> None:
    """Retention deletes in batches until one finds fewer than a batch; that
    last one looks only at the rows created before the cut, not at the days
    of newer rows the retention keeps."""
    now = datetime.now(UTC)
    with pg.engine.begin() as conn:  # row i created (and sent) (50,100 - i) x 10 s ago
        conn.execute(
            text(
                "INSERT INTO user_activity_dispatch_outbox (event_id, dispatch_target, payload,"
                " status, created_at, dispatched_at) SELECT md5(i::text), 'POSTHOG',"
                " CAST('{}' AS jsonb), 'DISPATCHED', :t - (50100 - i) * interval '10 seconds',"
                " :t - (50100 - i) * interval '10 seconds' FROM generate_series(1, 50100) i"
            ),
            {"t": now},
        )
    with pg.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
    cut = now - timedelta(seconds=(50100 - 200) * 10 - 5)  # rows 1..200 are older
    with statements(pg, "DELETE") as deletes:
        assert purge(pg, rules()["dispatch_outbox"], cut) == 200  # fewer than a batch: the last
    with pg.engine.connect() as conn:
        left = conn.execute(
            text("SELECT count(*), min(created_at) FROM user_activity_dispatch_outbox")
        ).one()
    assert left[0] == 50100 - 200
    assert left[1] >= cut
    assert len(deletes) == 1
    sql, params = deletes[0]
    assert buffers(pg, sql, params) < 200  # the same statement again, finding nothing
