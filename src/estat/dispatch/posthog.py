"""PostHog (``POST {host}/batch/``).

Mapping (seed 004's fields, without its flaws): ``uuid`` is the event id
when it is a UUID, else a UUID v5 derived from it, so every retry and replay
deduplicates in PostHog; ``distinct_id`` is the member id, else the
anonymous id (never the event id, which made each event its own person);
``properties`` carry ``event_id``, ``event_version``, ``occurred_at``,
``source``, the event's properties and ``$lib: "estat"``.

Outcomes (``dispatch/http.py``): 2xx delivered; 429, 5xx, timeouts and
connection errors retried (``Retry-After`` honoured as the minimum); 413
splits the batch in halves down to one event; a 400 (PostHog refuses a
whole batch when one event in it is invalid) is bisected the same way until
the refused events are isolated, which are then rejected with the reason
while the rest are delivered; 401 / 403 are a configuration error
(retried, never parked). Bodies above 64 KB are sent gzip-encoded.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any, Unpack

import msgspec

from estat.dispatch.http import HttpBatchDestination, HttpOptions
from estat.model import EventRecord

#: the namespace of the UUID v5 of an event id that is not a UUID
NAMESPACE = uuid.UUID("6f1a3c3e-5b7e-4c43-9d1f-2f6a5e0b7c11")

_encode = msgspec.json.encode


_HEX32 = re.compile(r"[0-9a-fA-F]{32}")
_DASHED = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def event_uuid(event_id: str) -> str:
    """The event id when it is a UUID (canonical form), else its UUID v5."""
    if _HEX32.fullmatch(event_id):  # the common cases without uuid.UUID (4x faster)
        h = event_id.lower()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    if _DASHED.fullmatch(event_id):
        return event_id.lower()
    try:
        return str(uuid.UUID(event_id))
    except ValueError:
        return str(uuid.uuid5(NAMESPACE, event_id))


class CaptureEvent(msgspec.Struct):
    event: str
    distinct_id: str
    timestamp: str
    uuid: str
    properties: msgspec.Raw


def _properties(e: EventRecord) -> msgspec.Raw:
    """The event's properties with estat's keys after them (a JSON reader
    keeps the last of two equal keys, so estat's win), spliced as bytes:
    the properties are never decoded."""
    ours = _encode(
        {
            "event_id": e.event_id,
            "event_version": e.event_version,
            "occurred_at": e.occurred_at,
            "source": e.source,
            "$lib": "estat",
        }
    )
    raw = bytes(e.properties).strip()
    if len(raw) < 2 or raw[:1] != b"{" or raw[-1:] != b"}" or not raw[1:-1].strip():
        return msgspec.Raw(ours)  # empty (or, impossibly, not an object)
    return msgspec.Raw(raw[:-1] + b"," + ours[1:])


def capture_event(e: EventRecord) -> CaptureEvent:
    return CaptureEvent(
        e.event_name,
        e.member_id or e.anonymous_id or e.event_id,
        e.occurred_at,
        event_uuid(e.event_id),
        _properties(e),
    )


class PostHog(HttpBatchDestination):
    name = "POSTHOG"

    def __init__(self, host: str, api_key: str, **options: Unpack[HttpOptions]) -> None:
        super().__init__(host.rstrip("/") + "/batch/", **options)
        self.api_key = api_key

    def item(self, e: EventRecord) -> CaptureEvent:
        return capture_event(e)

    def body(self, batch: list[Any]) -> bytes:
        return _encode(
            {
                "api_key": self.api_key,
                "batch": batch,
                "sent_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
        )
