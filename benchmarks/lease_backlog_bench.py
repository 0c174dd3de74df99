"""``make bench`` (backlog part): draining an outbox backlog on PostgreSQL
when the planner's statistics were taken while most rows were due (an
outage's backlog, analyzed, then sent), with the leases as they are beside
a plain ``ORDER BY id`` lease of the same rows, same run.

Each drain: ``BENCH_BACKLOG_ROWS`` due rows (100,000), ``ANALYZE``
(autovacuum off for the table, so the statistics stay as they were), then
lease 1,000 rows and mark them sent until none are left. Printed: rows per
second and the time of one lease and its mark at 10 %, 50 % and 90 % of the
drain (a lease that walks the sent rows grows with them). The dispatch outbox's side runs
the dispatcher's statements on one connection (no HTTP); the source
outbox's side runs ``SourceOutbox.lease`` / ``mark_published``.

Then the housekeeper's 10-second backlog refresh (``backlog()``) on
``BENCH_GAUGE_ROWS`` (1,000,000) rows per outbox of which 1,000 are still to
be sent, beside the same counts taken over the whole tables (``GROUP BY``
status with no condition), same run, medians of 5.

Last, a retention purge that finds nothing more to delete (what ends every
purge, every 10 min) on a dispatch outbox of ``BENCH_GAUGE_ROWS`` rows
created over 8 days, 7-day retention, once the older rows are gone:
``purge()`` beside the same ``DELETE`` without its bound, medians of 5.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from estat.activity.housekeeper import backlog
from estat.store.db import Database
from estat.store.dispatch import LEASE_PENDING, MARK_DISPATCHED
from estat.store.lease import due, lease
from estat.store.outbox import SourceOutbox
from estat.store.retention import purge, rules
from estat.store.schema import user_activity_source_outbox

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
bench = importlib.import_module("dispatch_bench")

N = int(os.environ.get("BENCH_BACKLOG_ROWS", "100000"))
GAUGE_ROWS = int(os.environ.get("BENCH_GAUGE_ROWS", "1000000"))
LEASE = 1000

#: the plain lease: ``ORDER BY id`` (what the planner may serve by walking
#: the primary key)
PLAIN_PENDING = (
    "SELECT id, event_id, convert_to(payload::text, 'UTF8'), retry_count, created_at"
    " FROM user_activity_dispatch_outbox WHERE dispatch_target = %(t)s AND status = 'PENDING'"
    " AND (next_retry_at IS NULL OR next_retry_at <= %(now)s)"
    " ORDER BY id LIMIT %(n)s FOR NO KEY UPDATE SKIP LOCKED"
)


def stale(libpq: str, table: str) -> None:
    with psycopg.connect(libpq, autocommit=True) as c:
        c.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        c.execute(f"ANALYZE {table}")


def drain(step: Callable[[], int]) -> tuple[float, list[float]]:
    """Rows per second, and the times (ms) of a lease and its mark at
    10/50/90 % of the drain."""
    times: list[float] = []
    done = 0
    t0 = time.perf_counter()
    while True:
        t = time.perf_counter()
        n = step()
        times.append((time.perf_counter() - t) * 1e3)
        if not n:
            break
        done += n
    assert done == N, done
    rate = N / (time.perf_counter() - t0)
    k = len(times) - 1
    return rate, [times[int(k * f)] for f in (0.1, 0.5, 0.9)]


def dispatch_drain(pg: Any, lease_sql: str) -> tuple[float, list[float]]:
    url = pg.create_database()
    bench.fill(url, bench.events(N)).close()
    libpq = url.replace("postgresql+psycopg://", "postgresql://")
    stale(libpq, "user_activity_dispatch_outbox")
    now = datetime.now(UTC)
    with psycopg.connect(libpq) as conn:
        conn.execute("SET plan_cache_mode = force_custom_plan")  # as on a fresh connection
        conn.commit()

        def step() -> int:
            with conn.transaction():
                rows = conn.execute(
                    lease_sql, {"t": "POSTHOG", "n": LEASE, "now": now}, binary=True
                ).fetchall()
                if rows:
                    conn.execute(MARK_DISPATCHED, {"ids": [r[0] for r in rows], "now": now})
            return len(rows)

        return drain(step)


def source_drain(pg: Any, plain: bool) -> tuple[float, list[float]]:
    url = pg.create_database()
    db = Database(url)
    db.upgrade()
    box = SourceOutbox(db)
    recs = bench.events(N)
    for i in range(0, N, LEASE):
        box.enqueue(recs[i : i + LEASE])
    stale(url.replace("postgresql+psycopg://", "postgresql://"), "user_activity_source_outbox")
    now = datetime.now(UTC)
    table = user_activity_source_outbox

    def step() -> int:
        if plain:
            got = [r[0] for r in lease(db, table, due(table, now), LEASE, now, box.lease_for)]
        else:
            got = [r.id for r in box.lease(LEASE, now)]
        box.mark_published(got, now)
        return len(got)

    try:
        return drain(step)
    finally:
        db.close()


def show(name: str, ours: tuple[float, list[float]], plain: tuple[float, list[float]]) -> None:
    for label, (rate, ms) in (("estat", ours), ("ORDER BY id", plain)):
        print(
            f"{name:>16} {label:>12} {rate:>10,.0f} rows/s   lease + mark ms at 10/50/90 %: "
            + " / ".join(f"{m:.1f}" for m in ms)
        )


#: the backlog counts over the whole tables
WHOLE_TABLES = (
    "SELECT status, status = 'FAILED' AND next_retry_at IS NULL, count(*)"
    " FROM user_activity_source_outbox GROUP BY 1, 2",
    "SELECT status, status = 'FAILED' AND next_retry_at IS NULL, dispatch_target, count(*)"
    " FROM user_activity_dispatch_outbox GROUP BY 1, 2, 3",
    "SELECT dispatch_target, min(created_at) FROM user_activity_dispatch_outbox WHERE"
    " (status = 'PENDING' AND (next_retry_at IS NULL OR next_retry_at <= now()))"
    " OR (status = 'FAILED' AND next_retry_at <= now()) GROUP BY 1",
)


def gauges(pg: Any) -> tuple[float, float]:
    """Milliseconds of one backlog refresh: estat's, and over the whole tables."""
    url = pg.create_database()
    db = Database(url)
    db.upgrade()
    libpq = url.replace("postgresql+psycopg://", "postgresql://")
    done = GAUGE_ROWS - 1000
    with psycopg.connect(libpq, autocommit=True) as c:
        c.execute(
            "INSERT INTO user_activity_source_outbox (event_id, event_name, event_version,"
            " occurred_at, payload, status) SELECT md5(i::text), 'ui.page.viewed', 'v1', now(),"
            " %s::jsonb, CASE WHEN i <= %s THEN 'PUBLISHED' ELSE 'PENDING' END"
            " FROM generate_series(1, %s) i",
            (bench.PROPS.decode(), done, GAUGE_ROWS),
        )
        c.execute(
            "INSERT INTO user_activity_dispatch_outbox (event_id, dispatch_target, payload,"
            " status) SELECT md5(i::text), 'POSTHOG', %s::jsonb, CASE WHEN i <= %s"
            " THEN 'DISPATCHED' ELSE 'PENDING' END FROM generate_series(1, %s) i",
            (bench.PROPS.decode(), done, GAUGE_ROWS),
        )
        c.execute("VACUUM ANALYZE")

        def whole() -> None:
            for sql in WHOLE_TABLES:
                c.execute(sql).fetchall()

        now = datetime.now(UTC)
        ours = median_ms(lambda: backlog(db, now))
        theirs = median_ms(whole)
    db.close()
    return ours, theirs


