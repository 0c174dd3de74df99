"""Fill the event store again from what was accepted: the lake's client
events and the source outbox's server events (``estat store backfill``).

The bus is the one hop that keeps nothing once it is gone: a Redis
restarted without its data, a NATS server that lost its JetStream storage,
a stream deleted by hand, or ``MQ_PROVIDER=none`` for a while. Every
client event accepted is also a line of the lake's events dataset (the
very bytes published to the bus), and every server event a row of the
source outbox (kept ``OUTBOX_RETENTION`` after it was published): both are
read here and stored exactly as the store consumer stores a bus message,
``ON CONFLICT (event_id) DO NOTHING``, with the dispatch outbox rows of the
events that were missing. Running it twice, or beside live consumers,
stores nothing twice and sends nothing twice.

A line or row that does not decode, or that the database refuses (the
batch is split until it is alone, as the store consumer does), is counted
``unreadable`` with its reason; the rest are stored.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Text, cast, select

from estat.activity.common import TRANSIENT_DB, is_data_error
from estat.bus.base import short
from estat.lake.sink import ObjectStoreSink
from estat.ops.ledger import hour_bounds
from estat.store.events import EventStore
from estat.store.rows import BadPayload, decode, event_row
from estat.store.schema import (
    user_activity_dispatch_outbox,
    user_activity_event,
    user_activity_source_outbox,
)

EXAMPLES = 5  # reasons kept per source, to print


@dataclass
class Tally:
    """What one source gave: events read, stored now, already stored,
    unreadable (with a few reasons)."""

    source: str
    objects: int = 0
    read: int = 0
    inserted: int = 0
    duplicates: int = 0
    unreadable: int = 0
    dispatch: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def refuse(self, where: str, why: str) -> None:
        self.unreadable += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(f"{where}: {why}"[:300])

    def as_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "objects": self.objects,
            "read": self.read,
            "inserted": self.inserted,
            "alreadyStored": self.duplicates,
            "unreadable": self.unreadable,
            "dispatchEnqueued": dict(sorted(self.dispatch.items())),
            "examples": self.examples,
        }


def hour_prefixes(prefix: str, start: datetime, end: datetime, tz: ZoneInfo) -> list[str]:
    """The lake key prefixes (``<prefix>/dt=…/hr=…/``) of the partition hours
    of ``PARTITION_TZ`` overlapping [start, end), oldest first; a local hour
    that repeats (a DST change) once."""
    out: dict[str, None] = {}
    last = end.timestamp()
    # from the start of the hour holding ``start``, every quarter of an hour
    # before ``end``: a local hour starts on one of them in every zone (offsets
    # and DST shifts are whole quarters), so none overlapping is missed
    t = hour_bounds(start.timestamp(), tz)[0]
    while t < last:
        local = datetime.fromtimestamp(hour_bounds(t, tz)[0], tz)
        out[f"{prefix.strip('/')}/dt={local:%Y-%m-%d}/hr={local:%H}/"] = None
        t += 900
    return list(out)


def lines_of(data: bytes) -> Iterator[bytes]:
    """The JSON lines of a lake object (gzip; several members possible)."""
    for line in gzip.decompress(data).split(b"\n"):
        if line.strip():
            yield line


class Backfill:
    """Stores batches of event lines as the store consumer does."""

    def __init__(
        self,
        store: EventStore,
        *,
        batch_size: int = 500,
        dry_run: bool = False,
        on_stored: Callable[[int], None] | None = None,
        dispatch: Sequence[str] = (),
    ) -> None:
        """``dispatch``: destinations (configured ones) that get a dispatch
        row for every event read that is stored and has none for them yet
        (a destination added later); events stored now get one for every
        configured destination anyway."""
        self.store = store
        self.dispatch = tuple(dispatch)
        self.batch_size = batch_size
        self.dry_run = dry_run
        self.on_stored = on_stored
        # a dry run's events "stored" already: a client event the publisher
        # put in the source outbox is in the lake too, and counted once
        self._would: set[str] = set()

    def add(self, tally: Tally, where: str, payloads: Iterable[bytes]) -> None:
        batch: list[tuple[dict[str, Any], str]] = []
        for i, payload in enumerate(payloads):
            tally.read += 1
            try:
                batch.append((event_row(decode(payload)), payload.decode("utf-8")))
            except (BadPayload, UnicodeDecodeError, ValueError) as e:
                tally.refuse(f"{where} line {i + 1}", f"bad payload: {e}")
                continue
            if len(batch) >= self.batch_size:
                self._store(tally, where, batch)
                batch = []
        if batch:
            self._store(tally, where, batch)

    def _store(self, tally: Tally, where: str, batch: list[tuple[dict[str, Any], str]]) -> None:
        if self.dry_run:
            ids = {r["event_id"] for r, _ in batch}
            stored_before = self._existing(list(ids))
            new = ids - stored_before - self._would
            self._would |= new
            for target in self.store.targets if new else ():  # as the store would enqueue
                tally.dispatch[target] = tally.dispatch.get(target, 0) + len(new)
            tally.inserted += len(new)
            tally.duplicates += len(batch) - len(new)
            if self.dispatch:
                self._enqueue(
                    tally, [(r["event_id"], p) for r, p in batch if r["event_id"] in stored_before]
                )
            return
        try:
            stored = self.store.store([r for r, _ in batch], [p for _, p in batch])
        except TRANSIENT_DB as e:
            if not is_data_error(e):
                raise
            if len(batch) == 1:
                tally.refuse(f"{where} event {batch[0][0]['event_id']}", f"refused: {short(e)}")
                return
            half = len(batch) // 2
            self._store(tally, where, batch[:half])
            self._store(tally, where, batch[half:])
            return
        tally.inserted += stored.inserted
        tally.duplicates += stored.duplicates
        for target, n in stored.dispatch.items():
            tally.dispatch[target] = tally.dispatch.get(target, 0) + n
        if self.on_stored is not None and stored.inserted:
            self.on_stored(stored.inserted)
        if self.dispatch and stored.duplicates:  # the batch is stored, all of it
            self._enqueue(tally, [(r["event_id"], p) for r, p in batch])

    def _enqueue(self, tally: Tally, events: list[tuple[str, str]]) -> None:
        """A dispatch row per ``self.dispatch`` target for each of ``events``
        (stored ones: the caller knows) that has none for it (any status) yet."""
        d = user_activity_dispatch_outbox
        ids = list({eid for eid, _ in events})
        with self.store.db.engine.begin() as conn:
            have = set(
                conn.execute(
                    select(d.c.event_id, d.c.dispatch_target).where(
                        d.c.event_id.in_(ids), d.c.dispatch_target.in_(self.dispatch)
                    )
                ).tuples()
            )
            rows = [
                {
                    "event_id": eid,
                    "dispatch_target": target,
                    "payload": payload,
                    "status": "PENDING",
                }
                for eid, payload in dict(events).items()
                for target in self.dispatch
                if (eid, target) not in have
            ]
            if self.dry_run:
                added = [r["dispatch_target"] for r in rows]
            elif rows:
                added = [r[0] for r in conn.execute(self.store.dispatch_insert, rows)]
            else:
                added = []
        for target in added:
            tally.dispatch[target] = tally.dispatch.get(target, 0) + 1

    def _existing(self, ids: Sequence[str]) -> set[str]:
        t = user_activity_event
        with self.store.db.engine.connect() as conn:
            return {
                r[0] for r in conn.execute(select(t.c.event_id).where(t.c.event_id.in_(set(ids))))
            }


async def from_lake(
    backfill: Backfill,
    sink: ObjectStoreSink,
    prefixes: Sequence[str],
    tally: Tally | None = None,
    progress: Callable[[str, Tally], None] | None = None,
) -> Tally:
    """Every ``.jsonl.gz`` object under ``prefixes`` (the events dataset's
    partition hours), object by object, counted in ``tally`` as it goes (so
    that a lake failing half-way leaves the counts of what was done);
    ``progress`` after each prefix."""
    tally = tally if tally is not None else Tally("lake")
    for prefix in prefixes:
        for key in sorted(await sink.keys(prefix)):
            if not key.endswith(".jsonl.gz"):
                continue  # _MANIFEST.json
            data = await sink.get(key)
            tally.objects += 1
            try:
                lines = list(lines_of(data))
            except (OSError, EOFError, zlib.error) as e:
                tally.refuse(key, f"not gzip JSON Lines: {e}")
                continue
            backfill.add(tally, key, lines)
        if progress is not None:
            progress(prefix, tally)
    return tally


def from_outbox(
    backfill: Backfill, start: datetime, end: datetime, tally: Tally | None = None
) -> Tally:
    """Every source outbox row created in [start, end), whatever its status
    (a row still PENDING is stored now and counted a duplicate when the
    relay's publish reaches the store), by id, counted in ``tally``."""
    tally = tally if tally is not None else Tally("outbox")
    t = user_activity_source_outbox
    last = 0
    page = max(backfill.batch_size, 100)
    while True:
        with backfill.store.db.engine.connect() as conn:
            rows = conn.execute(
                select(t.c.id, cast(t.c.payload, Text))
                .where(t.c.created_at >= start, t.c.created_at < end, t.c.id > last)
                .order_by(t.c.id)
                .limit(page)
            ).all()
        if not rows:
            return tally
        last = rows[-1][0]
        tally.objects += 1
        backfill.add(
            tally, f"outbox ids {rows[0][0]}-{last}", [str(p).encode("utf-8") for _, p in rows]
        )
