"""The store consumer: bus → ``user_activity_event`` (and the dispatch
outbox), then ack.

Reads batches (``STORE_BATCH_SIZE``), inserts with ``ON CONFLICT
(event_id) DO NOTHING`` and, in the same transaction, one dispatch-outbox
row per target for each newly inserted event; acks only after the commit.
A message that cannot be stored (it does not decode; the database rejects
its data, like a ``\\u0000`` in jsonb) never blocks its batch: the batch is
split in halves until the bad one is alone; it is retried later and parked
after ``MQ_MAX_DELIVERIES``. A database that is down is waited for (with
backoff), holding the batch unacked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from estat.activity.common import TRANSIENT_DB, is_data_error
from estat.bus.base import Bus, BusError, Consumer, Delivery, short
from estat.bus.memory import MemoryBus
from estat.clock import Clock
from estat.model import EventRecord
from estat.ops.ledger import Ledger, hour_bounds
from estat.ops.logging import get_logger
from estat.ops.metrics import Metrics
from estat.pause import Pauses
from estat.retry import RetryPolicy
from estat.stage import Deadline, Spawn, finish_by
from estat.store.events import EventStore
from estat.store.outbox import utcnow
from estat.store.rows import BadPayload, decode, event_row
from estat.store.trace import TraceLog

log = get_logger("estat.store")

DB_RETRY = RetryPolicy(base=0.5, cap=30.0)
#: the completeness ledger's dataset of the event store and its destinations
LEDGER_DATASET = "user-activity"
BUS_RETRY = RetryPolicy(base=0.5, cap=30.0)


class _Stopping(Exception):
    pass


@dataclass(slots=True)
class _Prepared:
    """A fetched batch, decoded: the rows to store, and what cannot be."""

    good: list[tuple[Delivery, dict[str, Any], str]]
    bad: list[tuple[Delivery, str]]


class StoreConsumer:
    name = "store"

    def __init__(
        self,
        bus: Bus,
        store: EventStore,
        *,
        consumer_name: str,
        batch_size: int,
        max_deliveries: int,
        metrics: Metrics,
        clock: Clock,
        trace: TraceLog | None = None,
        poll: float = 1.0,
        rescue: Callable[[list[EventRecord]], Awaitable[object]] | None = None,
        pauses: Pauses | None = None,
    ) -> None:
        #: where the in-process bus's leftovers go at the end (the outbox)
        self.rescue = rescue
        #: called when dispatch-outbox rows were committed (wakes the dispatcher)
        self.on_dispatch: Callable[[], None] | None = None
        #: the completeness ledger: new events, in the hour they were stored
        self.ledger: Ledger | None = None
        self.pauses = pauses
        self.bus = bus
        self.store = store
        self.consumer_name = consumer_name
        self.batch_size = batch_size
        self.max_deliveries = max_deliveries
        self._m = metrics
        self._clock = clock
        self._trace = trace
        self.poll = poll
        self._consumer: Consumer | None = None
        self._closing = False
        self._deadline: Deadline | None = None
        self._task: asyncio.Task[None] | None = None
        labels = (bus.topic, bus.provider)
        self._ok = metrics.mq_consume.labels(*labels, "success")
        self._fail = metrics.mq_consume.labels(*labels, "fail")
        self._parked = metrics.mq_consume.labels(*labels, "parked")
        self._latency = metrics.mq_consume_latency.labels(*labels)

    async def start(self, spawn: Spawn) -> None:
        self._consumer = self.bus.consumer(self.consumer_name)
        self._task = spawn("store", self._run())

    def close(self) -> None:
        self._closing = True
        if self._consumer is not None:
            self._consumer.interrupt()
        if self.pauses is not None:
            self.pauses.interrupt()

    async def join(self, deadline: Deadline) -> int:
        self._deadline = deadline
        await finish_by(self._task, deadline)
        if self._consumer is not None:
            await self._consumer.close()
        if isinstance(self.bus, MemoryBus) and self.rescue is not None:
            return await self._rescue_memory(self.bus)
        return 0

    async def _rescue_memory(self, bus: MemoryBus) -> int:
        """What the in-process bus still holds when the deadline came: to
        the source outbox (PENDING), so the next start publishes it."""
        assert self.rescue is not None
        left = bus.take_all()
        if not left:
            return 0
        records = []
        for m in left:
            try:
                records.append(decode(m.payload))
            except BadPayload:
                log.error("shutdown: an undecodable message is dropped", messageId=m.message_id)
        try:
            await self.rescue(records)
        except TRANSIENT_DB as e:
            log.error(
                "shutdown: events on the in-process bus not stored: the database is unavailable",
                events=len(records),
                error=short(e),
            )
            return len(left)
        log.warning(
            "shutdown: events still on the in-process bus written to the source outbox",
            events=len(records),
        )
        return len(left) - len(records)

    def _draining_in_process(self) -> bool:
        """The in-process bus is lost with the process: a stopping consumer
        keeps storing until it is empty (or the deadline)."""
        return self.bus.provider == "memory"

    async def _run(self) -> None:
        """Two steps in a pipeline: the reader fetches and decodes the next
        batch while the writer stores and acks the current one, so the bus
        and the database work at the same time. At most one batch waits
        between them; a stop lets the reader finish its fetch and the writer
        store what was read."""
        ready: asyncio.Queue[_Prepared | BaseException | None] = asyncio.Queue(maxsize=1)
        reader = asyncio.ensure_future(self._read(ready))
        try:
            while True:
                item = await ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                try:
                    await self._write(item)
                except _Stopping:
                    return
        finally:
            if not reader.done():
                reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, ready: asyncio.Queue[_Prepared | BaseException | None]) -> None:
        assert self._consumer is not None
        failures = 0
        try:
            while True:
                if self._closing and not self._draining_in_process():
                    break
                if self.pauses is not None and self.pauses.paused("store") and not self._closing:
                    await self.pauses.wait_change(1.0)  # the backlog waits on the bus
                    continue
                try:
                    batch = await self._consumer.fetch(
                        self.batch_size, 0.05 if self._closing else self.poll
                    )
                    failures = 0
                except BusError as e:
                    failures += 1
                    log.error("store: bus unavailable", error=str(e)[:300], attempt=failures)
                    if self._closing:
                        break
                    await self._clock.sleep(BUS_RETRY.delay(failures))
                    continue
                if not batch:
                    if self._closing:
                        break
                    continue
                await ready.put(self._prepare(batch))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # to the writer, which fails the stage
            await ready.put(e)
            return
        await ready.put(None)

    def _prepare(self, batch: Sequence[Delivery]) -> _Prepared:
        good: list[tuple[Delivery, dict[str, Any], str]] = []
        bad: list[tuple[Delivery, str]] = []
        for d in batch:
            try:
                rec = decode(d.message.payload)
                good.append((d, event_row(rec), d.message.payload.decode("utf-8")))
            except (BadPayload, UnicodeDecodeError, ValueError) as e:
                bad.append((d, f"bad payload: {e}"))
        return _Prepared(good, bad)

    async def handle(self, batch: Sequence[Delivery]) -> None:
        """Store ``batch`` and settle every delivery in it."""
        await self._write(self._prepare(batch))

    async def _write(self, p: _Prepared) -> None:
        first = p.good[0][0] if p.good else p.bad[0][0] if p.bad else None
        t0 = first.received if first is not None and first.received else time.monotonic()
        for d, err in p.bad:
            await self._failed(d, err)
        # one transaction per STORE_BATCH_SIZE events: a fetch returns whole
        # bus messages (a Redis batch entry holds a published batch)
        n = self.batch_size
        for i in range(0, len(p.good), n):
            await self._store(p.good[i : i + n])
        self._latency.observe(time.monotonic() - t0)

    async def _store(self, items: list[tuple[Delivery, dict[str, Any], str]]) -> None:
        assert self._consumer is not None
        attempt = 0
        while True:
            try:
                stored = await self.store.db.run(
                    lambda: self.store.store([i[1] for i in items], [i[2] for i in items]),
                    on="store",
                )
                break
            except TRANSIENT_DB as e:
                if is_data_error(e):
                    if len(items) == 1:
                        await self._failed(items[0][0], f"store rejected: {short(e)}")
                        return
                    half = len(items) // 2
                    await self._store(items[:half])
                    await self._store(items[half:])
                    return
                attempt += 1
                self._m.store_events.labels("failed").inc(len(items))
                log.error(
                    "store: database unavailable: holding the batch unacked",
                    events=len(items),
                    error=short(e),
                    attempt=attempt,
                )
                if self._closing and (self._deadline is None or self._deadline.left() < 1):
                    raise _Stopping() from None
                await self._clock.sleep(DB_RETRY.delay(attempt))
        deliveries = [i[0] for i in items]
        try:
            await self._consumer.ack(deliveries)
        except BusError as e:
            # stored; the bus will deliver them again and they count as duplicates
            log.warning("store: ack failed after commit", events=len(items), error=str(e)[:300])
        self._m.store_events.labels("inserted").inc(stored.inserted)
        if self.ledger is not None:
            hour = hour_bounds(self._clock.time(), self.ledger.tz)[0]
            self.ledger.add(LEDGER_DATASET, hour, "stored", stored.inserted)
        if stored.duplicates:
            self._m.store_events.labels("duplicate").inc(stored.duplicates)
            log.debug("duplicate user events skipped", events=stored.duplicates)
        for target, n in stored.dispatch.items():
            self._m.dispatch_enqueue.labels("inserted", target).inc(n)
        if stored.dispatch and self.on_dispatch is not None:
            self.on_dispatch()
        for target in self.store.targets:
            dup = stored.inserted - stored.dispatch.get(target, 0)
            if dup:
                self._m.dispatch_enqueue.labels("duplicate", target).inc(dup)
        self._ok.inc(len(items))
        if self._trace is not None and self._trace.wants("CONSUME_SUCCESS"):
            now = utcnow(self._clock.time())
            for d in deliveries:
                ms = int((time.monotonic() - d.received) * 1000)
                self._trace.add("CONSUME_SUCCESS", d.message.message_id, d.message.key, now, ms)

    async def _failed(self, d: Delivery, error: str) -> None:
        assert self._consumer is not None
        now = utcnow(self._clock.time())
        ms = int((time.monotonic() - d.received) * 1000)
        if self._trace is not None:
            self._trace.add("CONSUME_FAIL", d.message.message_id, d.message.key, now, ms, error)
        try:
            if d.deliveries >= self.max_deliveries:
                await self._consumer.park(d, error)
                self._parked.inc()
                log.error(
                    "message queue consume failed: message parked",
                    messageId=d.message.message_id,
                    deliveries=d.deliveries,
                    error=error[:300],
                )
            else:
                await self._consumer.retry(d, error)
                self._fail.inc()
                log.warning(
                    "message queue consume failed: retried later",
                    messageId=d.message.message_id,
                    deliveries=d.deliveries,
                    error=error[:300],
                )
        except BusError as e:
            log.error("store: could not settle a failed message", error=str(e)[:300])
