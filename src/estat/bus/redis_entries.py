"""Redis Streams entries in their two formats (``MQ_REDIS_ENTRY``): one
per event with seed 004's fields, or one per batch with the events' JSON
Lines; and the settling of a batch entry's events (``redis_stream.py``)."""

from __future__ import annotations

from typing import Any

import msgspec

from estat.bus.base import Delivery, Message, message_of_line

#: one call adds a batch entry (ARGV 3-4, when given) and an entry per
#: message, atomically: the fields are those of ``fields_of``. Measured here: 364,000 entries/s against 61,000
#: for a redis-py pipeline of XADDs (packing each command in Python is the
#: cost); docs/benchmarks.md.
PUBLISH_LUA = """
local topic = ARGV[2]
if tonumber(ARGV[3]) > 0 then
  redis.call('XADD', KEYS[1], '*', 'topic', topic, 'count', ARGV[3], 'events', ARGV[4])
end
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
encode_json = msgspec.json.encode


def fields_of(m: Message, topic: str) -> dict[str, Any]:
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


def message_from(fields: dict[bytes, bytes]) -> Message:
    headers = {k[7:].decode(): v.decode() for k, v in fields.items() if k.startswith(b"header.")}
    return Message(
        fields.get(b"messageId", b"").decode(),
        fields.get(b"key", b"").decode(),
        fields.get(b"occurredAt", b"").decode(),
        fields.get(b"payload", b""),
        headers,
    )


class BatchEntry:
    """A batch entry being settled: acked once nothing of it is left."""

    __slots__ = ("entry_id", "left", "redeliver")

    def __init__(self, entry_id: bytes, n: int) -> None:
        self.entry_id = entry_id
        self.left = n
        self.redeliver = False

    def settle(self) -> bool:
        """One event settled; True when the entry may now be acked."""
        self.left -= 1
        return self.left == 0 and not self.redeliver


def deliveries_of(
    entry_id: bytes, fields: dict[bytes, bytes], count: int, t: float
) -> list[Delivery]:
    """The events of one entry, either format. A line that is not an event
    is a delivery of its own (id ``<entry id>#<line>``) that the store
    refuses, and parks."""
    lines = fields.get(b"events")
    if lines is None:
        return [Delivery(message_from(fields), count, entry_id, t)]
    parts = lines.split(b"\n")
    entry = BatchEntry(entry_id, len(parts))
    out = []
    for n, line in enumerate(parts):
        m = message_of_line(line)
        if m is None:
            m = Message(f"{entry_id.decode()}#{n}", "", "", line, {})
        out.append(Delivery(m, count, entry, t))
    return out


def entry_id_of(handle: Any) -> bytes:
    return handle.entry_id if isinstance(handle, BatchEntry) else handle


def id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)
