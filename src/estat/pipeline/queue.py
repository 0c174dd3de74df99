"""The event queue between the ingest handlers and the batcher.

Records are serialised on ``put`` (``msgspec``), so only one bytes object
per event waits in the queue; the batcher takes a run of them joined into
newline-terminated JSON Lines. (One growing buffer was tried: its
reallocations copied every queued byte about eight times over.)

Bounded by events (``CHANNEL_SIZE``) and by bytes (``CHANNEL_MAX_BYTES``;
the last record may pass the byte bound by its own size). ``put`` never
waits: when the queue is full it raises ``Overloaded`` and the ingest
listener answers 503 with ``Retry-After``. Everything runs on one event
loop, so no locks are needed.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import msgspec

from estat.errors import Overloaded

_NL: Final = b"\n"


class EventQueue:
    __slots__ = (
        "_closed",
        "_encode",
        "_lines",
        "_refusing",
        "_refusing_kind",
        "_waiter",
        "events",
        "max_bytes",
        "max_events",
        "nbytes",
        "wake_at",
    )

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self._lines: list[bytes] = []
        self.events = 0
        self.nbytes = 0
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        # why puts are refused (draining, or nothing can save a batch): one
        # check on the hot path covers both
        self._refusing: str | None = None
        self._refusing_kind = ""
        self._encode = msgspec.json.Encoder().encode
        # A waiting batcher is woken only once this many records wait (it
        # also polls; see ``wait``): waking it per record would cost more
        # than the record itself.
        self.wake_at = max(1, min(1024, max_events // 4))

    def __len__(self) -> int:
        return self.events

    @property
    def closed(self) -> bool:
        return self._closed

    def has_room(self) -> bool:
        return self.events < self.max_events and self.nbytes < self.max_bytes

    def put(self, record: Any) -> None:
        """Serialise one record as a JSON line and enqueue it, or raise ``Overloaded``."""
        self.put_line(self._encode(record))

    def put_line(self, line: bytes) -> None:
        """Enqueue one record already serialised as JSON (no newline), or raise ``Overloaded``."""
        if self._refusing is not None:
            raise Overloaded(self._refusing, 5, self._refusing_kind)
        if self.events >= self.max_events or self.nbytes >= self.max_bytes:
            raise Overloaded("event queue full", retry_after=1)
        self._lines.append(line)
        self.nbytes += len(line) + 1
        self.events += 1
        if self._waiter is not None and self.events >= self.wake_at:
            self._wake()

    def put_many(self, records: list[Any]) -> list[bytes]:
        """Enqueue all of ``records`` or none of them (raises ``Overloaded``);
        returns their encoded lines (without the newline)."""
        if self._refusing is not None:
            raise Overloaded(self._refusing, 5, self._refusing_kind)
        if self.events + len(records) > self.max_events or self.nbytes >= self.max_bytes:
            raise Overloaded("event queue full", retry_after=1)
        enc = self._encode
        lines = [enc(r) for r in records]
        self._lines.extend(lines)
        self.nbytes += sum(map(len, lines)) + len(lines)
        self.events += len(records)
        if self._waiter is not None and self.events >= self.wake_at:
            self._wake()
        return lines

    def take(self, max_events: int, max_bytes: int) -> tuple[bytes | bytearray, int]:
        """Remove up to ``max_events`` whole lines totalling at most ``max_bytes``.

        At least one line is taken if any is waiting, even one larger than
        ``max_bytes``, so an oversized record cannot wedge the queue.
        Returns the lines (newline-terminated) and their count.
        """
        lines = self._lines
        if not lines:
            return b"", 0
        if len(lines) <= max_events and self.nbytes <= max_bytes:
            n = len(lines)
            self._lines = []
            self.events = 0
            self.nbytes = 0
        else:
            n = 0
            size = 0
            for line in lines:
                if n >= max_events or (n and size + len(line) + 1 > max_bytes):
                    break
                size += len(line) + 1
                n += 1
            self._lines = lines[n:]
            lines = lines[:n]
            self.events -= n
            self.nbytes -= size
        lines.append(b"")
        return _NL.join(lines), n

    def next_line_size(self) -> int:
        if not self._lines:
            return 0
        return len(self._lines[0]) + 1

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

    @property
    def refusing(self) -> str | None:
        return self._refusing

    def refuse(self, reason: str | None, kind: str = "lake_unavailable") -> None:
        """Refuse every put with ``reason`` (503) until called with None.
        A closed queue stays closed."""
        if not self._closed:
            self._refusing = reason
            self._refusing_kind = kind

    def close(self) -> None:
        """No more puts; a waiting batcher wakes to drain what is left."""
        self._closed = True
        self._refusing = "draining"
        self._refusing_kind = "draining"
        self._wake()


def _release(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
