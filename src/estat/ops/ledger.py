"""The completeness ledger, in memory: events counted per dataset, hour and
stage, to be added to the database's ``estat_ledger`` by
``estat.store.ledger`` every few seconds.

An hour is a lake partition hour (``dt=…/hr=…`` in ``PARTITION_TZ``),
identified by the Unix time it starts. Stages: ``accepted`` (taken into a
batch bound for that hour's partition: the batcher cuts at hour
boundaries, so a batch's events were all taken within its hour), ``lake``
(stored in the lake: a live upload or a DLQ replay), and for the
user-activity pipeline, by the hour the event was received, ``stored`` (a
new row of ``user_activity_event``) and ``dispatched:<TARGET>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

_KEY = re.compile(r"^(?P<prefix>.*)/dt=(?P<d>\d{4}-\d{2}-\d{2})/hr=(?P<h>\d{2})/")

Counts = dict[tuple[str, int, str], int]


def key_hour(key: str, tz: ZoneInfo) -> tuple[str, int] | None:
    """(dataset, hour start) of a lake object key, or None."""
    m = _KEY.match(key)
    if m is None:
        return None
    d = m["d"]  # not strptime: it imports a module on first use (EMFILE: a dead batcher)
    local = datetime(int(d[:4]), int(d[5:7]), int(d[8:]), int(m["h"]), tzinfo=tz)
    return m["prefix"], int(local.timestamp())


def hour_bounds(ts: float, tz: ZoneInfo) -> tuple[int, int]:
    """(start, end) Unix times of the partition hour holding ``ts``."""
    offset = int(datetime.fromtimestamp(ts, tz).utcoffset().total_seconds())  # type: ignore[union-attr]
    start = int(ts) - (int(ts) + offset) % 3600
    return start, start + 3600


@dataclass(frozen=True, slots=True)
class LakeObject:
    key: str
    events: int
    nbytes: int
    sha256: str  # of the object's bytes as stored (gzip)


class Ledger:
    def __init__(self, tz: str = "UTC") -> None:
        self.tz = ZoneInfo(tz)
        self._counts: Counts = {}
        self._objects: list[LakeObject] = []

    def stored_object(self, key: str, events: int, nbytes: int, sha256: str) -> None:
        """A lake object was stored: counted ``lake``, and listed for its
        hour's manifest."""
        self.add_key(key, "lake", events)
        self._objects.append(LakeObject(key, events, nbytes, sha256))

    def take_objects(self) -> list[LakeObject]:
        objects, self._objects = self._objects, []
        return objects

    def put_back_objects(self, objects: list[LakeObject]) -> None:
        self._objects[:0] = objects

    def add(self, dataset: str, hour: int, stage: str, n: int) -> None:
        if n:
            k = (dataset, hour, stage)
            self._counts[k] = self._counts.get(k, 0) + n

    def add_key(self, key: str, stage: str, n: int) -> None:
        """Count ``n`` events of the lake object ``key`` (its dataset is the
        key's prefix, its hour the partition's)."""
        found = key_hour(key, self.tz)
        if found is not None:
            self.add(found[0], found[1], stage, n)

    def add_received(self, dataset: str, received_at: str, stage: str, n: int = 1) -> None:
        """Count by the hour an event was received (ISO 8601)."""
        try:
            ts = datetime.fromisoformat(received_at.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return
        self.add(dataset, hour_bounds(ts, self.tz)[0], stage, n)

    def take(self) -> Counts:
        counts, self._counts = self._counts, {}
        return counts

    def put_back(self, counts: Counts) -> None:
        """Counts a flush could not write: kept for the next one."""
        for (dataset, hour, stage), n in counts.items():
            self.add(dataset, hour, stage, n)
