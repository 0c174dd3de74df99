"""A design option measured, not what estat runs: the dispatcher on a
dispatch outbox whose DISPATCHED mark is a heap-only update (HOT).

Beside estat's outbox as it is, in the same run, the same dispatcher on a
table where no index covers a column the mark changes (the two status
indexes dropped, one on ``(dispatch_target, id)`` instead) with
``fillfactor = 50`` (room on each page for the new row versions), PENDING
rows found from an id floor kept in memory. The floor is the part left
out: here every row is committed before the run starts; a real one must
advance only past ids whose inserting transactions have all ended, or rows
are left unsent. ``python benchmarks/dispatch_heaponly_bench.py``; not part
of ``make bench``.
"""

from __future__ import annotations

import importlib
import statistics
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from estat.model import EventRecord
from estat.store import dispatch as outbox
from estat.store.db import Database
from estat.store.events import EventStore
from estat.store.rows import encode, event_row

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
bench = importlib.import_module("dispatch_bench")

HEAP_ONLY = (
    "ALTER TABLE user_activity_dispatch_outbox SET (fillfactor = 50)",
    "DROP INDEX idx_user_activity_dispatch_outbox_status_retry",
    "DROP INDEX idx_user_activity_dispatch_outbox_target_status",
    "CREATE INDEX heap_only_target_id ON user_activity_dispatch_outbox (dispatch_target, id)",
)
LEASE = (
    outbox._COLS + "id > %(f)s AND status = 'PENDING' AND next_retry_at IS NULL"
    " ORDER BY id LIMIT %(n)s FOR NO KEY UPDATE SKIP LOCKED"
)
_floor = [0]
_estat_lease = outbox._lease_pg


def _floor_lease(
    conn: Connection, target: str, limit: int, now: datetime
) -> list[outbox.DispatchRow]:
    with outbox._driver_cursor(conn) as cur:
        cur.execute(LEASE, {"t": target, "n": limit, "f": _floor[0]})
        rows = [outbox.DispatchRow(*r) for r in cur.fetchall()]
    if rows:
        _floor[0] = max(_floor[0], rows[-1].id)
    return rows


def filler(heap_only: bool) -> Any:
    def fill(db_url: str, recs: list[EventRecord]) -> Database:
        db = Database(db_url)
        db.upgrade()
        if heap_only:
            with db.engine.begin() as conn:
                for ddl in HEAP_ONLY:
                    conn.execute(text(ddl))
        store = EventStore(db, ["POSTHOG"])
        for i in range(0, len(recs), 1000):
            chunk = recs[i : i + 1000]
            store.store([event_row(r) for r in chunk], [encode(r).decode() for r in chunk])
        with db.engine.begin() as conn:
            conn.execute(text("ANALYZE user_activity_dispatch_outbox"))
        _floor[0] = 0
        return db

    return fill


async def main_async(pg: Any) -> None:
    proc, url = bench.start_capture()
    try:
        print(f"dispatch, {bench.N:,} events per run, {bench.ROUNDS} runs of each, medians")
        for batch in (100, 1000):
            got: dict[bool, list[tuple[float, tuple[float, float, float]]]] = {
                False: [],
                True: [],
            }
            for _ in range(bench.ROUNDS):
                for heap_only in (False, True):
                    setattr(bench, "fill", filler(heap_only))  # noqa: B010
                    outbox._lease_pg = _floor_lease if heap_only else _estat_lease
                    got[heap_only].append(
                        await bench.dispatch(
                            pg.create_database(), url, bench.events(bench.N), batch, proc.pid
                        )
                    )
            outbox._lease_pg = _estat_lease
            for heap_only, runs in got.items():
                cpu = [statistics.median(s[i] for _, s in runs) for i in range(3)]
                print(
                    f"batch {batch:>5} {'heap-only mark' if heap_only else 'estat as it is':>15}: "
                    f"{statistics.median(r for r, _ in runs):>8,.0f} ev/s; CPU us per event: "
                    f"dispatcher {cpu[0]:.1f}, capture {cpu[1]:.1f}, database {cpu[2]:.1f}"
                )
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    raise SystemExit(bench.on_postgres(main_async))
