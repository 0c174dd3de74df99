"""Redis Streams (``MQ_PROVIDER=redis-stream``).

Stream ``<MQ_PREFIX>:user-activity``, consumer group ``MQ_CONSUMER_GROUP``.
Two entry formats (``MQ_REDIS_ENTRY``), both always read:

- ``batch`` (the default): one entry per published batch, fields
  ``topic``, ``count`` and ``events``: the events' JSON as JSON Lines (the
  lines of the lake's ``events`` dataset; each message's id, key, time and
  headers are read from its line). Redis does one XADD per batch instead
  of one per event, and the publisher builds no per-event message: measured,
  the difference between the bus halving the API's throughput and not
  (docs/benchmarks.md). A message whose payload is not an event's one-line
  JSON (a broken outbox row) goes in an entry of its own, as below.
- ``event``: one entry per event with seed 004's producer fields
  (``messageId``, ``topic``, ``key``, ``occurredAt``, ``payload``,
  ``header.*``), for other readers of the stream.

Each event of an entry is its own ``Delivery``. An entry is acked (XACK)
once every event in it is settled, after the store transaction commits; if
any of them asked for a retry, the entry stays pending and the whole entry
is delivered again (the store is idempotent by event id: the others count
as duplicates). Entries pending longer than ``MQ_CLAIM_IDLE`` (a consumer
died, or asked for a retry) are claimed by a live consumer with XAUTOCLAIM.
A parked event goes to ``<stream>:dlq`` (seed fields, its last error, the
entry id), in one MULTI with the entry's XACK when it was the last one.

Trimming removes only entries that every group has acknowledged: the
stream is cut (``XTRIM MINID ~``) below the oldest entry any group still
has pending or has not yet read. (A ``MAXLEN`` cap, as seed 004's producer
used, drops unconsumed entries silently.)

A consumer that finds its group gone (Redis restarted without its data, a
failover to a replica that had not the group yet, the key deleted by hand)
creates it again from the stream's first entry and says so: a publisher's
XADD creates the stream again by itself, and without the group nothing
would read it. What the stream held before is not in Redis any more (the
events are in the lake); what was added since is read, the store
deduplicating by event id.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from estat.bus.base import (
    TOPIC,
    BusError,
    BusStats,
    Delivery,
    Message,
    ParkedMessage,
    message_of,
    message_of_line,
    short,
)
from estat.bus.redis_entries import (
    PUBLISH_LUA,
    BatchEntry,
    deliveries_of,
    encode_json,
    entry_id_of,
    fields_of,
    id_key,
    message_from,
)
from estat.model import EventRecord
from estat.ops.logging import get_logger

log = get_logger("estat.bus")

TRIM_EVERY = 10.0  # seconds between trims, per consumer


class RedisStreamBus:
    provider = "redis-stream"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "estat",
        group: str = "estat-store",
        claim_idle: float = 60.0,
        timeout: float = 5.0,
        entry: str = "batch",
    ) -> None:
        if entry not in ("batch", "event"):
            raise ValueError(f"entry format {entry!r}: batch or event")
        self.entry = entry
        self.topic = TOPIC
        self.stream = f"{prefix}:{TOPIC}"
        self.dlq = self.stream + ":dlq"
        self.group = group
        self.claim_idle_ms = int(claim_idle * 1000)
        self.redis: Any = aioredis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30
        )
        self._publish = self.redis.register_script(PUBLISH_LUA)
        self.on_lost: Callable[[], None] | None = None

    async def start(self) -> None:
        try:
            await self._create_group()
        except (RedisError, OSError) as e:
            raise BusError(short(e)) from e
        await self._check_durability()

    async def _check_durability(self) -> None:
        """Said at start: a Redis without an append-only file loses, when it
        restarts, every entry written since its last snapshot; one that may
        evict keys when full (a ``maxmemory-policy`` other than
        ``noeviction``) can drop the whole stream silently."""
        try:
            info = await self.redis.info("persistence")
            memory = await self.redis.info("memory")
        except (RedisError, OSError):
            return  # INFO may be refused (a managed Redis): nothing to say
        if str(info.get("aof_enabled", "1")) == "0":
            log.warning(
                "bus: Redis keeps no append-only file (appendonly no): a restart loses the "
                "entries not yet stored (they stay in the lake); run it with appendonly yes",
                stream=self.stream,
            )
        policy = str(memory.get("maxmemory_policy", "noeviction"))
        if int(memory.get("maxmemory", 0) or 0) > 0 and policy != "noeviction":
            log.warning(
                "bus: Redis may evict keys when full (maxmemory-policy "
                f"{policy}): the stream itself can be dropped; use noeviction (a full Redis "
                "then refuses publishes, and events wait in the source outbox)",
                stream=self.stream,
            )

    async def _create_group(self) -> bool:
        """Create the group from the stream's start; False: it was there."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
            return False
        return True

    async def group_lost(self, e: ResponseError) -> bool:
        """``e`` says the group (or the stream) is gone: create it again and
        report it. False: some other error."""
        if not str(e).startswith("NOGROUP"):
            return False
        if await self._create_group():
            log.error(
                "bus: the consumer group was gone; created again from the stream's start",
                stream=self.stream,
                group=self.group,
                hint="Redis restarted without its data, failed over, or the key was deleted: "
                "entries it held unread are not on the bus (they are in the lake); "
                "see docs/runbook.md, 'The bus lost its data'",
            )
            if self.on_lost is not None:
                self.on_lost()
        return True

    async def publish_events(self, records: Sequence[EventRecord], lines: Sequence[bytes]) -> None:
        if self.entry == "batch":
            await self._add_batch(lines)
        else:
            await self._add_each(
                [message_of(r, line) for r, line in zip(records, lines, strict=True)]
            )

    async def publish(self, messages: Sequence[Message]) -> None:
        """Batch entries for messages that are events' one-line JSON, an
        entry each for the others (all in one call: all or none)."""
        if self.entry == "event":
            await self._add_each(messages)
            return
        lines: list[bytes] = []
        others: list[Message] = []
        for m in messages:
            if b"\n" not in m.payload and message_of_line(m.payload) == m:
                lines.append(m.payload)
            else:
                others.append(m)
        if lines and others:
            await self._add_each(others, batch=lines)
        elif lines:
            await self._add_batch(lines)
        elif others:
            await self._add_each(others)

    async def _add_batch(self, lines: Sequence[bytes]) -> None:
        if not lines:
            return
        fields = {"topic": self.topic, "count": len(lines), "events": b"\n".join(lines)}
        try:
            await self.redis.xadd(self.stream, fields)
        except (RedisError, OSError) as e:
            raise BusError(short(e)) from e

    async def _add_each(self, messages: Sequence[Message], batch: Sequence[bytes] = ()) -> None:
        """One script call: an entry per message (and a batch entry of
        ``batch`` first, when given)."""
        if not messages:
            return
        items = encode_json(
            [
                (
                    m.message_id,
                    m.key,
                    m.occurred_at,
                    m.payload.decode("utf-8", "replace"),
                    [x for kv in m.headers.items() for x in kv],
                )
                for m in messages
            ]
        )
        events = b"\n".join(batch)
        try:
            await self._publish(keys=[self.stream], args=[items, self.topic, len(batch), events])
        except (RedisError, OSError) as e:
            raise BusError(short(e)) from e

    async def parked(self, limit: int) -> list[ParkedMessage]:
        try:
            entries = await self.redis.xrange(self.dlq, "-", "+", count=limit)
        except (RedisError, OSError) as e:
            raise BusError(short(e)) from e
        return [
            ParkedMessage(
                entry_id.decode(),
                message_from(fields),
                fields.get(b"error", b"").decode(errors="replace"),
                int(fields.get(b"deliveries", b"0") or 0),
            )
            for entry_id, fields in entries
        ]

    async def requeue(self, ids: Sequence[str]) -> int:
        """Each one back on the stream (an entry of its own, its seed fields),
        then deleted from ``:dlq``: a crash between the two publishes it twice,
        which the store absorbs."""
        found = 0
        for pid in ids:
            if not re.fullmatch(r"\d+-\d+", pid):
                continue  # not an id of this bus
            try:
                entries = await self.redis.xrange(self.dlq, pid, pid)
                if not entries:
                    continue
                await self._add_each([message_from(entries[0][1])])
                await self.redis.xdel(self.dlq, pid)
            except (RedisError, OSError) as e:
                raise BusError(short(e)) from e
            found += 1
        return found

    def consumer(self, name: str) -> RedisStreamConsumer:
        return RedisStreamConsumer(self, name)

    async def stats(self) -> BusStats:
        try:
            groups = await self.redis.xinfo_groups(self.stream)
            parked = await self.redis.xlen(self.dlq)
        except (RedisError, OSError) as e:
            raise BusError(short(e)) from e
        pending = 0
        for g in groups:
            if g["name"].decode() == self.group:
                pending = int(g.get("pending") or 0) + int(g.get("lag") or 0)
        return BusStats(pending, int(parked))

    async def trim(self) -> None:
        """Cut the stream below the oldest entry a group still needs."""
        r = self.redis
        groups = await r.xinfo_groups(self.stream)
        floor: tuple[int, int] | None = None
        for g in groups:
            name = g["name"]
            summary = await r.xpending(self.stream, name)
            if summary and summary.get("pending"):
                need = id_key(summary["min"])
            else:
                ms, seq = id_key(g["last-delivered-id"])
                need = (ms, seq + 1)
            floor = need if floor is None or need < floor else floor
        if floor is not None and floor > (0, 1):
            await r.execute_command("XTRIM", self.stream, "MINID", "~", f"{floor[0]}-{floor[1]}")

    async def close(self) -> None:
        await self.redis.aclose()


