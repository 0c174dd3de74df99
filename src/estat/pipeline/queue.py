"""The event queue between the ingest handlers and the batcher.

Bounded by events (``CHANNEL_SIZE``) and by bytes (``CHANNEL_MAX_BYTES``).
``put`` never waits: when the queue is full it raises ``Overloaded`` and the
ingest listener answers 503 with ``Retry-After``. Everything runs on one
event loop, so no locks are needed.
"""

from __future__ import annotations

import asyncio
from collections import deque

from estat.errors import Overloaded


class EventQueue:
    __slots__ = ("_closed", "_items", "_waiter", "max_bytes", "max_events", "nbytes")

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self._items: deque[bytes] = deque()
        self.nbytes = 0
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, line: bytes) -> None:
        """Enqueue one serialised record, or raise ``Overloaded``."""
        items = self._items
        if len(items) >= self.max_events or self.nbytes + len(line) > self.max_bytes:
            if self._closed:
                raise Overloaded("draining", retry_after=5)
            raise Overloaded("event queue full", retry_after=1)
        if self._closed:
            raise Overloaded("draining", retry_after=5)
        items.append(line)
        self.nbytes += len(line)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def take(self, max_events: int, max_bytes: int, out: list[bytes]) -> int:
        """Move up to ``max_events`` records (and ``max_bytes``) into ``out``.

        One record is always moved if any is waiting, even a record larger
        than ``max_bytes``, so an oversized record cannot wedge the queue.
        Returns the bytes moved.
        """
        items = self._items
        moved = 0
        n = 0
        while items and n < max_events:
            size = len(items[0])
            if n and moved + size > max_bytes:
                break
            out.append(items.popleft())
            moved += size
            n += 1
        self.nbytes -= moved
        return moved

    def peek_size(self) -> int:
        return len(self._items[0]) if self._items else 0

    async def wait(self, timeout: float | None = None) -> None:
        """Return when a record is waiting, the queue is closed, or ``timeout`` passes."""
        if self._items or self._closed:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiter = fut
        try:
            if timeout is None:
                await fut
            else:
                await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            if self._waiter is fut:
                self._waiter = None

    def close(self) -> None:
        """No more puts; a waiting batcher wakes to drain what is left."""
        self._closed = True
        w = self._waiter
        if w is not None and not w.done():
            self._waiter = None
            w.set_result(None)

    def drain_all(self) -> list[bytes]:
        items = list(self._items)
        self._items.clear()
        self.nbytes = 0
        return items
