"""The stages of the user-activity pipeline on real parts: SQLite or a real
PostgreSQL server, the in-process bus or a real Redis server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlalchemy import select

from estat.activity.common import Spool
from estat.activity.consumer import StoreConsumer
from estat.activity.publisher import Publisher
from estat.activity.relay import Relay
from estat.bus.base import Message
from estat.bus.memory import MemoryBus
from estat.bus.redis_stream import RedisStreamBus
from estat.clock import FakeClock, SystemClock
from estat.model import EventRecord
from estat.ops.metrics import Metrics
from estat.ops.tasks import Supervisor
from estat.stage import Deadline
from estat.store.db import Database
from estat.store.events import EventStore
from estat.store.outbox import SourceOutbox
from estat.store.rows import encode
from estat.store.schema import user_activity_event, user_activity_source_outbox
from estat.store.trace import TraceLog, traces
from tests.conftest import RedisServer, free_port
from tests.servers import table_locked


def rec(props: bytes = b'{"source":"CLIENT"}') -> EventRecord:
    return EventRecord(
        uuid.uuid4().hex,
        "ui.page.viewed",
        "v1",
        "2026-11-30T10:00:00.000Z",
        "2026-11-30T10:00:01.000Z",
        None,
        "anon-1",
        msgspec.Raw(props),
        "CLIENT",
        "127.0.0.1",
        "ua",
    )


def consumer(
    bus: object,
    db: Database,
    m: Metrics,
    name: str = "c",
    *,
    batch_size: int = 100,
    max_deliveries: int = 5,
    **kw: Any,
) -> StoreConsumer:
    """A store consumer with short polls, on the system clock."""
    return StoreConsumer(
        bus,  # type: ignore[arg-type]
        EventStore(db),
        consumer_name=name,
        batch_size=batch_size,
        max_deliveries=max_deliveries,
        metrics=m,
        clock=SystemClock(),
        poll=0.05,
        **kw,
    )


def stored_ids(db: Database) -> list[str]:
    with db.engine.connect() as conn:
        return [r[0] for r in conn.execute(select(user_activity_event.c.event_id))]


def value(m: Metrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    return v or 0.0


@pytest.fixture
def supervisor() -> Supervisor:
    return Supervisor(Metrics(), lambda name: None)


async def run_until(cond, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


async def test_a_poison_message_is_isolated_retried_and_parked_while_the_rest_is_stored(
    db: Database,
) -> None:
    m = Metrics()
    bus = MemoryBus(retry_delay=0.01)
    trace = TraceLog(db, "all", bus.provider, bus.topic, "g")
    store = consumer(bus, db, m, max_deliveries=3, trace=trace)
    good = [rec() for _ in range(40)]
    # PostgreSQL's jsonb refuses \u0000; a payload that is not an event fails everywhere
    poison = rec(b'{"note":"a\\u0000b"}')
    not_event = Message("junk-1", "k", "", b"not json at all")
    msgs = [Message(r.event_id, "k", r.occurred_at, encode(r)) for r in [*good, poison]]
    await bus.publish([*msgs[:20], not_event, *msgs[20:]])
    sup = Supervisor(m, lambda name: None)
    await store.start(sup.spawn)
    want = {r.event_id for r in good} | ({poison.event_id} if db.dialect == "sqlite" else set())
    await run_until(lambda: len(bus.parked_list) == (2 if db.dialect == "postgresql" else 1))
    store.close()
    await store.join(Deadline.after(5, SystemClock()))
    assert sorted(stored_ids(db)) == sorted(want)
    parked_ids = {p[0].message_id for p in bus.parked_list}
    assert "junk-1" in parked_ids
    assert (poison.event_id in parked_ids) == (db.dialect == "postgresql")
    assert value(
        m, "mq_consume_count_total", topic="user-activity", provider="memory", result="parked"
    ) == len(parked_ids)
    assert value(
        m, "mq_consume_count_total", topic="user-activity", provider="memory", result="fail"
    ) == 2 * len(parked_ids)
    assert value(m, "store_events_total", result="inserted") == len(want)
    await asyncio.to_thread(trace.flush)
    fails = traces(db, "junk-1", 10)
    assert [t["stage"] for t in fails] == ["CONSUME_FAIL"] * 3
    assert len(traces(db, good[0].event_id, 10)) == 1  # CONSUME_SUCCESS


async def test_a_statement_the_database_refuses_for_every_event_parks_none(
    db: Database,
) -> None:
    """The event table missing (restored under another name, dropped by
    mistake; a revoked privilege is the same class of error on PostgreSQL):
    no event can be stored, and none is at fault. The batch is held and
    retried like a database that is down, not split and every event parked
    as if it were bad; once the table is back every event is stored."""
    from sqlalchemy import text

    m = Metrics()
    bus = MemoryBus(retry_delay=0.01)
    store = consumer(bus, db, m, max_deliveries=3)
    store._clock = FakeClock()  # the retries' backoff passes at once
    events = [rec() for _ in range(30)]
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE user_activity_event RENAME TO event_away"))
    await bus.publish([Message(r.event_id, "k", r.occurred_at, encode(r)) for r in events])
    sup = Supervisor(m, lambda name: None)
    await store.start(sup.spawn)
    await run_until(lambda: value(m, "store_events_total", result="failed") >= 90)
    assert bus.parked_list == []
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE event_away RENAME TO user_activity_event"))
    await run_until(lambda: len(stored_ids(db)) == 30)
    store.close()
    await store.join(Deadline.after(5, SystemClock()))
    assert sorted(stored_ids(db)) == sorted(r.event_id for r in events)
    assert bus.parked_list == []


async def test_bus_down_goes_to_the_outbox_and_the_relay_publishes_once_it_is_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Publisher → (Redis down) → outbox FAILED → relay → Redis → store: every id once."""
    db = Database(f"sqlite:///{tmp_path / 'e.db'}")
    db.upgrade()
    m = Metrics()
    clock = FakeClock()
    dead = RedisStreamBus(
        f"redis://127.0.0.1:{free_port()}/0", prefix="p" + uuid.uuid4().hex[:6], timeout=0.3
    )
    outbox = SourceOutbox(db)
    pub = Publisher(
        dead,
        outbox,
        Spool(tmp_path / "spool"),
        capacity=1000,
        batch_size=50,
        metrics=m,
        clock=clock,
    )
    sup = Supervisor(m, lambda name: None)
    await pub.start(sup.spawn)
    records = [rec() for _ in range(120)]
    pub.check_room(len(records))
    pub.put(records)
    await run_until(
        lambda: pub.queued == 0 and value(m, "activity_publish_fallback_total", to="outbox") == 120
    )
    pub.close()
    assert await pub.join(Deadline.after(5, SystemClock())) == 0
    assert outbox.summary()["failedCount"] == 120
    # the bus comes back (a live Redis); rows are due after their backoff
    live = RedisStreamBus(redis_server.url, prefix=dead.stream.split(":")[0], group="g")
    await live.start()
    relay = Relay(outbox, live, batch_size=50, poll_interval=0.05, metrics=m, clock=clock)
    clock.advance(60)
    while await relay.relay_once():
        pass
    assert outbox.summary()["publishedCount"] == 120
    store = consumer(live, db, m, max_deliveries=3)
    await store.start(sup.spawn)
    await run_until(lambda: len(stored_ids(db)) == 120)
    store.close()
    await store.join(Deadline.after(5, SystemClock()))
    assert sorted(stored_ids(db)) == sorted(r.event_id for r in records)
    assert value(m, "analytics_user_activity_outbox_publish_total", result="success") == 120
    await live.close()
    await dead.close()
    db.close()


