"""The admin dispatch summary (``estat admin dispatch summary``) on a large
dispatch outbox: ``BENCH_SUMMARY_ROWS`` rows (3,000,000 by default, one in
1,000 still PENDING, the rest DISPATCHED, as a week's retention keeps them)
in a throwaway PostgreSQL, vacuumed; the summary timed twice (the second
with the table in the cache), beside a plain ``count(*)`` of the table,
and the answer past the budget (``SUMMARY_BUDGET``: the rows still to be
sent counted from their index, the rest estimated) with its error. Not part
of ``make bench`` (filling takes a minute); figures, not assertions: the
exact summary counts every row, so its time grows with the table
(``docs/benchmarks.md``).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text

import estat.store.budget as budget
from estat.store.db import Database
from estat.store.dispatch import DispatchOutbox

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
free_port = importlib.import_module("run").free_port
PostgresServer = importlib.import_module("tests.servers").PostgresServer

N = int(os.environ.get("BENCH_SUMMARY_ROWS", "3000000"))
PAYLOAD = (
    '{"event_id":"x","event_name":"ui.page.viewed","properties":{"page":"/restaurants/12345",'
    '"referrer":"https://www.example.org/search?q=sushi","position":3}}'
)


def main() -> int:
    pg = PostgresServer(free_port())
    pg.start()
    try:
        db = Database(pg.create_database())
        db.upgrade()
        with db.engine.begin() as c:
            c.execute(
                text(
                    "INSERT INTO user_activity_dispatch_outbox (event_id, dispatch_target, payload,"
                    " status, dispatched_at) SELECT md5(i::text), 'POSTHOG', CAST(:p AS jsonb),"
                    " CASE WHEN i % 1000 = 0 THEN 'PENDING' ELSE 'DISPATCHED' END, now()"
                    " FROM generate_series(1, :n) i"
                ),
                {"p": PAYLOAD, "n": N},
            )
        with db.engine.connect() as c:
            c.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM ANALYZE user_activity_dispatch_outbox")
            )
            size = c.execute(
                text(
                    "SELECT pg_size_pretty(pg_total_relation_size('user_activity_dispatch_outbox'))"
                )
            ).scalar()
        print(f"dispatch outbox: {N:,} rows, {size}")
        box = DispatchOutbox(db)
        for attempt in ("first", "again"):
            t0 = time.perf_counter()
            box.summary(datetime.now(UTC))
            print(f"  summary ({attempt}): {time.perf_counter() - t0:.3f} s")
        with db.engine.connect() as c:
            t0 = time.perf_counter()
            c.execute(text("SELECT count(*) FROM user_activity_dispatch_outbox")).scalar()
            print(f"  count(*): {time.perf_counter() - t0:.3f} s")
        exact = box.summary(datetime.now(UTC))["POSTHOG"]
        budget.SUMMARY_BUDGET = 0.001  # as if the table were far larger
        t0 = time.perf_counter()
        est = box.summary(datetime.now(UTC))["POSTHOG"]
        took = time.perf_counter() - t0
        off = est["DISPATCHED"] / exact["DISPATCHED"] - 1
        print(
            f"  past the budget: {took:.3f} s (with the 1 ms attempt); PENDING "
            f"{est['PENDING']:,} (exact {exact['PENDING']:,}), DISPATCHED ~{est['DISPATCHED']:,} "
            f"(exact {exact['DISPATCHED']:,}, {off:+.2%})"
        )
        db.close()
    finally:
        pg.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
