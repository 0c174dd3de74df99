"""The dispatcher: dispatch-outbox rows → destinations, per target.

One loop per destination: lease due rows (``DispatchOutbox.lease``),
send them as one batch, mark each row by its own outcome. A circuit
breaker per target (``estat.circuit``): a batch whose every event must be
retried counts as a failure; after ``threshold`` of them the target is
left alone for the open time (rows not attempted, not charged a retry),
then one probe batch decides. Paused (``dispatcher``), it leaves the rows
where they are.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime

from estat.circuit import CircuitBreaker
from estat.clock import Clock
from estat.dispatch.destination import Destination, Outcome, retry_all
from estat.model import EventRecord
from estat.ops.logging import get_logger
from estat.pause import Pauses
from estat.stage import Deadline, Spawn, finish_by
from estat.store.dispatch import DispatchOutbox, DispatchRow, Marked
from estat.store.rows import BadPayload, decode

log = get_logger("estat.dispatch")


class Dispatcher:
    name = "dispatcher"

    def __init__(
        self,
        outbox: DispatchOutbox,
        destinations: Sequence[Destination],
        *,
        batch_size: int,
        poll_interval: float,
        clock: Clock,
        breaker_threshold: int = 5,
        open_for: float = 60.0,
        max_open_for: float = 600.0,
        pauses: Pauses | None = None,
    ) -> None:
        self.outbox = outbox
        self.destinations = list(destinations)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self._clock = clock
        self.pauses = pauses
        self.breakers = {
            d.name: CircuitBreaker(
                threshold=breaker_threshold,
                open_for=open_for,
                max_open_for=max_open_for,
                clock=clock,
            )
            for d in self.destinations
        }
        self._wake = asyncio.Event()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []

    def notify(self) -> None:
        """Rows were enqueued: look now rather than at the next poll."""
        self._wake.set()

    async def start(self, spawn: Spawn) -> None:
        self._tasks = [
            spawn(f"dispatcher-{d.name.lower()}", self._run(d)) for d in self.destinations
        ]

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self.pauses is not None:
            self.pauses.interrupt()

    async def join(self, deadline: Deadline) -> int:
        for t in self._tasks:
            await finish_by(t, deadline)
        for d in self.destinations:
            await d.close()
        return 0  # what was not sent stays in the outbox

    async def _wait(self, seconds: float) -> None:
        if self._closing:
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _run(self, dest: Destination) -> None:
        breaker = self.breakers[dest.name]
        while not self._closing:
            if self.pauses is not None and self.pauses.paused("dispatcher"):
                await self.pauses.wait_change(1.0)
                continue
            if not breaker.allow():
                await self._wait(min(self.poll_interval, max(0.01, breaker.retry_in())))
                continue
            sent = await self.dispatch_once(dest, breaker)
            if sent < self.batch_size:
                await self._wait(self.poll_interval)

    async def dispatch_once(self, dest: Destination, breaker: CircuitBreaker) -> int:
        """One batch: lease, send, mark; the rows handled."""
        db = self.outbox.db
        now = datetime.fromtimestamp(self._clock.time(), UTC)
        rows = await db.run(lambda: self.outbox.lease(dest.name, self.batch_size, now))
        if not rows:
            breaker.abandon()  # a probe with nothing to send decides nothing
            return 0
        events: list[EventRecord] = []
        sendable: list[DispatchRow] = []
        rejected: list[tuple[DispatchRow, str]] = []
        for r in rows:
            try:
                events.append(decode(r.payload))
                sendable.append(r)
            except BadPayload as e:
                rejected.append((r, str(e)))
        try:
            outcomes = await dest.send(events) if events else []
        except Exception as e:  # a bug in the destination: nothing is lost, retried
            log.exception("destination failed", target=dest.name)
            outcomes = retry_all(len(events), f"destination error: {type(e).__name__}")
        marked = await self._settle(dest, breaker, sendable, outcomes, rejected)
        if marked.parked:
            log.error(
                "dispatch: rows parked (replay them once the cause is fixed)",
                target=dest.name,
                rows=marked.parked,
            )
        return len(rows)

    async def _settle(
        self,
        dest: Destination,
        breaker: CircuitBreaker,
        rows: list[DispatchRow],
        outcomes: list[Outcome],
        rejected: list[tuple[DispatchRow, str]],
    ) -> Marked:
        delivered: list[DispatchRow] = []
        retry: list[tuple[DispatchRow, str, float, bool]] = []
        for row, o in zip(rows, outcomes, strict=True):
            if o.kind == "delivered":
                delivered.append(row)
            elif o.kind == "rejected":
                rejected.append((row, o.reason))
            else:
                retry.append((row, o.reason, o.not_before, o.config_error))
        if outcomes and len(retry) == len(outcomes):
            breaker.failure()
            first = next(o for o in outcomes if o.kind == "retry")
            log.warning(
                "dispatch failed, rows rescheduled", target=dest.name, rows=len(retry),
                error=first.reason[:300], configError=first.config_error, circuit=breaker.state,
            )  # fmt: skip
        elif outcomes:
            breaker.success()
        now = datetime.fromtimestamp(self._clock.time(), UTC)
        return await self.outbox.db.run(lambda: self.outbox.mark(delivered, retry, rejected, now))
