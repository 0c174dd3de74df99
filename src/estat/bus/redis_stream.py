"""Redis Streams (``MQ_PROVIDER=redis-stream``).

Stream ``<MQ_PREFIX>:user-activity``, one entry per event with the seed's
producer fields (``messageId``, ``topic``, ``key``, ``occurredAt``,
``payload``, ``header.*``); consumer group ``MQ_CONSUMER_GROUP``. Entries
are acked (XACK) only after the store transaction commits. Entries pending
longer than ``MQ_CLAIM_IDLE`` (a consumer died, or asked for a retry) are
claimed by a live consumer with XAUTOCLAIM. Parked entries go to
``<stream>:dlq`` with their last error, in one MULTI with the XACK.

Trimming removes only entries that every group has acknowledged: the
stream is cut (``XTRIM MINID ~``) below the oldest entry any group still
has pending or has not yet read. (A ``MAXLEN`` cap, as seed 004's producer
used, drops unconsumed entries silently.)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from estat.bus.base import TOPIC, BusError, BusStats, Delivery, Message, short

TRIM_EVERY = 10.0  # seconds between trims, per consumer

#: one call adds a whole batch, one entry per event, atomically: the fields
#: are those of ``_fields``. Measured here: 364,000 entries/s against 61,000
#: for a redis-py pipeline of XADDs (packing each command in Python is the
#: cost); docs/benchmarks.md.
PUBLISH_LUA = """
local topic = ARGV[2]
local items = cjson.decode(ARGV[1])
for i = 1, #items do
  local m = items[i]
  local args = {KEYS[1], '*', 'messageId', m[1], 'topic', topic, 'key', m[2],
                'occurredAt', m[3], 'payload', m[4]}
  local h = m[5]
  for j = 1, #h, 2 do
    args[#args + 1] = 'header.' .. h[j]
    args[#args + 1] = h[j + 1]
  end
  redis.call('XADD', unpack(args))
end
return #items
"""
_encode = msgspec.json.encode


def _fields(m: Message, topic: str) -> dict[str, Any]:
    f: dict[str, Any] = {
        "messageId": m.message_id,
        "topic": topic,
        "key": m.key,
        "occurredAt": m.occurred_at,
        "payload": m.payload,
    }
    for k, v in m.headers.items():
        f["header." + k] = v
    return f


def _message(fields: dict[bytes, bytes]) -> Message:
    headers = {k[7:].decode(): v.decode() for k, v in fields.items() if k.startswith(b"header.")}
    return Message(
        fields.get(b"messageId", b"").decode(),
        fields.get(b"key", b"").decode(),
        fields.get(b"occurredAt", b"").decode(),
        fields.get(b"payload", b""),
        headers,
    )


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


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
    ) -> None:
        self.topic = TOPIC
        self.stream = f"{prefix}:{TOPIC}"
        self.dlq = self.stream + ":dlq"
        self.group = group
        self.claim_idle_ms = int(claim_idle * 1000)
        self.redis: Any = aioredis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30
        )
        self._publish = self.redis.register_script(PUBLISH_LUA)

    async def start(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise BusError(short(e)) from e
        except (RedisError, OSError) as e:
            raise BusError(short(e)) from e

    async def publish(self, messages: Sequence[Message]) -> None:
        """One script call per batch: every message an entry, or none."""
        if not messages:
            return
        batch = _encode(
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
        try:
            await self._publish(keys=[self.stream], args=[batch, self.topic])
        except (RedisError, OSError) as e:
            raise BusError(short(e)) from e

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
                need = _id_key(summary["min"])
            else:
                ms, seq = _id_key(g["last-delivered-id"])
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

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
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
                    count=max_messages,
                    block=max(1, int(timeout * 1000)),
                )
                for _stream, entries in res or ():
                    for entry_id, fields in entries:
                        out.append(Delivery(_message(fields), 1, entry_id, time.monotonic()))
            if now >= self._next_trim:
                self._next_trim = now + TRIM_EVERY
                await b.trim()
            return out
        except (RedisError, OSError) as e:
            raise BusError(short(e)) from e

    async def _claim(self, n: int, now: float) -> list[Delivery]:
        b = self.bus
        r = b.redis
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
        return [Delivery(_message(f), counts.get(i, 2), i, t) for i, f in entries]

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        b = self.bus
        try:
            await b.redis.xack(b.stream, b.group, *[d.handle for d in deliveries])
        except (RedisError, OSError) as e:
            raise BusError(short(e)) from e

    async def retry(self, delivery: Delivery, error: str) -> None:
        """Left pending: claimed again once idle for ``MQ_CLAIM_IDLE``."""
        return None

    async def park(self, delivery: Delivery, error: str) -> None:
        b = self.bus
        fields = _fields(delivery.message, b.topic)
        fields.update(
            {
                "error": error[:1000],
                "deliveries": delivery.deliveries,
                "group": b.group,
                "entryId": delivery.handle,
            }
        )
        try:
            async with b.redis.pipeline(transaction=True) as p:
                p.xadd(b.dlq, fields)
                p.xack(b.stream, b.group, delivery.handle)
                await p.execute()
        except (RedisError, OSError) as e:
            raise BusError(short(e)) from e

    def interrupt(self) -> None:
        """A pull waits on the server: it ends at its timeout."""

    async def close(self) -> None:
        """Unsettled entries stay pending; another consumer claims them."""
        return None
