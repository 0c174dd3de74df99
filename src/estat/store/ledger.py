"""The completeness ledger in the database (``estat_ledger``): every
process adds what it counted (``estat.ops.ledger``) every few seconds, in
one transaction (``events = events + n``); reading it answers "did every
event of hour X arrive, in every destination?".

An hour is complete in the lake when it has closed, ``grace`` has passed
since (late batches: the batcher's age, uploads and retries, the DLQ's
replay), and every event accepted for it is in the lake. A gap is an hour
past its grace with fewer events in the lake than accepted: events lost
(counted in ``dlq_events_dropped_total`` or ``shutdown_events_unsaved_total``)
or still waiting in a DLQ.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from estat.clock import Clock
from estat.ops.ledger import Counts, Ledger
from estat.ops.logging import get_logger
from estat.ops.metrics import Metrics
from estat.stage import Deadline, Spawn, Wakeup, finish_by
from estat.store.db import TRANSIENT_DB, Database
from estat.store.schema import estat_ledger as L

log = get_logger("estat.ledger")

FLUSH_EVERY = 5.0
GAP_WINDOW = timedelta(hours=48)


def add(db: Database, counts: Counts, now: datetime) -> None:
    rows = [
        {"dataset": d, "hour": datetime.fromtimestamp(h, UTC), "stage": s, "events": n,
         "updated_at": now}
        for (d, h, s), n in sorted(counts.items())
    ]  # fmt: skip
    if not rows:
        return
    stmt = db.insert(L)
    stmt = stmt.on_conflict_do_update(
        index_elements=["dataset", "hour", "stage"],
        set_={"events": L.c.events + stmt.excluded.events, "updated_at": stmt.excluded.updated_at},
    )
    with db.engine.begin() as conn:
        conn.execute(stmt, rows)


@dataclass
class Hour:
    dataset: str
    hour: datetime
    stages: dict[str, int] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return self.stages.get("accepted", 0)

    @property
    def lake(self) -> int:
        return self.stages.get("lake", 0)

    def closed(self, now: datetime, grace: timedelta) -> bool:
        return now >= self.hour + timedelta(hours=1) + grace

    def gap(self, now: datetime, grace: timedelta) -> int:
        """Events accepted for the hour and not in the lake, once it is past
        its grace (0 before: they may still be on their way)."""
        return max(0, self.accepted - self.lake) if self.closed(now, grace) else 0


def read(db: Database, start: datetime, end: datetime) -> list[Hour]:
    """The ledger's hours in [start, end), oldest first."""
    stmt = select(L.c.dataset, L.c.hour, L.c.stage, L.c.events).where(
        L.c.hour >= start, L.c.hour < end
    )
    hours: dict[tuple[str, datetime], Hour] = {}
    with db.engine.connect() as conn:
        for dataset, hour, stage, n in conn.execute(stmt):
            hour = hour if hour.tzinfo else hour.replace(tzinfo=UTC)
            h = hours.setdefault((dataset, hour), Hour(dataset, hour))
            h.stages[stage] = int(n)
    return sorted(hours.values(), key=lambda h: (h.hour, h.dataset))


class LedgerFlusher:
    """Adds the process's counts to the database every ``FLUSH_EVERY``
    seconds and at the end, and refreshes ``completeness_gap_events``."""

    name = "ledger"

    def __init__(
        self, ledger: Ledger, db: Database, metrics: Metrics, clock: Clock, grace: float
    ) -> None:
        self.ledger = ledger
        self.db = db
        self._m = metrics
        self._clock = clock
        self.grace = timedelta(seconds=grace)
        self._wake = Wakeup()
        self._task: asyncio.Task[None] | None = None

    async def start(self, spawn: Spawn) -> None:
        self._task = spawn("ledger", self._run())

    def close(self) -> None:
        self._wake.close()

    async def join(self, deadline: Deadline) -> int:
        await finish_by(self._task, deadline)
        await self.flush()
        return 0

    async def _run(self) -> None:
        while not self._wake.closing:
            await self._wake.wait(FLUSH_EVERY)
            await self.flush()
            await self.refresh_gaps()

    async def flush(self) -> None:
        counts = self.ledger.take()
        if not counts:
            return
        now = datetime.fromtimestamp(self._clock.time(), UTC)
        try:
            await self.db.run(lambda: add(self.db, counts, now))
        except TRANSIENT_DB as e:
            self.ledger.put_back(counts)  # the next flush adds them
            log.warning("ledger: write failed, kept for the next try", error=str(e)[:200])

    async def refresh_gaps(self) -> None:
        now = datetime.fromtimestamp(self._clock.time(), UTC)
        with contextlib.suppress(*TRANSIENT_DB):
            hours = await self.db.run(lambda: read(self.db, now - GAP_WINDOW, now))
            gaps: dict[str, int] = {}
            for h in hours:
                gaps[h.dataset] = gaps.get(h.dataset, 0) + h.gap(now, self.grace)
            for dataset, n in gaps.items():
                self._m.completeness_gap.labels(dataset).set(n)
