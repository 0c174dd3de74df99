"""The housekeeper: writes buffered trace rows every second, refreshes the
backlog gauges (source and dispatch outbox rows still to be sent, by status,
and the age of the oldest due; bus pending and parked) every ``BACKLOG_EVERY`` seconds, and every
``PURGE_EVERY`` deletes in bounded batches the trace rows older than
``MQ_TRACE_RETENTION`` and the finished outbox rows and audit rows older
than theirs (``store/retention.py``) unless an operator paused
``retention``, then counts the finished rows (PUBLISHED, DISPATCHED).

The rows still to be sent are counted from the partial status indexes: the
cost follows the backlog, not the table. Counting the finished rows reads
the whole table (days of them, kept by the retention), so it is done at the
purge's pace, not every ``BACKLOG_EVERY``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import NamedTuple, TypeVar

from sqlalchemy import func, select

from estat.activity.common import TRANSIENT_DB
from estat.bus.base import Bus, BusError
from estat.clock import Clock
from estat.ops.logging import Outage, get_logger
from estat.ops.metrics import Metrics
from estat.pause import Pauses
from estat.stage import Deadline, Spawn, finish_by
from estat.store.db import Database
from estat.store.lease import aware, due
from estat.store.outbox import utcnow
from estat.store.retention import BATCH, purge
from estat.store.retention import rules as retention_rules
from estat.store.schema import OPEN, user_activity_dispatch_outbox, user_activity_source_outbox
from estat.store.trace import TraceLog

log = get_logger("estat.housekeeper")

T = TypeVar("T")

BACKLOG_EVERY = 10.0
DISPATCH_STATUSES = ("PENDING", "FAILED", "PARKED")
RULES = retention_rules()
PURGE_EVERY = 600.0


class Backlog(NamedTuple):
    """The rows still to be sent; FAILED rows with no next retry count as
    PARKED."""

    source: dict[str, int]  # source outbox rows by status
    dispatch: dict[tuple[str, str], int]  # dispatch rows by (status, target)
    oldest_dispatch: dict[str, datetime]  # the oldest due dispatch row's creation, by target
    oldest_source: datetime | None  # the oldest due source outbox row's creation


def backlog(db: Database, now: datetime) -> Backlog:
    """The rows still to be sent, read through the partial status indexes:
    their predicate, ``OPEN``, as written (a bound parameter would keep a
    generic plan from proving it)."""
    s = user_activity_source_outbox
    d = user_activity_dispatch_outbox
    parked_s = (s.c.status == "FAILED") & s.c.next_retry_at.is_(None)
    parked_d = (d.c.status == "FAILED") & d.c.next_retry_at.is_(None)
    with db.engine.connect() as conn:
        src: dict[str, int] = {"PENDING": 0, "FAILED": 0, "PARKED": 0}
        for status, parked, n in conn.execute(
            select(s.c.status, parked_s, func.count()).where(OPEN).group_by(s.c.status, parked_s)
        ):
            src["PARKED" if parked else status] = n
        dis: dict[tuple[str, str], int] = {}
        for status, parked, target, n in conn.execute(
            select(d.c.status, parked_d, d.c.dispatch_target, func.count())
            .where(OPEN)
            .group_by(d.c.status, parked_d, d.c.dispatch_target)
        ):
            dis[("PARKED" if parked else status, target)] = n
        oldest = {
            str(t): aware(at)
            for t, at in conn.execute(
                select(d.c.dispatch_target, func.min(d.c.created_at))
                .where(OPEN, due(d, now))
                .group_by(d.c.dispatch_target)
            )
            if at is not None
        }
        first = conn.execute(select(func.min(s.c.created_at)).where(OPEN, due(s, now))).scalar()
    return Backlog(src, dis, oldest, aware(first) if first is not None else None)


def finished(db: Database) -> tuple[int, dict[str, int]]:
    """(PUBLISHED source outbox rows, DISPATCHED rows by target): a read of
    the whole tables."""
    s = user_activity_source_outbox
    d = user_activity_dispatch_outbox
    with db.engine.connect() as conn:
        published = conn.execute(
            select(func.count()).select_from(s).where(s.c.status == "PUBLISHED")
        ).scalar_one()
        dispatched = {
            str(t): int(n)
            for t, n in conn.execute(
                select(d.c.dispatch_target, func.count())
                .where(d.c.status == "DISPATCHED")
                .group_by(d.c.dispatch_target)
            )
        }
    return int(published), dispatched


class Housekeeper:
    name = "housekeeper"

    def __init__(
        self,
        db: Database,
        bus: Bus | None,
        trace: TraceLog | None,
        *,
        retention: float,
        metrics: Metrics,
        clock: Clock,
        targets: Sequence[str] = (),
        ages: dict[str, float] | None = None,
        pauses: Pauses | None = None,
    ) -> None:
        self.targets = tuple(targets)
        #: every target a gauge was set for: one whose rows are all gone (a
        #: discard, the retention) is set back to 0, not left at its last value
        self._gauged: set[str] = set(self.targets)
        #: rule name (``store/retention.py``) → age in seconds (0: kept forever)
        self.ages = dict(ages or {})
        self.pauses = pauses
        self.db = db
        self.bus = bus
        self.trace = trace
        self.retention = retention
        self._m = metrics
        self._clock = clock
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        #: the last refresh's verdicts, for ``/ready``: "ok" or "unavailable: …"
        self.database_status = "unchecked"
        self._traces_outage = Outage(log)
        self._finished_outage = Outage(log)
        self._db_outage = Outage(log)
        self._bus_outage = Outage(log)
        self.bus_status = "unchecked" if bus is not None else "off"

    def _db(self, fn: Callable[[], T]) -> Awaitable[T]:
        """``fn`` on the housekeeper's own database thread (PostgreSQL): a
        purge waiting on a lock, or deleting its batches, holds up none of
        the process's other work (server events' outbox writes, the
        publisher's fallback, the ledger)."""
        return self.db.run(fn, on="housekeeper")

    async def start(self, spawn: Spawn) -> None:
        self._task = spawn("housekeeper", self._run())

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    async def join(self, deadline: Deadline) -> int:
        await finish_by(self._task, deadline)
        await self.flush_traces()
        return 0

    async def flush_traces(self) -> None:
        t = self.trace
        if t is None or not t.buffered:
            return
        try:
            n = await self._db(t.flush)
            self._m.trace_rows.labels("written").inc(n)
        except TRANSIENT_DB as e:
            self._traces_outage.failed(
                "trace log: write failed, kept for the next try (said once until written)",
                rows=t.buffered,
                error=str(e)[:200],
            )
        else:
            self._traces_outage.recovered("trace log: written again", rows=n)

    async def refresh_finished(self) -> None:
        """The PUBLISHED / DISPATCHED gauges (a read of the whole tables:
        aside, so that the store and the relay do not wait for it)."""
        try:
            published, dispatched = await self.db.run_aside(lambda: finished(self.db))
        except TRANSIENT_DB as e:
            self._finished_outage.failed("finished rows: database unavailable", error=str(e)[:200])
            return
        self._finished_outage.recovered("finished rows: database available again")
        self._m.source_outbox_rows.labels("PUBLISHED").set(published)
        self._gauged.update(dispatched)
        for target in self._gauged:
            self._m.dispatch_outbox_rows.labels("DISPATCHED", target).set(dispatched.get(target, 0))

    async def refresh_backlog(self) -> None:
        try:
            now = utcnow(self._clock.time())
            src, dis, oldest, first = await self._db(lambda: backlog(self.db, now))
        except TRANSIENT_DB as e:
            self._db_outage.failed("backlog gauges: database unavailable", error=str(e)[:200])
            self.database_status = f"unavailable: {type(e).__name__}"
        else:
            self._db_outage.recovered("backlog gauges: database available again")
            self.database_status = "ok"
            for status, n in src.items():
                self._m.source_outbox_rows.labels(status).set(n)
            self._gauged.update(t for _, t in dis)
            for target in self._gauged:
                for status in DISPATCH_STATUSES:
                    n = dis.get((status, target), 0)
                    self._m.dispatch_outbox_rows.labels(status, target).set(n)
                at = oldest.get(target)
                age = (now - at).total_seconds() if at is not None else 0.0
                self._m.dispatch_oldest_due.labels(target).set(max(0.0, age))
            age = (now - first).total_seconds() if first is not None else 0.0
            self._m.source_outbox_oldest_due.set(max(0.0, age))
        if self.bus is not None:
            try:
                stats = await self.bus.stats()
            except BusError as e:
                self._bus_outage.failed("backlog gauges: bus unavailable", error=str(e)[:200])
                self.bus_status = "unavailable"
            else:
                self._bus_outage.recovered("backlog gauges: bus available again")
                self.bus_status = "ok"
                self._m.bus_pending.labels(self.bus.topic, self.bus.provider).set(stats.pending)
                self._m.bus_parked.labels(self.bus.topic, self.bus.provider).set(stats.parked)

    async def purge_done(self) -> dict[str, int]:
        """Rows of the outboxes and the audit log older than their
        retention, in bounded batches; skipped while ``retention`` is paused."""
        out: dict[str, int] = {}
        if self.pauses is not None and self.pauses.paused("retention"):
            return out
        now = utcnow(self._clock.time())
        for name, age in self.ages.items():
            if age <= 0:
                continue  # kept forever
            rule = RULES[name]
            before = now - timedelta(seconds=age)
            total, failed = 0, False
            while not self._closing:
                try:
                    n = await self._db(functools.partial(purge, self.db, rule, before))
                except TRANSIENT_DB as e:
                    log.warning(
                        "retention: delete failed, the pass ends", table=name, error=str(e)[:200]
                    )
                    failed = True
                    break
                total += n
                if n < BATCH:
                    break
                await asyncio.sleep(0)  # a busy table: let the loop breathe between batches
            if total:
                self._m.retention_deleted.labels(name).inc(total)
                log.info("retention: rows deleted", table=name, rows=total, olderThanS=age)
            out[name] = total
            if failed:
                # the next tables would wait as long for the same database:
                # they wait for the next pass
                break
        return out

    async def purge_traces(self) -> int:
        if self.trace is None:
            return 0
        if self.pauses is not None and self.pauses.paused("retention"):
            return 0
        before = utcnow(self._clock.time()) - timedelta(seconds=self.retention)
        total = 0
        while not self._closing:
            try:
                n = await self._db(lambda: self.trace.purge(before) if self.trace else 0)
            except TRANSIENT_DB as e:
                log.warning("trace log: purge failed", error=str(e)[:200])
                break
            total += n
            if n == 0:
                break
        if total:
            self._m.trace_rows.labels("deleted").inc(total)
        return total

    async def _run(self) -> None:
        next_backlog = 0.0
        next_purge = self._clock.monotonic() + 5.0
        while not self._closing:
            now = self._clock.monotonic()
            await self.flush_traces()
            if now >= next_backlog:
                next_backlog = now + BACKLOG_EVERY
                await self.refresh_backlog()
            if now >= next_purge:
                next_purge = now + PURGE_EVERY
                await self.purge_traces()
                await self.purge_done()
                await self.refresh_finished()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
