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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson
from sqlalchemy import delete, select, update

from estat.clock import Clock
from estat.ops.ledger import Counts, LakeObject, Ledger, key_hour
from estat.ops.logging import Outage, get_logger
from estat.ops.metrics import Metrics
from estat.stage import Deadline, Spawn, Wakeup, finish_by
from estat.store.db import TRANSIENT_DB, Database
from estat.store.schema import estat_lake_objects as O
from estat.store.schema import estat_ledger as L
from estat.store.schema import estat_manifests as M

log = get_logger("estat.ledger")

FLUSH_EVERY = 5.0
MANIFEST_EVERY = 60.0
MANIFEST = "_MANIFEST.json"
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


def add_objects(db: Database, objects: list[LakeObject], tz: object, now: datetime) -> None:
    rows = []
    for o in objects:
        found = key_hour(o.key, tz)  # type: ignore[arg-type]
        if found is not None:
            rows.append(
                {"key": o.key, "dataset": found[0], "hour": datetime.fromtimestamp(found[1], UTC),
                 "events": o.events, "bytes": o.nbytes, "sha256": o.sha256, "stored_at": now}
            )  # fmt: skip
    if rows:
        with db.engine.begin() as conn:  # a replayed key is the same object again
            conn.execute(db.insert(O).on_conflict_do_nothing(index_elements=["key"]), rows)


def claim_manifest(db: Database, dataset: str, hour: datetime) -> list[dict[str, object]] | None:
    """Claim the hour's manifest (one process writes it); its objects, or
    None when another process has it."""
    with db.engine.begin() as conn:
        objects: list[dict[str, object]] = [
            {"key": str(k), "events": int(e), "bytes": int(b), "sha256": str(h)}
            for k, e, b, h in conn.execute(
                select(O.c.key, O.c.events, O.c.bytes, O.c.sha256)
                .where(O.c.dataset == dataset, O.c.hour == hour)
                .order_by(O.c.key)
            )
        ]
        if not objects:
            return None  # stored before the ledger listed objects: no manifest
        key = str(objects[0]["key"]).rsplit("/", 1)[0] + "/" + MANIFEST
        claimed = conn.execute(
            db.insert(M)
            .values(dataset=dataset, hour=hour, key=key)
            .on_conflict_do_nothing(index_elements=["dataset", "hour"])
            .returning(M.c.key)  # rowcount is not reliable here (psycopg: -1)
        ).first()
    return objects if claimed is not None else None


def settle_manifest(db: Database, dataset: str, hour: datetime, now: datetime | None) -> None:
    """Written (``now``), or given up (None: the claim goes, a later pass retries)."""
    with db.engine.begin() as conn:
        where = (M.c.dataset == dataset) & (M.c.hour == hour)
        if now is None:
            conn.execute(delete(M).where(where))
        else:
            conn.execute(update(M).where(where).values(written_at=now))


def pending_manifests(db: Database, since: datetime) -> set[tuple[str, datetime]]:
    with db.engine.connect() as conn:
        return {
            (str(d), h if h.tzinfo else h.replace(tzinfo=UTC))
            for d, h in conn.execute(select(M.c.dataset, M.c.hour).where(M.c.hour >= since))
        }


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
        self,
        ledger: Ledger,
        db: Database,
        metrics: Metrics,
        clock: Clock,
        grace: float,
        put: Callable[[str, bytes], Awaitable[None]] | None = None,
    ) -> None:
        #: writes a manifest to the lake (processes that have one)
        self.put = put
        self._next_manifests = 0.0
        self.ledger = ledger
        self.db = db
        self._m = metrics
        self._clock = clock
        self.grace = timedelta(seconds=grace)
        self._wake = Wakeup()
        self._outage = Outage(log)
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
            if self.put is not None and self._clock.monotonic() >= self._next_manifests:
                self._next_manifests = self._clock.monotonic() + MANIFEST_EVERY
                await self.write_manifests()

    async def flush(self) -> None:
        counts = self.ledger.take()
        objects = self.ledger.take_objects()
        if not counts and not objects:
            return
        now = datetime.fromtimestamp(self._clock.time(), UTC)
        tz = self.ledger.tz
        try:
            await self.db.run(lambda: add_objects(self.db, objects, tz, now))
            objects = []
            await self.db.run(lambda: add(self.db, counts, now))
        except TRANSIENT_DB as e:
            self.ledger.put_back(counts)  # the next flush adds them
            self.ledger.put_back_objects(objects)
            self._outage.failed(
                "ledger: write failed, kept for the next try (said once until written)",
                error=str(e)[:200],
            )
        else:
            self._outage.recovered("ledger: written again")

    async def write_manifests(self) -> int:
        """``<prefix>/dt=…/hr=…/_MANIFEST.json`` for every complete lake hour
        of the last 48 hours that has none: its objects (key, events, bytes,
        SHA-256) and counts, for downstream jobs to start on. Returns how
        many were written."""
        if self.put is None:
            return 0
        now = datetime.fromtimestamp(self._clock.time(), UTC)
        written = 0
        try:
            hours = await self.db.run(lambda: read(self.db, now - GAP_WINDOW, now))
            done = await self.db.run(lambda: pending_manifests(self.db, now - GAP_WINDOW))
        except TRANSIENT_DB as e:
            log.warning("ledger: manifests not checked", error=str(e)[:200])
            return 0
        for h in hours:
            if (h.dataset, h.hour) in done or "accepted" not in h.stages:
                continue
            if not h.closed(now, self.grace) or h.lake < h.accepted:
                continue  # not complete (a gap is alerted on, not written)
            objects = await self.db.run(lambda h=h: claim_manifest(self.db, h.dataset, h.hour))  # type: ignore[misc]
            if objects is None:
                continue
            key = str(objects[0]["key"]).rsplit("/", 1)[0] + "/" + MANIFEST
            body = orjson.dumps(
                {
                    "dataset": h.dataset, "hour": h.hour.isoformat(), "complete": True,
                    "accepted": h.accepted, "events": sum(int(o["events"]) for o in objects),  # type: ignore[call-overload]
                    "objects": objects, "writtenAt": now.isoformat(),
                },
                option=orjson.OPT_INDENT_2,
            )  # fmt: skip
            try:
                await self.put(key, body)
            except Exception as e:  # the lake is failing: the claim goes, a later pass retries
                log.warning("ledger: manifest not written", key=key, error=str(e)[:200])
                await self.db.run(lambda h=h: settle_manifest(self.db, h.dataset, h.hour, None))  # type: ignore[misc]
                continue
            await self.db.run(lambda h=h: settle_manifest(self.db, h.dataset, h.hour, now))  # type: ignore[misc]
            log.info("ledger: hour complete, manifest written", key=key, events=h.lake)
            written += 1
        return written

    async def refresh_gaps(self) -> None:
        now = datetime.fromtimestamp(self._clock.time(), UTC)
        with contextlib.suppress(*TRANSIENT_DB):
            hours = await self.db.run(lambda: read(self.db, now - GAP_WINDOW, now))
            gaps: dict[str, int] = {}
            for h in hours:
                gaps[h.dataset] = gaps.get(h.dataset, 0) + h.gap(now, self.grace)
            for dataset, n in gaps.items():
                self._m.completeness_gap.labels(dataset).set(n)
