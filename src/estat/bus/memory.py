"""The in-process bus (``MQ_PROVIDER=memory``, the embedded default).

Bounded (``MQ_MEMORY_CAPACITY`` messages published and not yet acked):
``publish`` raises ``BusError`` when full, so the publisher falls back to
the source outbox. One consumer group per process; what it holds is lost if
the process dies (the embedded setup's trade: the lake has every event, and
a graceful stop drains the bus into the store first).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence

from estat.bus.base import (
    TOPIC,
    BusError,
    BusStats,
    Delivery,
    Message,
    ParkedMessage,
    message_of,
)
from estat.model import EventRecord
from estat.ops.logging import get_logger

log = get_logger("estat.bus")


class MemoryBus:
    provider = "memory"

    def __init__(self, capacity: int = 100_000, retry_delay: float = 1.0) -> None:
        self.topic = TOPIC
        self.capacity = capacity
        self.retry_delay = retry_delay
        self._new: deque[tuple[int, Message]] = deque()
        self._deliveries: dict[int, int] = {}
        self._unacked: dict[int, Message] = {}
        self._later: list[tuple[float, int]] = []  # (due, seq) to deliver again
        self._seq = itertools.count(1)
        self.parked_list: list[tuple[Message, str]] = []
        self._parked_ids: list[str] = []  # beside ``parked``
        self._parked_seq = 0
        self._wake = asyncio.Event()
        self.on_lost: Callable[[], None] | None = None  # lost only with the process
        self.closed = False

    async def start(self) -> None:
        return None

    async def publish_events(self, records: Sequence[EventRecord], lines: Sequence[bytes]) -> None:
        await self.publish([message_of(r, line) for r, line in zip(records, lines, strict=True)])

    async def parked(self, limit: int) -> list[ParkedMessage]:
        return [
            ParkedMessage(pid, m, err, int(pid.split(":")[1]))
            for pid, (m, err) in list(zip(self._parked_ids, self.parked_list, strict=True))[:limit]
        ]

    async def requeue(self, ids: Sequence[str]) -> int:
        wanted = set(ids)
        keep_ids, keep, again = [], [], []
        for pid, item in zip(self._parked_ids, self.parked_list, strict=True):
            if pid in wanted:
                again.append(item[0])
            else:
                keep_ids.append(pid)
                keep.append(item)
        if again:
            await self.publish(again)
        self._parked_ids, self.parked_list = keep_ids, keep
        return len(again)

    async def publish(self, messages: Sequence[Message]) -> None:
        if self.closed:
            raise BusError("the in-process bus is closed")
        if len(self._unacked) + len(messages) > self.capacity:
            raise BusError(f"the in-process bus is full ({self.capacity} messages)")
        for m in messages:
            seq = next(self._seq)
            self._unacked[seq] = m
            self._new.append((seq, m))
        self._wake.set()

    def consumer(self, name: str) -> MemoryConsumer:
        return MemoryConsumer(self)

    def take_all(self) -> list[Message]:
        """Everything not acked, removed from the bus (a stopping process
        hands it to durable storage)."""
        left = list(self._unacked.values())
        self._unacked.clear()
        self._new.clear()
        self._later.clear()
        self._deliveries.clear()
        return left

    async def stats(self) -> BusStats:
        return BusStats(len(self._unacked), len(self.parked_list))

    async def close(self) -> None:
        self.closed = True
        self._wake.set()

    # -- used by the consumer ---------------------------------------------------
    def _take(self, n: int) -> list[Delivery]:
        out: list[Delivery] = []
        now = time.monotonic()
        while self._later and self._later[0][0] <= now and len(out) < n:
            _, seq = heapq.heappop(self._later)
            m = self._unacked.get(seq)
            if m is not None:
                out.append(self._deliver(seq, m, now))
        while self._new and len(out) < n:
            seq, m = self._new.popleft()
            out.append(self._deliver(seq, m, now))
        return out

    def _deliver(self, seq: int, m: Message, now: float) -> Delivery:
        d = self._deliveries[seq] = self._deliveries.get(seq, 0) + 1
        return Delivery(m, d, seq, now)

    def _settle(self, seq: int) -> None:
        self._unacked.pop(seq, None)
        self._deliveries.pop(seq, None)

    def _again(self, seq: int, delay: float) -> None:
        heapq.heappush(self._later, (time.monotonic() + delay, seq))
        self._wake.set()


class MemoryConsumer:
    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus
        self._held: set[int] = set()
        self._interrupted = False

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        bus = self.bus
        deadline = time.monotonic() + timeout
        while True:
            out = bus._take(max_messages)
            if out:
                self._held.update(d.handle for d in out)
                return out
            left = deadline - time.monotonic()
            if left <= 0 or bus.closed or self._interrupted:
                self._interrupted = False
                return []
            if bus._later:
                left = min(left, max(0.0, bus._later[0][0] - time.monotonic()))
            bus._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(bus._wake.wait(), left)

    def interrupt(self) -> None:
        self._interrupted = True
        self.bus._wake.set()

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            self._held.discard(d.handle)
            self.bus._settle(d.handle)

    async def retry(self, delivery: Delivery, error: str) -> None:
        self._held.discard(delivery.handle)
        self.bus._again(delivery.handle, self.bus.retry_delay)

    async def park(self, delivery: Delivery, error: str) -> None:
        self._held.discard(delivery.handle)
        self.bus._settle(delivery.handle)
        self.bus.parked_list.append((delivery.message, error))
        self.bus._parked_seq += 1
        self.bus._parked_ids.append(f"{self.bus._parked_seq}:{delivery.deliveries}")

    async def close(self) -> None:
        """What this consumer fetched and did not settle is delivered again."""
        for seq in self._held:
            self.bus._again(seq, 0.0)
        self._held.clear()