#: the purge's statement without its bound (every row up to the newest read)
UNBOUNDED_PURGE = (
    "DELETE FROM user_activity_dispatch_outbox WHERE id IN (SELECT id FROM"
    " user_activity_dispatch_outbox WHERE status = 'DISPATCHED' AND dispatched_at < %s"
    " GROUP BY id ORDER BY id LIMIT 5000)"
)


def median_ms(fn: Callable[[], Any]) -> float:
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t) * 1e3)
    return sorted(runs)[2]


def purges(pg: Any) -> tuple[float, float]:
    """Milliseconds of a purge that finds nothing: estat's, and unbounded."""
    url = pg.create_database()
    db = Database(url)
    db.upgrade()
    libpq = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(libpq, autocommit=True) as c:
        c.execute(
            "INSERT INTO user_activity_dispatch_outbox (event_id, dispatch_target, payload,"
            " status, created_at, dispatched_at) SELECT md5(i::text), 'POSTHOG', '{}'::jsonb,"
            " 'DISPATCHED', now() - (%s - i) * interval '8 days' / %s,"
            " now() - (%s - i) * interval '8 days' / %s FROM generate_series(1, %s) i",
            (GAUGE_ROWS, GAUGE_ROWS, GAUGE_ROWS, GAUGE_ROWS, GAUGE_ROWS),
        )
        before = datetime.now(UTC) - timedelta(days=7)
        rule = rules()["dispatch_outbox"]
        while purge(db, rule, before) == 5000:
            pass
        c.execute("VACUUM ANALYZE")
        ours = median_ms(lambda: purge(db, rule, before))
        theirs = median_ms(lambda: c.execute(UNBOUNDED_PURGE, (before,)))
    db.close()
    return ours, theirs


async def main_async(pg: Any) -> None:
    print(f"draining a backlog of {N:,} rows analyzed while due, leases of {LEASE:,}")
    show(
        "dispatch outbox",
        dispatch_drain(pg, LEASE_PENDING),
        dispatch_drain(pg, PLAIN_PENDING),
    )
    show("source outbox", source_drain(pg, plain=False), source_drain(pg, plain=True))
    ours, whole = gauges(pg)
    print(
        f"backlog gauges, {GAUGE_ROWS:,} rows per outbox, 1,000 to send: estat {ours:.1f} ms,"
        f" over the whole tables {whole:.1f} ms (median of 5)"
    )
    ours, whole = purges(pg)
    print(
        f"a purge finding nothing, {GAUGE_ROWS:,} rows over 8 days, 7 kept: estat {ours:.1f} ms,"
        f" unbounded {whole:.1f} ms (median of 5)"
    )


def main() -> int:
    return int(bench.on_postgres(main_async))


if __name__ == "__main__":
    raise SystemExit(main())
