"""``estat store backfill`` from a local lake into a throwaway PostgreSQL:
``BENCH_BACKFILL_EVENTS`` client events (200,000 by default) in lake
objects of 5,000 (as the batcher cuts them), read and stored with a
dispatch row each for one destination, three ways in one run:

- **missing**: the event store is empty (the bus lost everything);
- **present**: every event is stored already (a backfill run again, or a
  wide window around a small loss): read and found, nothing written;
- **COPY**: the store's own write for the same events: its ``COPY`` +
  ``INSERT … SELECT`` fed rows decoded beforehand (no lake, no gzip, no
  decoding), in batches of 500: what the backfill adds to it is reading.

Prints events/s for each and missing / COPY. Not part of ``make bench``; a
figure for operators (how long a day of events takes), not an assertion
(``docs/benchmarks.md``).
"""

from __future__ import annotations

import asyncio
import gzip
import importlib
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
from sqlalchemy import text

from estat.activity.backfill import Backfill, from_lake
from estat.lake.sink import local_sink
from estat.model import EventRecord
from estat.store.db import Database
from estat.store.events import EventStore
from estat.store.rows import decode, encode, event_row

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
free_port = importlib.import_module("run").free_port
PostgresServer = importlib.import_module("tests.servers").PostgresServer

N = int(os.environ.get("BENCH_BACKFILL_EVENTS", "200000"))
PER_OBJECT = 5000
PREFIX = "events/dt=2026-12-01/hr=10/"


def record(i: int) -> EventRecord:
    return EventRecord(
        str(uuid.uuid4()),
        "ui.page.viewed",
        "v1",
        "2026-12-01T10:15:00.000Z",
        "2026-12-01T10:15:00.000Z",
        str(1000 + i % 5000) if i % 3 else None,
        f"anon-{i % 20000}",
        msgspec.Raw(b'{"page":"/restaurants/%d","position":3,"source":"CLIENT"}' % (i % 9000)),
        "CLIENT",
        "203.0.113.7",
        "Mozilla/5.0 (X11; Linux x86_64) bench",
    )


def write_lake(root: Path) -> list[bytes]:
    lines = [encode(record(i)) for i in range(N)]
    d = root / PREFIX
    d.mkdir(parents=True)
    for k in range(0, N, PER_OBJECT):
        body = b"\n".join(lines[k : k + PER_OBJECT]) + b"\n"
        (d / f"{k}_bench_{k // PER_OBJECT:06d}.jsonl.gz").write_bytes(gzip.compress(body, 6))
    return lines


def empty(db: Database) -> None:
    with db.engine.begin() as c:
        c.execute(text("TRUNCATE user_activity_event, user_activity_dispatch_outbox"))
    with db.engine.connect() as c:
        c.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))


def main() -> int:
    pg = PostgresServer(free_port())
    pg.start()
    try:
        db = Database(pg.create_database())
        db.upgrade()
        store = EventStore(db, ["POSTHOG"])
        with tempfile.TemporaryDirectory() as tmp:
            lines = write_lake(Path(tmp))
            sink = local_sink(Path(tmp))
            results: dict[str, list[float]] = {"missing": [], "present": [], "COPY": []}
            for _ in range(3):
                empty(db)
                t0 = time.perf_counter()
                tally = asyncio.run(from_lake(Backfill(store), sink, [PREFIX]))
                results["missing"].append(N / (time.perf_counter() - t0))
                assert (tally.inserted, tally.dispatch) == (N, {"POSTHOG": N}), tally
                t0 = time.perf_counter()
                tally = asyncio.run(from_lake(Backfill(store), sink, [PREFIX]))
                results["present"].append(N / (time.perf_counter() - t0))
                assert tally.duplicates == N, tally
                empty(db)
                rows = [event_row(decode(line)) for line in lines]
                payloads = [line.decode() for line in lines]
                t0 = time.perf_counter()
                for j in range(0, N, 500):
                    store.store(rows[j : j + 500], payloads[j : j + 500])
                results["COPY"].append(N / (time.perf_counter() - t0))
        med = {name: sorted(v)[1] for name, v in results.items()}
        for name, v in results.items():
            rounds = ", ".join(f"{x:,.0f}" for x in v)
            print(f"{name:8s} {med[name]:>10,.0f} events/s (median; rounds {rounds})")
        per = ", ".join(
            f"{m / c:.2f}" for m, c in zip(results["missing"], results["COPY"], strict=True)
        )
        print(f"missing / COPY: {med['missing'] / med['COPY']:.2f} (per round {per})")
        db.close()
    finally:
        pg.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
