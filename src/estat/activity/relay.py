"""The relay: source outbox → bus.

Leases due rows in batches (``OutboxRelay.batch_size``), publishes them,
marks them PUBLISHED with ``published_at`` (always; on PostgreSQL in the
lease's transaction, which holds the rows' locks during the publish), or FAILED with
``retry_count + 1``, ``next_retry_at`` = now + 10 s x 2^min(retry_count, 6)
(jittered) and ``last_error``; after ``OUTBOX_MAX_ATTEMPTS`` a row stays
FAILED with no ``next_retry_at`` (parked) until an operator replays it. It
polls when idle and is woken when this process writes outbox rows. Several
relays share one outbox (``FOR UPDATE SKIP LOCKED`` on PostgreSQL).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from estat.activity.common import TRANSIENT_DB, message_of
from estat.bus.base import Bus, BusError, Message
from estat.clock import Clock
from estat.ops.logging import get_logger
from estat.ops.metrics import Metrics
from estat.pause import Pauses
from estat.retry import RetryPolicy
from estat.stage import Deadline, Spawn, Wakeup, finish_by
from estat.store.lease import lease_ended
from estat.store.outbox import Lease, OutboxRow, ReplayFilter, SourceOutbox, utcnow
from estat.store.rows import BadPayload, decode
from estat.store.trace import TraceLog

log = get_logger("estat.relay")

T = TypeVar("T")

PAUSE_CHECK = 1.0  # seconds between looks at the pause state while paused

DB_RETRY = RetryPolicy(base=0.5, cap=30.0)


def _message(row: OutboxRow) -> Message:
    try:
        return message_of(decode(row.payload), row.payload)
    except BadPayload:
        # published as it is: the store consumer parks it, visibly
        return Message(row.event_id, row.event_id, "", row.payload, {"source": "SERVER"})


class Relay:
    name = "relay"

    def __init__(
        self,
        outbox: SourceOutbox,
        bus: Bus,
        *,
        batch_size: int,
        poll_interval: float,
        metrics: Metrics,
        clock: Clock,
        trace: TraceLog | None = None,
        pauses: Pauses | None = None,
    ) -> None:
        self.outbox = outbox
        self.bus = bus
        self.pauses = pauses
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self._m = metrics
        self._clock = clock
        self._trace = trace
        self._wake = Wakeup()
        self._task: asyncio.Task[None] | None = None

    def _db(self, fn: Callable[[], T]) -> Awaitable[T]:
        """``fn`` on the relay's own database thread (PostgreSQL): its leases
        and marks do not queue behind the store consumer's writes."""
        return self.outbox.db.run(fn, on="relay")

    def notify(self) -> None:
        """Rows were written: look now rather than at the next poll."""
        self._wake.notify()

    async def start(self, spawn: Spawn) -> None:
        self._task = spawn("relay", self._run())

    def close(self) -> None:
        self._wake.close()
        if self.pauses is not None:
            self.pauses.interrupt()

    async def join(self, deadline: Deadline) -> int:
        await finish_by(self._task, deadline)
        return 0  # what is in the outbox is durable

    async def _run(self) -> None:
        failures = 0
        while not self._wake.closing:
            if self.pauses is not None and self.pauses.paused("relay"):
                await self.pauses.wait_change(PAUSE_CHECK)
                continue
            try:
                n = await self.relay_once()
                failures = 0
            except TRANSIENT_DB as e:
                if lease_ended(e):  # its rows were given back: published again
                    log.warning(
                        "relay: a lease outlived OUTBOX_LEASE and the database ended it: "
                        "its rows are published again",
                        error=str(e)[:300],
                    )
                    continue
                failures += 1
                log.error("relay: database unavailable", error=str(e)[:300], attempt=failures)
                await self._wait(DB_RETRY.delay(failures))
                continue
            if n < self.batch_size:
                await self._wait(self.poll_interval)

    async def _wait(self, seconds: float) -> None:
        await self._wake.wait(seconds)

    async def relay_once(self, limit: int | None = None) -> int:
        """Lease one batch of due rows and publish it; the rows handled."""
        now = utcnow(self._clock.time())
        lease = await self._db(lambda: self.outbox.take(limit or self.batch_size, now))
        if not lease.rows:
            return 0
        try:
            await self.publish(lease.rows, lease)
        except BaseException:
            # cancelled, or the database failed while marking: due again at
            # once (the held lease rolled back, or the release taken), else
            # when the lease ends
            ids = [r.id for r in lease.rows]
            with contextlib.suppress(*TRANSIENT_DB):
                await asyncio.shield(self._db(lambda: self.outbox.release(ids, now, lease)))
            raise
        return len(lease.rows)

    async def replay(self, limit: int, which: ReplayFilter) -> tuple[int, int, int]:
        """An operator's replay: lease up to ``limit`` FAILED and due PENDING
        rows matching ``which`` and publish them now (``retry_count`` kept;
        a failure counts as an attempt). (processed, published, failed)."""
        now = utcnow(self._clock.time())
        rows = await self._db(lambda: self.outbox.lease(limit, now, which))
        if not rows:
            return 0, 0, 0
        try:
            ok, failed = await self.publish(rows)
        except BaseException:
            ids = [r.id for r in rows]
            with contextlib.suppress(*TRANSIENT_DB):
                await asyncio.shield(self._db(lambda: self.outbox.release(ids, now)))
            raise
        return len(rows), ok, failed

    async def publish(self, rows: list[OutboxRow], lease: Lease | None = None) -> tuple[int, int]:
        """Publish leased ``rows`` and mark them (in ``lease``'s transaction
        when it holds one); (published, failed)."""
        try:
            await self.bus.publish([_message(r) for r in rows])
        except BusError as e:
            err = f"publish failed: {e}"
            now = utcnow(self._clock.time())
            scheduled, parked = await self._db(
                lambda: self.outbox.mark_failed(rows, err, now, lease=lease)
            )
            self._m.outbox_publish.labels("fail").inc(len(rows))
            self._m.mq_publish.labels(self.bus.topic, self.bus.provider, "fail").inc(len(rows))
            self._m.outbox_retry.labels("scheduled").inc(scheduled)
            if parked:
                self._m.outbox_retry.labels("parked").inc(parked)
                log.error(
                    "relay: outbox rows parked after OUTBOX_MAX_ATTEMPTS: replay them once the bus is fixed",
                    rows=parked,
                    error=err[:300],
                )
            log.warning("relay: publish failed, rows rescheduled", rows=len(rows), error=err[:300])
            return 0, len(rows)
        now = utcnow(self._clock.time())
        await self._db(lambda: self.outbox.mark_published([r.id for r in rows], now, lease))
        self._m.outbox_publish.labels("success").inc(len(rows))
        self._m.mq_publish.labels(self.bus.topic, self.bus.provider, "success").inc(len(rows))
        if self._trace is not None and self._trace.wants("PUBLISH"):
            for r in rows:
                self._trace.add("PUBLISH", r.event_id, None, now)
        return len(rows), 0
