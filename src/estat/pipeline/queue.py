"""The event queue between the ingest handlers and the batcher.

Records are serialised straight into one growing buffer of JSON Lines
(``msgspec``'s ``encode_into``): no per-event object survives the request,
which keeps the allocator and the garbage collector out of the hot path.
The batcher takes the buffer whole when it fits a batch and splits it at
line boundaries when it does not.

Bounded by events (``CHANNEL_SIZE``) and by bytes (``CHANNEL_MAX_BYTES``;
the last record may pass the byte bound by its own size). ``put`` never
waits: when the queue is full it raises ``Overloaded`` and the ingest
listener answers 503 with ``Retry-After``. Everything runs on one event
loop, so no locks are needed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from estat.errors import Overloaded

_NL = b"\n"


class EventQueue:
    __slots__ = (
        "_buf",
        "_closed",
        "_encode_into",
        "_waiter",
        "events",
        "max_bytes",
        "max_events",
        "wake_at",
    )

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self._buf = bytearray()
        self.events = 0
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._encode_into = msgspec.json.Encoder().encode_into
        # A waiting batcher is woken only once this many records wait (it
        # also polls; see ``wait``): waking it per record would cost more
        # than the record itself.
        self.wake_at = max(1, min(1024, max_events // 4))

    def __len__(self) -> int:
        return self.events

    @property
    def nbytes(self) -> int:
        return len(self._buf)

    @property
    def closed(self) -> bool:
        return self._closed

    def has_room(self) -> bool:
        return self.events < self.max_events and len(self._buf) < self.max_bytes

    def put(self, record: Any) -> None:
        """Serialise one record as a JSON line and enqueue it, or raise ``Overloaded``."""
        buf = self._buf
        if self._closed:
            raise Overloaded("draining", retry_after=5)
        if self.events >= self.max_events or len(buf) >= self.max_bytes:
            raise Overloaded("event queue full", retry_after=1)
        self._encode_into(record, buf, -1)
        buf += _NL
        self.events += 1
        if self._waiter is not None and self.events >= self.wake_at:
            self._wake()

    def put_many(self, records: list[Any]) -> None:
        """Enqueue all of ``records`` or none of them (raises ``Overloaded``)."""
        if self._closed:
            raise Overloaded("draining", retry_after=5)
        if self.events + len(records) > self.max_events or len(self._buf) >= self.max_bytes:
            raise Overloaded("event queue full", retry_after=1)
        buf = self._buf
        enc = self._encode_into
        for r in records:
            enc(r, buf, -1)
            buf += _NL
        self.events += len(records)
        if self._waiter is not None and self.events >= self.wake_at:
            self._wake()

    def take(self, max_events: int, max_bytes: int) -> tuple[bytes | bytearray, int]:
        """Remove up to ``max_events`` whole lines totalling at most ``max_bytes``.

        At least one line is taken if any is waiting, even one larger than
        ``max_bytes``, so an oversized record cannot wedge the queue.
        Returns the lines and their count.
        """
        buf = self._buf
        if not self.events:
            return b"", 0
        if self.events <= max_events and len(buf) <= max_bytes:
            n = self.events
            self._buf = bytearray()
            self.events = 0
            return buf, n
        pos = 0
        n = 0
        find = buf.find
        while n < max_events:
            end = find(_NL, pos) + 1
            if n and end > max_bytes:
                break
            pos = end
            n += 1
            if pos >= len(buf):
                break
        chunk = bytes(buf[:pos])
        del buf[:pos]
        self.events -= n
        return chunk, n

    def next_line_size(self) -> int:
        if not self.events:
            return 0
        return self._buf.find(_NL) + 1

    def _wake(self) -> None:
        w = self._waiter
        self._waiter = None
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Return when ``wake_at`` records wait, the queue is closed, or
        ``timeout`` passes (the batcher polls with a short timeout)."""
        if self.events >= self.wake_at or self._closed:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiter = fut
        timer = loop.call_later(timeout, _release, fut)
        try:
            await fut
        finally:
            timer.cancel()
            if self._waiter is fut:
                self._waiter = None

    def close(self) -> None:
        """No more puts; a waiting batcher wakes to drain what is left."""
        self._closed = True
        self._wake()


def _release(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
