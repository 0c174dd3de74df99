"""The dispatcher: dispatch-outbox rows → destinations, per target.

``concurrency`` loops (lanes) per destination: each leases due rows
(``DispatchOutbox.lease``), sends them in requests of ``batch_size``, up
to ``in_flight`` at a time while the circuit is closed with no failure
counted (one at a time otherwise), and marks each row by its own outcome. A circuit
breaker per target, shared by every dispatcher process through the
database (``estat.store.circuit``): a batch whose every event must be
retried counts as a failure; after ``threshold`` of them the target is
left alone for the open time (rows not attempted, not charged a retry),
then one probe batch decides. Paused (``dispatcher``), it leaves the rows
where they are. The loop polls when idle and is woken at once when the
store consumer of its process enqueues rows (``notify``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TypeVar

from prometheus_client import Gauge

from estat.circuit import Circuit, State
from estat.clock import Clock
from estat.dispatch.destination import Destination, Outcome, retry_all
from estat.model import EventRecord
from estat.ops.hist import FastHistogram
from estat.ops.ledger import Ledger, hour_bounds
from estat.ops.logging import get_logger
from estat.ops.metrics import DISPATCH_LATENCY_BUCKETS, Metrics
from estat.pause import Pauses
from estat.retry import RetryPolicy
from estat.stage import Deadline, Spawn, Wakeup, finish_by
from estat.store.circuit import SharedCircuit
from estat.store.db import TRANSIENT_DB
from estat.store.dispatch import DispatchOutbox, DispatchRow, Leased, Marked
from estat.store.lease import lease_ended
from estat.store.rows import BadPayload, decode

log = get_logger("estat.dispatch")

T = TypeVar("T")

DB_RETRY = RetryPolicy(base=0.5, cap=30.0)
STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}
#: a closed circuit is read again at most this often (another dispatcher
#: opening it is followed within this time)
CIRCUIT_FRESH = 1.0
LEASE_ROWS = 1000


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
        concurrency: int = 2,
        in_flight: int = 1,
        metrics: Metrics | None = None,
        breaker_threshold: int = 5,
        open_for: float = 60.0,
        max_open_for: float = 600.0,
        pauses: Pauses | None = None,
    ) -> None:
        self.outbox = outbox
        self.destinations = list(destinations)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.concurrency = concurrency
        self.in_flight = in_flight
        #: rows per lease: ten requests' worth, at most 1,000 rows (the
        #: database's cost is per statement as much as per row), rounded up
        #: to whole windows of ``in_flight`` requests (a last window half
        #: empty would cost a round trip for half the events)
        windows = -(-max(1, min(10, LEASE_ROWS // batch_size)) // in_flight)
        self.lease_rows = batch_size * in_flight * windows
        self._clock = clock
        self._m = metrics or Metrics()
        self.pauses = pauses
        # a probe whose dispatcher died: the next one probes after the lease
        circuit = Circuit(
            breaker_threshold,
            open_for,
            max(open_for, max_open_for),
            outbox.lease_for.total_seconds(),
        )
        self.breakers = {
            d.name: SharedCircuit(
                outbox.db, d.name, circuit, clock, self._changed(d.name), fresh_for=CIRCUIT_FRESH
            )
            for d in self.destinations
        }
        self._wakeups = {d.name: Wakeup() for d in self.destinations}
        self._latency = {
            d.name: FastHistogram(self._m.dispatch_latency.labels(d.name), DISPATCH_LATENCY_BUCKETS)
            for d in self.destinations
        }
        for h in self._latency.values():
            self._m.add_flusher(h.flush)
        # PostgreSQL: each lane's lease and mark on a thread and a connection
        # of its own (one lane's transaction is open while another leases);
        # SQLite has one writer: the database's own thread
        outbox.reserve(concurrency * len(self.destinations))
        self._executor = (
            ThreadPoolExecutor(
                max_workers=concurrency * len(self.destinations),
                thread_name_prefix="estat-dispatch",
            )
            if outbox.db.skip_locked
            else None
        )
        self._tasks: list[asyncio.Task[None]] = []
        #: the completeness ledger: deliveries, in the hour their event was stored
        self.ledger: Ledger | None = None

    def _changed(self, target: str) -> Callable[[State, State], None]:
        def changed(old: State, new: State) -> None:
            self._m.dispatch_circuit.labels(new, target).inc()
            self._m.dispatch_circuit_state.labels(target).set(STATE_VALUE[new])
            say = log.warning if new != "closed" else log.info
            say("dispatch circuit " + new.replace("_", "-"), target=target, previous=old)

        return changed

    def notify(self) -> None:
        """Rows were enqueued: look now rather than at the next poll."""
        for w in self._wakeups.values():
            w.notify()

    async def start(self, spawn: Spawn) -> None:
        for d in self.destinations:
            self._m.dispatch_circuit_state.labels(d.name).set(0)
        self._tasks = [
            spawn(f"dispatcher-{d.name.lower()}-{lane}", self._run(d))
            for d in self.destinations
            for lane in range(self.concurrency)
        ]

    def close(self) -> None:
        for w in self._wakeups.values():
            w.close()
        if self.pauses is not None:
            self.pauses.interrupt()

    async def join(self, deadline: Deadline) -> int:
        for t in self._tasks:
            await finish_by(t, deadline)
        for d in self.destinations:
            await d.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        return 0  # what was not sent stays in the outbox

    async def _db(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            return await self.outbox.db.run(fn)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _run(self, dest: Destination) -> None:
        wake = self._wakeups[dest.name]
        breaker = self.breakers[dest.name]
        failures = 0
        while not wake.closing:
            if self.pauses is not None and self.pauses.paused("dispatcher"):
                await self.pauses.wait_change(1.0)
                continue
            try:
                if not (breaker.fresh() or await self._db(breaker.allow)):
                    self._m.dispatch_circuit_state.labels(dest.name).set(
                        STATE_VALUE[breaker.last.state]
                    )
                    await wake.wait(min(self.poll_interval, max(0.05, breaker.retry_in())))
                    continue
                sent = await self.dispatch_once(dest, breaker)
                failures = 0
            except TRANSIENT_DB as e:
                if lease_ended(e):
                    # the database ended the lease (DISPATCH_LEASE): its
                    # rows were given back; sent again, deduplicated there
                    log.warning(
                        "dispatch: a lease outlived DISPATCH_LEASE and the database ended it: "
                        "its rows are sent again (raise DISPATCH_LEASE above the longest send)",
                        target=dest.name, error=str(e)[:300],
                    )  # fmt: skip
                    continue
                failures += 1
                log.error(
                    "dispatch: database unavailable", target=dest.name, error=str(e)[:300],
                    attempt=failures,
                )  # fmt: skip
                await wake.wait(DB_RETRY.delay(failures))
                continue
            if sent < self.lease_rows:  # nothing more due: wait for rows or the poll
                await wake.wait(self.poll_interval)

    async def dispatch_once(self, dest: Destination, breaker: SharedCircuit) -> int:
        """One lease: up to ``lease_rows`` rows, sent in requests of
        ``batch_size``, marked; the rows handled."""
        now = datetime.fromtimestamp(self._clock.time(), UTC)
        leased = await self._db(lambda: self.outbox.lease(dest.name, self.lease_rows, now))
        rows = leased.rows
        if not rows:
            if breaker.last.state == "half_open":
                await self._db(breaker.abandon)  # a probe with nothing to send decides nothing
            return 0
        try:
            marked = await self._send(dest, breaker, leased)
        except BaseException:
            # not marked (a database error, a stop cut the send short): the
            # rows go back as they were, due now
            if not leased.done:
                later = datetime.fromtimestamp(self._clock.time(), UTC)
                with contextlib.suppress(*TRANSIENT_DB):
                    await asyncio.shield(self._db(lambda: self.outbox.release(leased, later)))
            if breaker.last.state == "half_open":
                with contextlib.suppress(*TRANSIENT_DB):
                    await asyncio.shield(self._db(breaker.abandon))
            raise
        if marked.parked:
            log.error(
                "dispatch: rows parked (replay them once the cause is fixed)",
                target=dest.name,
                rows=marked.parked,
            )
        return len(rows)

    def _window(self, breaker: SharedCircuit) -> int:
        """Requests a lane may have in flight now: all it may while the
        circuit is closed with no failure counted; one at a time otherwise
        (a probe, or a destination already failing: a failure ends the
        lease before more of its rows are charged a retry)."""
        last = breaker.last
        return self.in_flight if last.state == "closed" and last.failures == 0 else 1

    async def _send(self, dest: Destination, breaker: SharedCircuit, leased: Leased) -> Marked:
        """The leased rows in requests of ``batch_size``, up to
        ``_window()`` at a time. A request whose every event must be
        retried is a failure for the breaker and ends the lease: no request
        starts after it, and the rows not sent yet stay as they were (not
        charged); the requests already in flight finish and count."""
        rows = leased.rows
        chunks = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        result = _Sent()
        gauge = self._m.dispatch_in_flight.labels(dest.name)
        flying: dict[asyncio.Task[list[Outcome]], list[DispatchRow]] = {}
        started = 0
        try:
            while flying or (started < len(chunks) and result.failed is None):
                while (
                    started < len(chunks)
                    and result.failed is None
                    and len(flying) < self._window(breaker)
                ):
                    sendable, events = result.decoded(chunks[started])
                    started += 1
                    if events:
                        flying[asyncio.ensure_future(self._request(dest, events, gauge))] = sendable
                if not flying:
                    continue
                done, _ = await asyncio.wait(flying, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if result.add(flying.pop(task), task.result()):
                        await self._db(breaker.failure)
                    elif breaker.last != breaker.circuit.success(breaker.last):
                        await self._db(breaker.success)
        finally:
            # cut short (a stop, a database error): nothing of this lease
            # may still be on the network once its rows are released
            for task in flying:
                task.cancel()
            if flying:
                await asyncio.wait(flying)
        untouched = [r for chunk in chunks[started:] for r in chunk]
        now = datetime.fromtimestamp(self._clock.time(), UTC)
        delivered, retry, rejected = result.delivered, result.retry, result.rejected
        marked = await self._db(
            lambda: self.outbox.mark(delivered, retry, rejected, now, leased, untouched)
        )
        self._count(dest.name, marked, delivered, now, len(retry) + len(rejected))
        failed = result.failed
        if failed is not None:
            self._m.dispatch_config_error.labels(dest.name).set(1 if failed.config_error else 0)
            log.warning(
                "dispatch failed, rows rescheduled", target=dest.name, rows=len(retry),
                error=failed.reason[:300], configError=failed.config_error,
                circuit=breaker.last.state, notSent=len(untouched),
            )  # fmt: skip
        elif delivered:
            self._m.dispatch_config_error.labels(dest.name).set(0)
        return marked

    @staticmethod
    async def _request(dest: Destination, events: list[EventRecord], gauge: Gauge) -> list[Outcome]:
        gauge.inc()
        try:
            return await dest.send(events)
        except Exception as e:  # a bug in the destination: nothing is lost, retried
            log.exception("destination failed", target=dest.name)
            return retry_all(len(events), f"destination error: {type(e).__name__}")
        finally:
            gauge.dec()

    def _count(
        self, target: str, marked: Marked, delivered: list[DispatchRow], now: datetime, fail: int
    ) -> None:
        m = self._m
        if delivered:
            m.dispatch_execute.labels("success", target).inc(len(delivered))
            h = self._latency[target]
            at = now.timestamp()
            # the ledger's hour of each row, found once per quarter of an hour
            # (every zone's offset is a whole number of them): the rows of a
            # lease were mostly stored within minutes of each other
            quarters: dict[int, int] = {}
            for row in delivered:
                ts = row.created_at.timestamp()
                h.observe(max(0.0, at - ts))
                q = int(ts) // 900
                quarters[q] = quarters.get(q, 0) + 1
            if self.ledger is not None:
                stage, tz = f"dispatched:{target}", self.ledger.tz
                for q, n in quarters.items():
                    self.ledger.add("user-activity", hour_bounds(q * 900, tz)[0], stage, n)
        if fail:
            m.dispatch_execute.labels("fail", target).inc(fail)
        if marked.scheduled:
            m.dispatch_retry.labels("scheduled", target).inc(marked.scheduled)
        if marked.parked:
            m.dispatch_retry.labels("parked", target).inc(marked.parked)


class _Sent:
    """The outcomes of one lease's requests, row by row."""

    def __init__(self) -> None:
        self.delivered: list[DispatchRow] = []
        self.retry: list[tuple[DispatchRow, str, float, bool]] = []
        self.rejected: list[tuple[DispatchRow, str]] = []
        #: the first request whose every event must be retried
        self.failed: Outcome | None = None

    def decoded(self, chunk: Sequence[DispatchRow]) -> tuple[list[DispatchRow], list[EventRecord]]:
        """The rows of ``chunk`` that decode and their events; the others rejected."""
        sendable: list[DispatchRow] = []
        events: list[EventRecord] = []
        for r in chunk:
            try:
                events.append(decode(r.payload))
                sendable.append(r)
            except BadPayload as e:
                self.rejected.append((r, str(e)))
        return sendable, events

    def add(self, rows: list[DispatchRow], outcomes: list[Outcome]) -> bool:
        """One request's outcomes; true when every event must be retried
        (a failed request)."""
        retried = 0
        for row, o in zip(rows, outcomes, strict=True):
            if o.kind == "delivered":
                self.delivered.append(row)
            elif o.kind == "rejected":
                self.rejected.append((row, o.reason))
            else:
                self.retry.append((row, o.reason, o.not_before, o.config_error))
                retried += 1
        if retried < len(outcomes):
            return False
        if self.failed is None:
            self.failed = next(o for o in outcomes if o.kind == "retry")
        return True
