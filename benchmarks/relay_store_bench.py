"""``make bench`` (server events in one process): the relay (source outbox
→ in-process bus) and the store consumer (bus → event store) running
together in one process on one PostgreSQL database, as ``estat serve``
runs them, draining a source outbox of server events into the store.

Side by side in one run, alternating: each stage's statements on a thread
of its own (estat) and every statement on the database's one thread (a
``Database`` that ignores the stage's thread: how estat ran before).
Figures, not assertions.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import func, select

from estat.activity.consumer import StoreConsumer
from estat.ops.tasks import Supervisor
from estat.stage import Deadline
from estat.store.db import Database
from estat.store.events import EventStore
from estat.store.schema import user_activity_event

sys.path.insert(0, str(Path(__file__).resolve().parent))
relay_bench = importlib.import_module("relay_bench")
bench = relay_bench.bench

N: int = relay_bench.N
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
T = TypeVar("T")


class OneThread(Database):
    """Every stage's statements on the database's one thread."""

    async def run(self, fn: Callable[[], T], *, on: str | None = None) -> T:
        return await super().run(fn)


def stored(db: Database) -> int:
    with db.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(user_activity_event)).scalar_one())


async def drain(db: Database) -> float:
    """Server events in the source outbox → relay → bus → store: events/s."""
    relay, m, clock = await relay_bench.relay_of(db)
    store = StoreConsumer(
        relay.bus, EventStore(db, ["POSTHOG"]), consumer_name="bench", batch_size=500,
        max_deliveries=5, metrics=m, clock=clock, poll=0.05,
    )  # fmt: skip
    ok = m.store_events.labels("inserted")
    sup = Supervisor(m, lambda name: None)
    t0 = time.perf_counter()
    await store.start(sup.spawn)
    await relay.start(sup.spawn)
    while ok._value.get() < N:
        await asyncio.sleep(0.005)
    rate = N / (time.perf_counter() - t0)
    sup.stopping()
    for stage in (relay, store):
        stage.close()
        await stage.join(Deadline.after(10, clock))
    assert stored(db) == N
    db.close()
    return rate


async def main_async(pg: Any) -> None:
    rates: dict[str, list[float]] = {"one thread": [], "a thread per stage": []}
    for _ in range(ROUNDS):
        rates["one thread"].append(await drain(OneThread(pg.create_database())))
        rates["a thread per stage"].append(await drain(Database(pg.create_database())))
    print(f"relay + store consumer in one process, {N:,} server events, {ROUNDS} rounds")
    for name, r in rates.items():
        runs = ", ".join(f"{x:,.0f}" for x in r)
        print(f"  {name:>18}: {statistics.median(r):>8,.0f} events/s (median; {runs})")
    ratio = [b / a for a, b in zip(*rates.values(), strict=True)]
    print(f"  per stage / one thread: {statistics.median(ratio):.2f} (median of the rounds)")


def main() -> int:
    code: int = bench.on_postgres(main_async)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
