"""The publisher: accepted client events → the bus, in batches, from a
bounded in-memory queue (the HTTP answer never waits for the bus).

Per batch: publish to the bus; if the bus refuses or is unreachable, write
the batch to the source outbox as FAILED with a ``next_retry_at`` (the relay
publishes it later) and skip the bus for a while (1 s doubling to 30 s), so
a dead bus costs one timeout, not one per batch; if the database is
unreachable too, keep the batch and try again with backoff. When the queue
is full, ``check_room`` raises ``Overloaded`` and the API answers 503.

At start, events spooled by an earlier stop are published first. On stop
the queue is published until the deadline; what is left goes to the outbox,
else to the spool (crash-safe files under ``DATA_DIR/spool``); only if that
fails too is it counted lost.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from datetime import timedelta

from estat.activity.common import TRANSIENT_DB, Spool, key_of
from estat.bus.base import Bus, BusError, short
from estat.clock import Clock
from estat.errors import Overloaded
from estat.model import EventRecord
from estat.ops.logging import get_logger
from estat.ops.metrics import Metrics
from estat.retry import RetryPolicy
from estat.stage import Deadline, Spawn, finish_by
from estat.store.outbox import OUTBOX_RETRY, SourceOutbox, utcnow
from estat.store.rows import encode
from estat.store.trace import TraceLog

log = get_logger("estat.publisher")

#: events and their JSON (the bus messages' payloads), as one request put them
_Chunk = tuple[Sequence[EventRecord], Sequence[bytes]]

DB_RETRY = RetryPolicy(base=0.5, cap=30.0)
BUS_SKIP = RetryPolicy(base=1.0, cap=30.0, jitter="none")


class Publisher:
    name = "publisher"

    def __init__(
        self,
        bus: Bus,
        outbox: SourceOutbox,
        spool: Spool,
        *,
        capacity: int,
        batch_size: int,
        metrics: Metrics,
        clock: Clock,
        trace: TraceLog | None = None,
        on_outbox: Callable[[], None] = lambda: None,
        concurrency: int = 8,
    ) -> None:
        self.bus = bus
        self.outbox = outbox
        self.spool = spool
        self.capacity = capacity
        self.batch_size = batch_size
        self._m = metrics
        self._clock = clock
        self._trace = trace
        self._on_outbox = on_outbox
        self._queue: deque[_Chunk] = deque()  # per request: no per-event work
        self._queued = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.concurrency = concurrency
        self._failure: BaseException | None = None
        self._held = False
        self._bus_skip_until = 0.0
        self._bus_failures = 0
        labels = (bus.topic, bus.provider)
        self._published = metrics.mq_publish.labels(*labels, "success")
        self._failed = metrics.mq_publish.labels(*labels, "fail")

    # -- the route's side ----------------------------------------------------------
    def check_room(self, n: int) -> None:
        if self._closing:
            raise Overloaded("the publisher is stopping", 5, kind="draining")
        if self._queued + n > self.capacity:
            raise Overloaded("the publish queue is full", 1, kind="queue_full")

    def put(self, records: Sequence[EventRecord], lines: Sequence[bytes] | None = None) -> None:
        """Queue ``records`` for the bus; ``lines`` are their JSON encodings
        when the caller has them already (the lake's lines: the bus message
        carries the same bytes)."""
        if not records:
            return
        self._queue.append((records, lines if lines is not None else [encode(r) for r in records]))
        self._queued += len(records)
        self._m.publish_queue_events.set(self._queued)
        self._wake.set()

    @property
    def queued(self) -> int:
        return self._queued

    # -- stage ---------------------------------------------------------------------
    async def start(self, spawn: Spawn) -> None:
        self._m.spool_events.set(self.spool.count())
        self._task = spawn("publisher", self._run())

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    async def join(self, deadline: Deadline) -> int:
        await finish_by(self._task, deadline)
        return await self._rescue()

    async def _run(self) -> None:
        """Up to ``concurrency`` batches in flight: under load the event loop
        turns slowly, and one round trip per turn would cap the publisher far
        below what the API accepts. A batch smaller than ``batch_size`` is
        sent only when nothing is in flight: at low rates each event leaves
        at once, under load the queue fills the batches while the bus
        answers (one bus message per batch is what the bus's cost scales
        with)."""
        await self._publish_spool()
        inflight: set[asyncio.Task[None]] = set()
        room = asyncio.Semaphore(self.concurrency)
        try:
            while self._failure is None and not self._held:
                if not self._queue:
                    if self._closing:
                        break
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if inflight and self._queued < self.batch_size and not self._closing:
                    # a publish is on its way: let the next batch fill while
                    # it is (one small batch at a time, full ones in parallel)
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await room.acquire()
                if not self._queue or self._failure is not None or self._held:
                    room.release()
                    continue
                batch = self._take()
                self._m.publish_queue_events.set(self._queued)
                task = asyncio.ensure_future(self._deliver_one(batch))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                task.add_done_callback(lambda _t: room.release())
                task.add_done_callback(lambda _t: self._wake.set())
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)
        except BaseException:
            for t in inflight:
                t.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)
            raise
        if self._failure is not None:
            raise self._failure

    def _take(self) -> _Chunk:
        """Up to ``batch_size`` events from the queue, whole chunks where they fit."""
        recs: list[EventRecord] = []
        lines: list[bytes] = []
        q = self._queue
        while q and len(recs) < self.batch_size:
            r, ls = q.popleft()
            room = self.batch_size - len(recs)
            if len(r) > room:
                q.appendleft((r[room:], ls[room:]))
                r, ls = r[:room], ls[:room]
            recs.extend(r)
            lines.extend(ls)
        self._queued -= len(recs)
        return recs, lines

    def _put_back(self, batch: _Chunk) -> None:
        self._queue.appendleft(batch)
        self._queued += len(batch[0])

    async def _deliver_one(self, batch: _Chunk) -> None:
        """One batch in flight: on any failure it goes back to the queue
        (``join`` rescues it), and the loop stops."""
        try:
            await self._deliver(batch)
        except _Held:
            self._put_back(batch)
            self._held = True
            self._wake.set()
        except BaseException as e:
            self._put_back(batch)
            if not isinstance(e, asyncio.CancelledError):
                self._failure = e
            self._wake.set()
            raise

    async def _deliver(self, batch: _Chunk) -> None:
        attempt = 0
        while True:
            err = await self._to_bus(batch)
            if err is None:
                return
            try:
                await self._to_outbox(batch[0], err)
                return
            except TRANSIENT_DB as e:
                attempt += 1
                self._m.publish_fallback.labels("held").inc(len(batch[0]))
                log.error(
                    "bus and database both unavailable: holding events",
                    events=len(batch[0]),
                    queued=self._queued,
                    busError=err,
                    dbError=short(e),
                )
                if self._closing:
                    raise _Held() from None
                await self._clock.sleep(DB_RETRY.delay(attempt))

    async def _to_bus(self, batch: _Chunk) -> str | None:
        """None when published; else why not."""
        if self._clock.monotonic() < self._bus_skip_until:
            return "bus skipped after a recent failure"
        try:
            await self.bus.publish_events(*batch)
        except BusError as e:
            self._failed.inc(len(batch[0]))
            self._bus_failures += 1
            self._bus_skip_until = self._clock.monotonic() + BUS_SKIP.delay(self._bus_failures)
            log.warning(
                "bus publish failed: events go to the source outbox",
                events=len(batch[0]),
                provider=self.bus.provider,
                error=str(e)[:300],
            )
            return str(e)
        self._bus_failures = 0
        self._published.inc(len(batch[0]))
        if self._trace is not None and self._trace.wants("PUBLISH"):
            now = utcnow(self._clock.time())
            for r in batch[0]:
                self._trace.add("PUBLISH", r.event_id, key_of(r), now)
        return None

    async def _to_outbox(self, batch: Sequence[EventRecord], error: str) -> None:
        now = utcnow(self._clock.time())
        due = now + timedelta(seconds=OUTBOX_RETRY.delay(1))
        res = await self.outbox.db.run(
            lambda: self.outbox.enqueue(
                batch, status="FAILED", next_retry_at=due, last_error=f"publish failed: {error}"
            )
        )
        self._m.outbox_enqueue.labels("inserted").inc(res.inserted)
        if res.duplicates:
            self._m.outbox_enqueue.labels("duplicate").inc(res.duplicates)
        self._m.publish_fallback.labels("outbox").inc(len(batch))
        self._on_outbox()

    async def _publish_spool(self) -> None:
        for path in self.spool.files():
            records = Spool.read(path)
            for i in range(0, len(records), self.batch_size):
                chunk = records[i : i + self.batch_size]
                await self._deliver((chunk, [encode(r) for r in chunk]))
            path.unlink()
            log.info("spooled events published", file=path.name, events=len(records))
            self._m.spool_events.set(self.spool.count())

    async def _rescue(self) -> int:
        """What is still queued at the end: to the outbox, else the spool."""
        left = [r for recs, _ in self._queue for r in recs]
        self._queue.clear()
        self._queued = 0
        self._m.publish_queue_events.set(0)
        if not left:
            return 0
        try:
            await self._to_outbox(left, "not published before shutdown")
            log.warning(
                "shutdown: unpublished events written to the source outbox", events=len(left)
            )
            return 0
        except TRANSIENT_DB as e:
            dberr = short(e)
        try:
            path = await asyncio.to_thread(self.spool.write, left)
        except OSError as e:
            self._m.publish_fallback.labels("lost").inc(len(left))
            log.error(
                "shutdown: events lost: bus, database and spool all failed",
                events=len(left),
                dbError=dberr,
                spoolError=short(e),
            )
            return len(left)
        self._m.publish_fallback.labels("spool").inc(len(left))
        self._m.spool_events.set(self.spool.count())
        log.warning(
            "shutdown: bus and database unavailable: events spooled, published at the next start",
            events=len(left),
            file=path.name,
            dbError=dberr,
        )
        return 0


class _Held(Exception):
    """Stopping while the batch could go nowhere: it goes back to the queue
    and ``join`` rescues it."""
