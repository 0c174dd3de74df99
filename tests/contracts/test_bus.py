"""One contract, three buses: the in-process bus, a real Redis server
(Streams) and a real nats-server (JetStream). Every test publishes unique
ids and checks where each one ends up."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from nats.js.errors import NotFoundError

from estat.bus import nats as nats_bus
from estat.bus.base import Bus, BusError, Consumer, Delivery, Message, message_of
from estat.bus.memory import MemoryBus
from estat.bus.nats import NatsBus
from estat.bus.redis_stream import RedisStreamBus
from estat.model import EventRecord
from estat.store.rows import encode
from tests.conftest import RedisServer
from tests.servers import NatsServer, NetnsHost

IDLE = 0.3  # MQ_CLAIM_IDLE / nak delay in these tests


@pytest.fixture(params=["memory", "redis-stream", "redis-stream-event", "nats"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    prefix = "t" + uuid.uuid4().hex[:8]
    b: Bus
    if request.param == "memory":
        b = MemoryBus(capacity=1000, retry_delay=IDLE)
    elif request.param.startswith("redis-stream"):
        server: RedisServer = request.getfixturevalue("redis_server")
        entry = "event" if request.param.endswith("-event") else "batch"
        b = RedisStreamBus(server.url, prefix=prefix, group="g", claim_idle=IDLE, entry=entry)
    else:
        nserver: NatsServer = request.getfixturevalue("nats_server")
        b = NatsBus(nserver.url, prefix=prefix, group="g", claim_idle=1.0, retry_delay=IDLE)
    await b.start()
    yield b
    await b.close()


def event(i: int) -> EventRecord:
    return EventRecord(
        uuid.uuid4().hex,
        "ui.page.viewed",
        "1",
        "2026-01-01T00:00:00.000Z",
        "2026-01-01T00:00:00.000Z",
        str(i) if i % 2 else None,
        f"anon-{i}",
        msgspec.Raw(b'{"i":%d}' % i),
        "CLIENT",
        "127.0.0.1",
        "ua",
    )


def msgs(n: int) -> list[Message]:
    """Events, as the publisher and the relay put them on the bus."""
    return [message_of(r, encode(r)) for r in map(event, range(n))]


async def drain(c: Consumer, want: int, timeout: float = 10.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += await c.fetch(want - len(got), 0.2)
    return got


async def test_published_messages_are_delivered_once_acked(bus: Bus) -> None:
    sent = msgs(25)
    await bus.publish(sent)
    c = bus.consumer("c1")
    got = await drain(c, 25)
    assert sorted(d.message.message_id for d in got) == sorted(m.message_id for m in sent)
    first = {d.message.message_id: d.message for d in got}[sent[3].message_id]
    assert first == sent[3]  # payload, key, time and headers travel unchanged
    assert all(d.deliveries == 1 for d in got)
    await c.ack(got)
    assert await c.fetch(10, 2 * IDLE + 1.2) == []  # nothing comes back after the ack
    assert (await bus.stats()).pending == 0
    await c.close()


async def test_a_retried_message_comes_back_with_its_delivery_count(bus: Bus) -> None:
    sent = msgs(3)
    await bus.publish(sent)
    c = bus.consumer("c1")
    got = await drain(c, 3)
    bad = next(d for d in got if d.message.message_id == sent[1].message_id)
    await c.ack([d for d in got if d is not bad])
    await c.retry(bad, "boom")
    again = await drain(c, 1, timeout=10)
    # It comes back; a provider that packs a batch in one bus message may
    # bring the batch's others back with it (stored already: duplicates).
    ids = {d.message.message_id for d in again}
    assert sent[1].message_id in ids
    assert ids <= {m.message_id for m in sent}
    assert all(d.deliveries == 2 for d in again)
    await c.ack(again)
    assert (await bus.stats()).pending == 0
    await c.close()


async def test_a_parked_message_leaves_the_flow_and_is_counted(bus: Bus) -> None:
    sent = msgs(4)
    await bus.publish(sent)
    c = bus.consumer("c1")
    got = await drain(c, 4)
    bad = next(d for d in got if d.message.message_id == sent[0].message_id)
    await c.park(bad, "poison")
    await c.ack([d for d in got if d is not bad])
    assert await c.fetch(10, 2 * IDLE + 1.2) == []
    stats = await bus.stats()
    assert (stats.pending, stats.parked) == (0, 1)
    # an operator lists it and, once the cause is fixed, requeues it
    parked = await bus.parked(10)
    assert [p.message for p in parked] == [bad.message]
    assert parked[0].error == "poison"
    assert parked[0].deliveries == bad.deliveries
    assert await bus.requeue([parked[0].id, "0-1", "nope"]) == 1  # unknown ids are skipped
    assert (await bus.stats()).parked == 0
    again = await drain(c, 1)
    assert [d.message for d in again] == [bad.message]
    assert again[0].deliveries == 1  # a fresh start
    await c.ack(again)
    assert (await bus.stats()).pending == 0
    assert await bus.parked(10) == []
    await c.close()


async def test_what_a_dead_consumer_held_goes_to_a_live_one(bus: Bus) -> None:
    sent = msgs(10)
    await bus.publish(sent)
    dead = bus.consumer("dead")
    held = await drain(dead, 10)
    assert len(held) == 10
    await dead.close()  # never acked: for Redis and NATS as if the process had died
    live = bus.consumer("live")
    got = await drain(live, 10, timeout=15)
    assert sorted(d.message.message_id for d in got) == sorted(m.message_id for m in sent)
    assert all(d.deliveries >= 2 for d in got)
    await live.ack(got)
    assert (await bus.stats()).pending == 0
    await live.close()


@pytest.mark.parametrize("entry", ["batch", "event"])
async def test_redis_trim_never_drops_what_a_group_has_not_acked(
    redis_server: RedisServer, entry: str
) -> None:
    prefix = "t" + uuid.uuid4().hex[:8]
    a = RedisStreamBus(redis_server.url, prefix=prefix, group="a", claim_idle=IDLE, entry=entry)
    b = RedisStreamBus(redis_server.url, prefix=prefix, group="b", claim_idle=IDLE, entry=entry)
    await a.start()
    await b.start()
    sent = msgs(300)
    for i in range(0, 300, 10):
        await a.publish(sent[i : i + 10])
    entries = await a.redis.xlen(a.stream)
    assert entries == (30 if entry == "batch" else 300)
    ca, cb = a.consumer("x"), b.consumer("y")
    got_a = await drain(ca, 300)
    await ca.ack(got_a)  # group a is done, group b has read nothing
    await a.trim()
    got_b = await drain(cb, 300)
    assert sorted(d.message.message_id for d in got_b) == sorted(m.message_id for m in sent)
    await cb.ack(got_b)
    await a.trim()
    assert await a.redis.xlen(a.stream) < entries  # everything acked by both: trimmed
    await a.close()
    await b.close()


async def test_an_unreachable_bus_raises_bus_error() -> None:
    from tests.conftest import free_port

    b = RedisStreamBus(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    with pytest.raises(BusError):
        await b.publish(msgs(1))
    await b.close()
    n = NatsBus(f"nats://127.0.0.1:{free_port()}", timeout=0.5)
    with pytest.raises(BusError):
        await n.start()
    await n.close()


async def test_the_memory_bus_refuses_beyond_its_capacity() -> None:
    b = MemoryBus(capacity=5)
    await b.publish(msgs(5))
    with pytest.raises(BusError):
        await b.publish(msgs(1))


async def test_redis_reads_both_entry_formats_in_one_stream(redis_server: RedisServer) -> None:
    # A stream written by a producer of one format and then the other (an
    # upgrade, or MQ_REDIS_ENTRY changed): every event is read, once.
    prefix = "t" + uuid.uuid4().hex[:8]
    per_event = RedisStreamBus(redis_server.url, prefix=prefix, group="g", entry="event")
    batched = RedisStreamBus(redis_server.url, prefix=prefix, group="g", entry="batch")
    await per_event.start()
    old, new = msgs(7), msgs(40)
    await per_event.publish(old)
    await batched.publish(new[:20])
    await batched.publish(new[20:])
    c = batched.consumer("c")
    got = await drain(c, 47)
    assert sorted(d.message.message_id for d in got) == sorted(m.message_id for m in old + new)
    assert {d.message.message_id: d.message for d in got}[old[2].message_id] == old[2]
    await c.ack(got)
    assert (await batched.stats()).pending == 0
    await per_event.close()
    await batched.close()


async def test_redis_an_unreadable_batch_entry_is_one_delivery_that_can_be_parked(
    redis_server: RedisServer,
) -> None:
    prefix = "t" + uuid.uuid4().hex[:8]
    b = RedisStreamBus(redis_server.url, prefix=prefix, group="g", claim_idle=IDLE)
    await b.start()
    await b.redis.xadd(b.stream, {"topic": "user-activity", "count": 3, "batch": b"\xc1garbage"})
    c = b.consumer("c")
    got = await drain(c, 1)
    assert len(got) == 1
    assert got[0].message.payload == b""
    await c.park(got[0], "unreadable")
    stats = await b.stats()
    assert (stats.pending, stats.parked) == (0, 1)
    await b.close()


async def test_redis_batch_mode_carries_a_message_that_is_not_an_event_in_its_own_entry(
    redis_server: RedisServer,
) -> None:
    # A broken outbox row is published as it is (the store parks it): in
    # batch mode it cannot be a bare line, so it travels with its fields.
    prefix = "t" + uuid.uuid4().hex[:8]
    b = RedisStreamBus(redis_server.url, prefix=prefix, group="g", claim_idle=IDLE)
    await b.start()
    sent = msgs(3)
    odd = Message("odd-1", "odd-1", "", b'{"not": "an event",\n "x": 1}', {"source": "SERVER"})
    await b.publish([sent[0], odd, sent[1], sent[2]])
    assert await b.redis.xlen(b.stream) == 2  # the three events in one entry, the odd one alone
    c = b.consumer("c")
    got = await drain(c, 4)
    assert sorted((d.message for d in got), key=lambda m: m.message_id) == sorted(
        [*sent, odd], key=lambda m: m.message_id
    )
    await c.ack(got)
    assert (await b.stats()).pending == 0
    await b.close()


async def _lose_the_stream(bus: Bus) -> None:
    """What a Redis restarted without its data, or a NATS server that lost
    its JetStream storage, leaves: no stream, no group, no consumer."""
    if isinstance(bus, RedisStreamBus):
        assert await bus.redis.delete(bus.stream) == 1
    else:
        assert isinstance(bus, NatsBus)
        js = await bus._connect()
        assert await js.delete_stream(bus.stream)


async def test_a_running_consumer_reads_on_after_the_bus_lost_its_stream(bus: Bus) -> None:
    """Without this, Redis's consumer read NOGROUP forever while publishers
    re-created the stream, and NATS's publishes failed for want of a stream
    (every event to the source outbox), until the processes restarted."""
    if isinstance(bus, MemoryBus):
        pytest.skip("the in-process bus is lost only with its process")
    lost: list[int] = []
    bus.on_lost = lambda: lost.append(1)
    c = bus.consumer("c")
    await bus.publish(msgs(3))
    await c.ack(await drain(c, 3))
    assert lost == []
    await _lose_the_stream(bus)
    later = msgs(5)
    await asyncio.gather(*(bus.publish([m]) for m in later))  # all notice at once
    got = await drain(c, 5)
    assert sorted(d.message.message_id for d in got) == sorted(m.message_id for m in later)
    await c.ack(got)
    assert (await bus.stats()).pending == 0
    assert lost == [1]  # counted once (mq_bus_lost_total)
    await c.close()


async def test_nats_an_idle_consumer_declares_its_deleted_durable_again(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interest stream with no consumer keeps nothing: events published
    after `nats consumer rm` were dropped, and the pulls of the running
    consumer only timed out, as idle ones do."""
    monkeypatch.setattr(nats_bus, "CHECK_CONSUMER_EVERY", 0.2)
    b = NatsBus(nats_server.url, prefix="t" + uuid.uuid4().hex[:8], group="g", claim_idle=1.0)
    await b.start()
    c = b.consumer("c")
    js = await b._connect()
    assert await js.delete_consumer(b.stream, b.group)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert await c.fetch(10, 0.1) == []
        try:
            await js.consumer_info(b.stream, b.group)
            break
        except NotFoundError:
            continue
    sent = msgs(5)
    await b.publish(sent)
    got = await drain(c, 5)
    assert sorted(d.message.message_id for d in got) == sorted(m.message_id for m in sent)
    await c.ack(got)
    await c.close()
    await b.close()