async def test_stopping_with_bus_and_database_down_spools_and_the_next_start_publishes(
    tmp_path: Path,
) -> None:
    db = Database(f"sqlite:///{tmp_path / 'e.db'}")
    db.upgrade()
    m = Metrics()
    dead_bus = RedisStreamBus(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    broken = Database(f"postgresql://nobody@127.0.0.1:{free_port()}/x")  # nothing listens
    spool = Spool(tmp_path / "spool")
    pub = Publisher(
        dead_bus,
        SourceOutbox(broken),
        spool,
        capacity=1000,
        batch_size=50,
        metrics=m,
        clock=FakeClock(),
    )
    sup = Supervisor(m, lambda name: None)
    records = [rec() for _ in range(30)]
    pub.put(records)
    await pub.start(sup.spawn)
    await asyncio.sleep(0.5)
    pub.close()
    assert await pub.join(Deadline.after(3, SystemClock())) == 0
    assert spool.count() == 30
    assert value(m, "activity_publish_fallback_total", to="spool") == 30
    # next start: a bus that works (in-process) takes the spooled events
    bus = MemoryBus()
    pub2 = Publisher(
        bus, SourceOutbox(db), spool, capacity=1000, batch_size=50, metrics=m, clock=FakeClock()
    )
    await pub2.start(sup.spawn)
    await run_until(lambda: spool.count() == 0)
    pub2.close()
    await pub2.join(Deadline.after(3, SystemClock()))
    assert (await bus.stats()).pending == 30
    await dead_bus.close()
    broken.close()
    db.close()


async def test_what_the_in_process_bus_holds_at_the_deadline_goes_to_the_outbox(
    tmp_path: Path,
) -> None:
    db = Database(f"sqlite:///{tmp_path / 'e.db'}")
    db.upgrade()
    m = Metrics()
    bus = MemoryBus()
    outbox = SourceOutbox(db)
    store = consumer(
        bus,
        db,
        m,
        batch_size=10,
        max_deliveries=3,
        rescue=lambda records: db.run(lambda: outbox.enqueue(records)),
    )
    records = [rec() for _ in range(300)]
    await bus.publish([Message(r.event_id, "k", r.occurred_at, encode(r)) for r in records])
    sup = Supervisor(m, lambda name: None)
    await store.start(sup.spawn)
    sup.stopping()
    store.close()
    assert await store.join(Deadline.after(0.0, SystemClock())) == 0  # no time to store
    with db.engine.connect() as conn:
        in_outbox = [r[0] for r in conn.execute(select(user_activity_source_outbox.c.event_id))]
    stored = stored_ids(db)
    assert sorted(stored + in_outbox) == sorted(r.event_id for r in records)
    assert in_outbox  # the deadline left work: it went to the outbox
    assert (await bus.stats()).pending == 0
    db.close()


async def test_a_stop_interrupts_an_idle_fetch_of_the_in_process_bus() -> None:
    # An empty in-process bus: the consumer's reader waits in a fetch with a
    # long poll. close() interrupts it, so the stage ends without waiting
    # for the poll (the join below would otherwise sit out the full minute).
    bus = MemoryBus()
    consumer = bus.consumer("c")
    fetch = asyncio.create_task(consumer.fetch(10, 60.0))
    await asyncio.sleep(0.01)
    assert not fetch.done()
    consumer.interrupt()
    assert await asyncio.wait_for(fetch, 5) == []
    # and after it, a fetch waits again as usual for what is published
    second = asyncio.create_task(consumer.fetch(10, 60.0))
    await asyncio.sleep(0.01)
    assert not second.done()
    second.cancel()


class _GatedBus(MemoryBus):
    """An in-process bus whose publishes wait for the test to let them
    through, and that records the size of each."""

    def __init__(self) -> None:
        super().__init__(capacity=10_000)
        self.sizes: list[int] = []
        self.gate = asyncio.Event()

    async def publish(self, messages: Sequence[Message]) -> None:
        self.sizes.append(len(messages))
        await self.gate.wait()
        await super().publish(messages)


async def test_the_publisher_fills_batches_while_one_is_in_flight_and_keeps_the_order(
    tmp_path: Path,
) -> None:
    db = Database(f"sqlite:///{tmp_path / 'e.db'}")
    db.upgrade()
    bus = _GatedBus()
    m = Metrics()
    pub = Publisher(
        bus, SourceOutbox(db), Spool(tmp_path / "spool"), capacity=1000, batch_size=4,
        metrics=m, clock=FakeClock(),
    )  # fmt: skip
    sup = Supervisor(m, lambda name: None)
    await pub.start(sup.spawn)
    first = [rec()]
    pub.put(first)
    await run_until(lambda: bus.sizes == [1])  # sent at once: nothing was in flight
    later = [[rec() for _ in range(3)], [rec() for _ in range(3)]]  # two requests
    for chunk in later:
        pub.put(chunk)
    for _ in range(20):
        await asyncio.sleep(0)
    # a full batch goes beside the one in flight; the partial rest waits
    assert bus.sizes == [1, 4]
    bus.gate.set()
    await run_until(lambda: sum(bus.sizes) == 7)
    assert bus.sizes == [1, 4, 2]  # full batches, a request split across two
    pub.close()
    assert await pub.join(Deadline.after(10, SystemClock())) == 0
    got = await bus.consumer("c").fetch(100, 1)
    sent = first + later[0] + later[1]
    assert [d.message.message_id for d in got] == [r.event_id for r in sent]
    assert [d.message.payload for d in got] == [encode(r) for r in sent]


async def test_a_relay_waiting_on_the_database_does_not_hold_up_the_store_consumer(
    db: Database,
) -> None:
    """One process, one database: the relay's lease waits (another session
    locks the source outbox) while events arrive on the bus; the store
    consumer stores them all the same, and the relay publishes its rows once
    the lock goes: every id stored once."""
    if db.dialect != "postgresql":
        pytest.skip("SQLite has one writer: the stages share its thread")

    m = Metrics()
    bus = MemoryBus()
    outbox = SourceOutbox(db)
    server = [rec() for _ in range(30)]
    outbox.enqueue(server)
    relay = Relay(outbox, bus, batch_size=50, poll_interval=0.05, metrics=m, clock=SystemClock())
    store = consumer(bus, db, m)
    sup = Supervisor(m, lambda name: None)
    client = [rec() for _ in range(40)]
    with table_locked(db.url, "user_activity_source_outbox") as holder:
        await relay.start(sup.spawn)
        await store.start(sup.spawn)
        await asyncio.sleep(0.3)  # the relay's lease is waiting for the lock
        await bus.publish([Message(r.event_id, "k", r.occurred_at, encode(r)) for r in client])
        await run_until(lambda: len(stored_ids(db)) == 40, timeout=10)  # not behind the relay
        holder.rollback()
    await run_until(lambda: len(stored_ids(db)) == 70)
    for stage in (relay, store):
        stage.close()
        await stage.join(Deadline.after(5, SystemClock()))
    assert sorted(stored_ids(db)) == sorted(r.event_id for r in [*server, *client])
    assert outbox.summary()["publishedCount"] == 30
