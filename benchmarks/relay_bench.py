"""``make bench`` (the relay): server events from the source outbox of a
throwaway PostgreSQL to the in-process bus, one relay, side by side in one
run, alternating: the relay's lease as estat takes it (a transaction
holding the rows' locks during the publish; each row written once, by its
mark) and as a lease that moves ``next_retry_at`` ahead first (one more
write per row, no transaction open during the publish: how estat leased
before, and how it still leases on SQLite). Beside each rate, the row
versions PostgreSQL wrote per event (``pg_stat_user_tables.n_tup_upd``).
Figures, not assertions.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text

from estat.activity.relay import Relay
from estat.bus.memory import MemoryBus
from estat.clock import SystemClock
from estat.ops.metrics import Metrics
from estat.ops.tasks import Supervisor
from estat.stage import Deadline
from estat.store.db import Database
from estat.store.outbox import Lease, SourceOutbox

sys.path.insert(0, str(Path(__file__).resolve().parent))
bench = importlib.import_module("dispatch_bench")

N = int(os.environ.get("BENCH_SERVER_EVENTS", "30000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
BATCH = 500


class LeaseAhead(SourceOutbox):
    """The lease that writes ``next_retry_at`` a lease ahead, on PostgreSQL too."""

    def take(self, limit: int, now: datetime) -> Lease:
        return Lease(self.lease(limit, now))


def updates(db: Database) -> int:
    with db.engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_force_next_flush()"))
        return int(
            conn.execute(
                text(
                    "SELECT n_tup_upd FROM pg_stat_user_tables"
                    " WHERE relname = 'user_activity_source_outbox'"
                )
            ).scalar_one()
        )


async def relay_of(
    db: Database, kind: type[SourceOutbox] = SourceOutbox
) -> tuple[Relay, Metrics, SystemClock]:
    """``N`` server events in the source outbox of ``db`` (migrated here), and
    a relay (not started) to an in-process bus that holds them all."""
    db.upgrade()
    outbox = kind(db)
    recs = bench.events(N)
    for i in range(0, N, 1000):
        outbox.enqueue(recs[i : i + 1000])
    m, clock = Metrics(), SystemClock()
    bus = MemoryBus(capacity=N)
    await bus.start()
    relay = Relay(outbox, bus, batch_size=BATCH, poll_interval=0.05, metrics=m, clock=clock)
    return relay, m, clock


async def drain(url: str, kind: type[SourceOutbox]) -> tuple[float, float]:
    """The outbox drained by one relay: (events/s, row versions written per event)."""
    db = Database(url)
    relay, m, clock = await relay_of(db, kind)
    ok = m.outbox_publish.labels("success")
    sup = Supervisor(m, lambda name: None)
    time.sleep(1.0)  # the enqueuing's statistics flushed
    before = updates(db)
    t0 = time.perf_counter()
    await relay.start(sup.spawn)
    while ok._value.get() < N:
        await asyncio.sleep(0.002)
    rate = N / (time.perf_counter() - t0)
    sup.stopping()
    relay.close()
    await relay.join(Deadline.after(10, clock))
    db.close()
    time.sleep(1.0)  # the relay's connections' statistics flushed as they closed
    db = Database(url)
    written = (updates(db) - before) / N
    db.close()
    return rate, written


async def main_async(pg: Any) -> None:
    kinds = {"lease ahead, then mark": LeaseAhead, "held lease (estat)": SourceOutbox}
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for _ in range(ROUNDS):
        for name, kind in kinds.items():
            got[name].append(await drain(pg.create_database(), kind))
    print(f"one relay, {N:,} server events, batches of {BATCH}, {ROUNDS} rounds, alternating")
    for name, runs in got.items():
        rates = ", ".join(f"{r:,.0f}" for r, _ in runs)
        print(
            f"  {name:>22}: {statistics.median(r for r, _ in runs):>8,.0f} events/s "
            f"(median; {rates}), {statistics.median(w for _, w in runs):.2f} row writes per event"
        )
    ratio = [b[0] / a[0] for a, b in zip(*got.values(), strict=True)]
    print(f"  held / ahead: {statistics.median(ratio):.2f} (median of the rounds)")


if __name__ == "__main__":
    raise SystemExit(bench.on_postgres(main_async))