@pytest.mark.servers  # starts its own server
@pytest.mark.parametrize("persist", [False, True])
async def test_redis_without_an_append_only_file_is_named_at_start(
    tmp_path: Path, persist: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import free_port

    server = RedisServer(free_port(), tmp_path, persist=persist)
    server.start()
    try:
        b = RedisStreamBus(server.url, prefix="t" + uuid.uuid4().hex[:8], group="g")
        capsys.readouterr()
        await b.start()
        said = capsys.readouterr().out
        await b.close()
    finally:
        server.stop()
    assert ("appendonly no" in said) is not persist, said
    assert "evict" not in said


async def test_redis_that_may_evict_the_stream_is_named_at_start(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    b = RedisStreamBus(redis_server.url, prefix="t" + uuid.uuid4().hex[:8], group="g")
    await b.redis.config_set("maxmemory", "512mb")
    await b.redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        capsys.readouterr()
        await b.start()
        said = capsys.readouterr().out
    finally:
        await b.redis.config_set("maxmemory", "0")
        await b.redis.config_set("maxmemory-policy", "noeviction")
        await b.close()
    assert "maxmemory-policy allkeys-lru" in said, said


@pytest.mark.servers  # starts its own server
async def test_nats_an_outage_is_one_structured_line_not_a_traceback_a_second(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py's default error callback logs a plain-text traceback for each
    failed reconnection attempt (one a second): a JSON log pipeline got
    hundreds of unparsable lines from a short outage."""
    from tests.conftest import free_port

    server = NatsServer(free_port())
    server.start()
    b = NatsBus(server.url, prefix="t" + uuid.uuid4().hex[:8], group="g", timeout=1.0)
    try:
        await b.start()
        capfd.readouterr()
        server.stop()
        await asyncio.sleep(3.5)  # several reconnection attempts
        server.start()
        sent = msgs(3)
        deadline = time.monotonic() + 15
        while True:  # the client reconnects within a second or two
            try:
                await b.publish(sent)
                break
            except BusError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
        out, err = capfd.readouterr()
    finally:
        await b.close()
        server.destroy()
    said = out + err
    assert "Traceback" not in said, said
    # (under pytest the library's stdlib log records land here, not on stderr)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("nats")] == []
    assert said.count("NATS connection error") == 1, said
    assert "reconnected to NATS" in said


@pytest.mark.servers  # starts its own server
@pytest.mark.skipif(not NetnsHost.available(), reason="needs root and iproute2")
async def test_nats_a_server_that_stopped_answering_is_left_within_a_few_pings(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The host of the NATS server stops answering (frozen, unplugged: no
    reset sent). The client finds the dead connection by its pings and
    reconnects (in a cluster, to another server it was told of): within a
    few ping intervals, where nats-py's own defaults take 4 to 6 minutes of
    every publish and fetch timing out first. Once the host answers again,
    publishes go through."""
    from tests.conftest import free_port

    host = NetnsHost()
    host.create()
    server = NatsServer(free_port(), host)
    server.start()
    b = NatsBus(server.url, prefix="t" + uuid.uuid4().hex[:8], group="g", timeout=1.0,
                ping_interval=1.0)  # fmt: skip
    try:
        await b.start()
        await b.publish(msgs(2))
        capfd.readouterr()
        host.partition()
        t0 = time.monotonic()
        while "disconnected from NATS" not in capfd.readouterr().out:
            assert time.monotonic() - t0 < 15, "the dead connection is still in use"
            await asyncio.sleep(0.2)
        host.heal()
        while True:
            try:
                await b.publish(msgs(3))
                break
            except BusError:
                assert time.monotonic() - t0 < 30, "not published after the host came back"
                await asyncio.sleep(0.2)
        assert (await b.stats()).pending == 5  # what was published before and after
    finally:
        await b.close()
        server.destroy()
        host.heal()
        host.destroy()


def test_nats_pings_find_a_dead_connection_in_tens_of_seconds() -> None:
    assert nats_bus.PING_INTERVAL * nats_bus.MAX_OUTSTANDING_PINGS <= 40
    assert NatsBus("nats://x:1").ping_interval == nats_bus.PING_INTERVAL
