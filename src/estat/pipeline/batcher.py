"""The batcher: cuts the record stream into batches by size, bytes and age.

``BatchBuilder`` holds the cut rules and is synchronous (unit-tested with a
fake clock); ``run_batcher`` drives it from the event queue into the upload
queue. When the upload queue is full the batcher waits, the event queue
fills up and ingest answers 503: backpressure reaches the client instead of
memory growing without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from estat.clock import Clock
from estat.model import Batch
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
    ) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._clock = clock
        self._make_key = make_key
        self.lines: list[bytes] = []
        self.nbytes = 0
        self._opened_mono = 0.0
        self._first_ts = 0

    @property
    def events(self) -> int:
        return len(self.lines)

    def fill(self, queue: EventQueue) -> str | None:
        """Move records from the queue; return the cut reason if the batch is full."""
        if not len(queue):
            return self.due()
        if not self.lines:
            self._opened_mono = self._clock.monotonic()
            self._first_ts = int(self._clock.time())
        room = self.max_events - len(self.lines)
        if self.lines and self.nbytes + queue.peek_size() > self.max_bytes:
            return "bytes"
        self.nbytes += queue.take(room, self.max_bytes - self.nbytes, self.lines)
        if len(self.lines) >= self.max_events:
            return "size"
        if len(queue) and self.nbytes + queue.peek_size() > self.max_bytes:
            return "bytes"
        return self.due()

    def due(self) -> str | None:
        if self.lines and self._clock.monotonic() - self._opened_mono >= self.max_age:
            return "age"
        return None

    def time_left(self) -> float | None:
        if not self.lines:
            return None
        return max(0.0, self._opened_mono + self.max_age - self._clock.monotonic())

    def cut(self) -> Batch:
        now = self._clock.time()
        batch = Batch(
            key=self._make_key(now),
            lines=self.lines,
            nbytes=self.nbytes,
            first_ts=self._first_ts,
            last_ts=int(now),
        )
        self.lines = []
        self.nbytes = 0
        return batch


async def run_batcher(
    queue: EventQueue,
    builder: BatchBuilder,
    out: asyncio.Queue[Batch],
    on_cut: Callable[[str], None],
) -> None:
    """Cut batches until the queue is closed and empty; the last one is cut as ``drain``."""
    while True:
        await queue.wait(builder.time_left())
        reason = builder.fill(queue)
        while reason is not None:
            on_cut(reason)
            await out.put(builder.cut())
            reason = builder.fill(queue)
        if queue.closed and not len(queue):
            if builder.events:
                on_cut("drain")
                await out.put(builder.cut())
            return
