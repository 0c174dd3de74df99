"""The batcher: cuts the record stream into batches by size, bytes and age,
and at partition-hour boundaries (``PARTITION_TZ``), so a batch's events
were all taken within the hour its key names (the completeness ledger
counts per hour exactly).

``BatchBuilder`` holds the cut rules and is synchronous (unit-tested with a
fake clock); ``run_batcher`` drives it from the event queue into the upload
queue. When the upload queue is full the batcher waits, the event queue
fills up and ingest answers 503: backpressure reaches the client instead of
memory growing without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from zoneinfo import ZoneInfo

from estat.clock import Clock
from estat.model import Batch
from estat.ops.ledger import hour_bounds
from estat.pipeline.queue import EventQueue


class BatchBuilder:
    def __init__(
        self,
        *,
        max_events: int,
        max_bytes: int,
        max_age: float,
        clock: Clock,
        make_key: Callable[[float], str],
        partition_tz: str = "UTC",
    ) -> None:
        self._tz = ZoneInfo(partition_tz)
        self._hour_end = 0.0
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._clock = clock
        self._make_key = make_key
        self._parts: list[bytes | bytearray] = []
        #: events of a cut batch waiting for room in the upload queue
        self.handing_off = 0
        self.events = 0
        self.nbytes = 0
        self._opened_mono = 0.0
        self._first_ts = 0

    def fill(self, queue: EventQueue) -> str | None:
        """Move records from the queue; return the cut reason if the batch is due."""
        if not queue.events:
            return self.due()
        if not self.events:
            self._opened_mono = self._clock.monotonic()
            now = self._clock.time()
            self._first_ts = int(now)
            self._hour_end = hour_bounds(now, self._tz)[1]
        elif self._clock.time() >= self._hour_end:
            return "hour"  # a batch holds one partition hour: the ledger counts exactly
        elif self.nbytes + queue.next_line_size() > self.max_bytes:
            return "bytes"
        chunk, n = queue.take(self.max_events - self.events, self.max_bytes - self.nbytes)
        self._parts.append(chunk)
        self.events += n
        self.nbytes += len(chunk)
        if self.events >= self.max_events:
            return "size"
        if queue.events and self.nbytes + queue.next_line_size() > self.max_bytes:
            return "bytes"
        return self.due()

    def due(self) -> str | None:
        if self.events and self._clock.monotonic() - self._opened_mono >= self.max_age:
            return "age"
        if self.events and self._clock.time() >= self._hour_end:
            return "hour"
        return None

    def time_left(self) -> float | None:
        if not self.events:
            return None
        age = self._opened_mono + self.max_age - self._clock.monotonic()
        return max(0.0, min(age, self._hour_end - self._clock.time()))

    def cut(self) -> Batch:
        now = self._clock.time()
        parts = self._parts
        batch = Batch(
            # the key's partition is the hour the events were taken in
            key=self._make_key(min(now, self._hour_end - 1)),
            data=parts[0] if len(parts) == 1 else b"".join(parts),
            events=self.events,
            first_ts=self._first_ts,
            last_ts=int(now),
        )
        self._parts = []
        self.events = 0
        self.nbytes = 0
        return batch


#: how often the batcher looks at the queue when fewer than ``wake_at``
#: records wait: the most a record waits before it joins a batch
POLL_SECONDS = 0.05


async def run_batcher(
    queue: EventQueue,
    builder: BatchBuilder,
    out: asyncio.Queue[Batch],
    on_cut: Callable[[str], None],
    on_batch: Callable[[Batch], None] | None = None,
) -> None:
    """Cut batches until the queue is closed and empty; the last one is cut as ``drain``."""
    while True:
        left = builder.time_left()
        await queue.wait(POLL_SECONDS if left is None else min(left, POLL_SECONDS))
        reason = builder.fill(queue)
        while reason is not None:
            on_cut(reason)
            await _hand_off(builder, out, on_batch)
            reason = builder.fill(queue)
        if queue.closed and not len(queue):
            if builder.events:
                on_cut("drain")
                await _hand_off(builder, out, on_batch)
            return


async def _hand_off(
    builder: BatchBuilder,
    out: asyncio.Queue[Batch],
    on_batch: Callable[[Batch], None] | None = None,
) -> None:
    batch = builder.cut()
    if on_batch is not None:
        on_batch(batch)
    builder.handing_off = batch.events  # still counted while it waits for room
    await out.put(batch)
    builder.handing_off = 0
