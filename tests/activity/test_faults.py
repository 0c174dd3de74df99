"""Faults on real servers: Redis stopped and restarted while events
arrive, PostgreSQL crashing under load, two relays and two store consumers
on one outbox and one stream. Loss oracle: unique ids, each stored once."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from estat.activity.common import Spool
from estat.activity.publisher import Publisher
from estat.activity.relay import Relay
from estat.bus.memory import MemoryBus
from estat.bus.redis_stream import RedisStreamBus
from estat.clock import SystemClock
from estat.ops.metrics import Metrics
from estat.ops.tasks import Supervisor
from estat.stage import Deadline, Stage
from estat.store.db import Database
from estat.store.outbox import SourceOutbox
from estat.store.schema import user_activity_event
from tests.activity.test_flow import consumer, rec, run_until, value
from tests.conftest import RedisServer, free_port
from tests.servers import PostgresServer


def stored(db: Database) -> list[str]:
    with db.engine.connect() as conn:
        return [r[0] for r in conn.execute(select(user_activity_event.c.event_id))]


async def stop_all(sup: Supervisor, *stages: object) -> None:
    sup.stopping()  # as the runtime does: from now on the tasks may end
    for s in stages:
        s.close()  # type: ignore[attr-defined]
    for s in stages:
        await s.join(Deadline.after(10, SystemClock()))  # type: ignore[attr-defined]


@pytest.mark.servers
async def test_redis_stopped_while_events_arrive_then_back(tmp_path: Path) -> None:
    redis = RedisServer(free_port(), tmp_path, persist=True)
    redis.start()
    db = Database(f"sqlite:///{tmp_path / 'e.db'}")
    db.upgrade()
    m = Metrics()
    sup = Supervisor(m, lambda name: None)
    bus = RedisStreamBus(redis.url, prefix="f", group="g", claim_idle=1.0, timeout=0.5)
    await bus.start()
    outbox = SourceOutbox(db)
    relay = Relay(outbox, bus, batch_size=100, poll_interval=0.1, metrics=m, clock=SystemClock())
    pub = Publisher(
        bus,
        outbox,
        Spool(tmp_path / "spool"),
        capacity=10_000,
        batch_size=50,
        metrics=m,
        clock=SystemClock(),
        on_outbox=relay.notify,
    )
    store = consumer(bus, db, m)
    for stage in (store, relay, pub):
        await stage.start(sup.spawn)
    ids: list[str] = []
    for round_ in range(30):
        batch = [rec() for _ in range(20)]
        pub.check_room(len(batch))
        pub.put(batch)
        ids += [r.event_id for r in batch]
        if round_ == 10:
            redis.stop()  # the bus goes away mid-stream
        if round_ == 20:
            redis.start()
        await asyncio.sleep(0.1)
    # the outbox rows written while Redis was down are due after their backoff (5-10 s)
    await run_until(lambda: len(stored(db)) >= len(ids), timeout=60)
    await stop_all(sup, pub, relay, store)
    assert sorted(stored(db)) == sorted(ids)
    assert value(m, "activity_publish_fallback_total", to="outbox") > 0
    assert not sup.failed
    await bus.close()
    redis.stop()
    db.close()


async def test_postgresql_crash_under_load_loses_nothing(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    db = Database(pg_url)
    db.upgrade()
    m = Metrics()
    sup = Supervisor(m, lambda name: None)
    bus = MemoryBus(capacity=100_000)
    store = consumer(bus, db, m)
    await store.start(sup.spawn)
    ids: list[str] = []
    from estat.activity.common import message_of
    from estat.store.rows import encode

    for round_ in range(40):
        batch = [rec() for _ in range(50)]
        await bus.publish([message_of(r, encode(r)) for r in batch])
        ids += [r.event_id for r in batch]
        if round_ == 15:
            await asyncio.to_thread(postgres_server.restart_immediate)
        await asyncio.sleep(0.02)
    await run_until(lambda: (len(stored(db)) if _up(db) else 0) >= len(ids), timeout=60)
    await stop_all(sup, store)
    assert sorted(stored(db)) == sorted(ids)
    assert not sup.failed
    db.close()


def _up(db: Database) -> bool:
    try:
        stored(db)
    except Exception:
        return False
    return True


async def test_two_relays_and_two_store_consumers_publish_and_store_each_event_once(
    redis_server: RedisServer, pg_url: str
) -> None:
    prefix = "two" + uuid.uuid4().hex[:6]
    dbs = [Database(pg_url) for _ in range(4)]
    dbs[0].upgrade()
    records = [rec() for _ in range(3000)]
    SourceOutbox(dbs[0]).enqueue(records)
    ms = [Metrics() for _ in range(4)]
    sup = Supervisor(Metrics(), lambda name: None)
    buses = [
        RedisStreamBus(redis_server.url, prefix=prefix, group="g", claim_idle=5) for _ in range(4)
    ]
    for b in buses:
        await b.start()
    relays = [
        Relay(
            SourceOutbox(dbs[i]),
            buses[i],
            batch_size=50,
            poll_interval=0.05,
            metrics=ms[i],
            clock=SystemClock(),
        )
        for i in (0, 1)
    ]
    stores = [consumer(buses[i], dbs[i], ms[i], name=f"c{i}") for i in (2, 3)]
    stages: list[Stage] = [*stores, *relays]
    for s in stages:
        await s.start(sup.spawn)
    await run_until(lambda: len(stored(dbs[0])) >= len(records), timeout=60)
    await stop_all(sup, *relays, *stores)
    published = [
        value(ms[i], "analytics_user_activity_outbox_publish_total", result="success")
        for i in (0, 1)
    ]
    assert sum(published) == len(records)  # no row published twice
    assert all(p > 0 for p in published)  # both relays worked
    info = await buses[0].redis.xinfo_stream(buses[0].stream)
    # one entry per published batch of 50: no batch published twice
    assert info["entries-added"] == len(records) // 50
    assert sorted(stored(dbs[0])) == sorted(r.event_id for r in records)
    inserted = [value(ms[i], "store_events_total", result="inserted") for i in (2, 3)]
    assert sum(inserted) == len(records)
    assert all(n > 0 for n in inserted)
    for b in buses:
        await b.close()
    for d in dbs:
        d.close()