class RedisStreamConsumer:
    def __init__(self, bus: RedisStreamBus, name: str) -> None:
        self.bus = bus
        self.name = name
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._next_trim = time.monotonic() + TRIM_EVERY
        self._per_entry = 0.0  # events per entry lately: how many entries make a fetch

    def _entries_for(self, max_messages: int) -> int:
        if self._per_entry <= 0:
            return 1  # the first read learns the entries' size
        return max(1, int(max_messages / self._per_entry))

    def _learn(self, entries: int, events: int) -> None:
        if entries:
            per = events / entries
            self._per_entry = per if self._per_entry <= 0 else 0.7 * self._per_entry + 0.3 * per

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """About ``max_messages`` events: whole entries, so a fetch may
        return up to one entry more."""
        b = self.bus
        r = b.redis
        now = time.monotonic()
        try:
            out: list[Delivery] = []
            if now >= self._next_claim:
                out = await self._claim(max_messages, now)
            if not out:
                res = await r.xreadgroup(
                    b.group,
                    self.name,
                    {b.stream: ">"},
                    count=self._entries_for(max_messages),
                    block=max(1, int(timeout * 1000)),
                )
                t = time.monotonic()
                n = 0
                for _stream, entries in res or ():
                    n += len(entries)
                    for entry_id, fields in entries:
                        out.extend(deliveries_of(entry_id, fields, 1, t))
                self._learn(n, len(out))
            if now >= self._next_trim:
                self._next_trim = now + TRIM_EVERY
                await b.trim()
            return out
        except ResponseError as e:
            try:
                if await b.group_lost(e):
                    self._claim_cursor = "0-0"
                    return []
            except (RedisError, OSError) as again:
                raise BusError(short(again)) from again
            raise BusError(short(e)) from e
        except (RedisError, OSError) as e:
            raise BusError(short(e)) from e

    async def _claim(self, max_messages: int, now: float) -> list[Delivery]:
        b = self.bus
        r = b.redis
        n = self._entries_for(max_messages)
        res = await r.xautoclaim(
            b.stream, b.group, self.name, b.claim_idle_ms, self._claim_cursor, count=n
        )
        cursor, entries = res[0], res[1]
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        if self._claim_cursor == "0-0":
            # a full pass: look again once entries can have become idle
            self._next_claim = now + min(5.0, b.claim_idle_ms / 2000)
        entries = [(i, f) for i, f in entries if f]  # trimmed entries come back empty
        if not entries:
            return []
        counts = {
            p["message_id"]: int(p["times_delivered"])
            for p in await r.xpending_range(
                b.stream, b.group, min=entries[0][0], max=entries[-1][0], count=len(entries) * 2
            )
        }
        t = time.monotonic()
        out: list[Delivery] = []
        for i, f in entries:
            out.extend(deliveries_of(i, f, counts.get(i, 2), t))
        self._learn(len(entries), len(out))
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        done: list[bytes] = []
        for d in deliveries:
            h = d.handle
            if not isinstance(h, BatchEntry):
                done.append(h)
            elif h.settle():
                done.append(h.entry_id)
        if not done:
            return
        b = self.bus
        try:
            await b.redis.xack(b.stream, b.group, *done)
        except (RedisError, OSError) as e:
            raise BusError(short(e)) from e

    async def retry(self, delivery: Delivery, error: str) -> None:
        """Left pending: claimed again once idle for ``MQ_CLAIM_IDLE`` (a
        batch entry with it, whole)."""
        h = delivery.handle
        if isinstance(h, BatchEntry):
            h.redeliver = True
            h.settle()

    async def park(self, delivery: Delivery, error: str) -> None:
        b = self.bus
        h = delivery.handle
        fields = fields_of(delivery.message, b.topic)
        fields.update(
            {
                "error": error[:1000],
                "deliveries": delivery.deliveries,
                "group": b.group,
                "entryId": entry_id_of(h),
            }
        )
        ack = h.settle() if isinstance(h, BatchEntry) else True
        try:
            async with b.redis.pipeline(transaction=True) as p:
                p.xadd(b.dlq, fields)
                if ack:
                    p.xack(b.stream, b.group, entry_id_of(h))
                await p.execute()
        except (RedisError, OSError) as e:
            if isinstance(h, BatchEntry):
                h.left += 1  # not settled after all
            raise BusError(short(e)) from e

    def interrupt(self) -> None:
        """A read blocks on the server: it ends at its timeout."""

    async def close(self) -> None:
        """Unsettled entries stay pending; another consumer claims them."""
        return None
