"""PostHog (``POST {host}/batch/``).

Mapping (seed 004's fields, without its flaws): ``uuid`` is the event id
when it is a UUID, else a UUID v5 derived from it, so every retry and replay
deduplicates in PostHog; ``distinct_id`` is the member id, else the
anonymous id (never the event id, which made each event its own person);
``properties`` carry ``event_id``, ``event_version``, ``occurred_at``,
``source``, the event's properties and ``$lib: "estat"``.

Outcomes: 2xx delivered; 429, 5xx, timeouts and connection errors retried
(``Retry-After`` honoured as the minimum); 413 splits the batch in halves
down to one event; a 400 (PostHog refuses a whole batch when one event in
it is invalid) is bisected the same way until the refused events are
isolated, which are then rejected with the reason while the rest are
delivered; 401 / 403 are a configuration error (retried, never parked).
Bodies above ``gzip_above`` bytes are sent gzip-encoded.
"""

from __future__ import annotations

import gzip
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec

from estat.dispatch.destination import DELIVERED, Outcome, retry_all
from estat.model import EventRecord

#: the namespace of the UUID v5 of an event id that is not a UUID
NAMESPACE = uuid.UUID("6f1a3c3e-5b7e-4c43-9d1f-2f6a5e0b7c11")

_encode = msgspec.json.encode


def event_uuid(event_id: str) -> str:
    try:
        return str(uuid.UUID(event_id))
    except ValueError:
        return str(uuid.uuid5(NAMESPACE, event_id))


def capture_event(e: EventRecord) -> dict[str, Any]:
    props: dict[str, Any] = {}
    try:
        decoded = msgspec.json.decode(e.properties)
        if isinstance(decoded, dict):
            props.update(decoded)
    except msgspec.DecodeError:
        pass
    props.update(
        {
            "event_id": e.event_id,
            "event_version": e.event_version,
            "occurred_at": e.occurred_at,
            "source": e.source,
            "$lib": "estat",
        }
    )
    return {
        "event": e.event_name,
        "distinct_id": e.member_id or e.anonymous_id or e.event_id,
        "timestamp": e.occurred_at,
        "uuid": event_uuid(e.event_id),
        "properties": props,
    }


def _retry_after(resp: httpx.Response) -> float:
    value = resp.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0


class PostHog:
    name = "POSTHOG"

    def __init__(
        self,
        host: str,
        api_key: str,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 3.0,
        gzip_above: int = 64 * 1024,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = host.rstrip("/") + "/batch/"
        self.api_key = api_key
        self.gzip_above = gzip_above
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            headers={"user-agent": "estat"},
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def send(self, events: Sequence[EventRecord]) -> list[Outcome]:
        if not events:
            return []
        return await self._send([capture_event(e) for e in events])

    async def _post(self, batch: list[dict[str, Any]]) -> httpx.Response | str:
        body = _encode(
            {
                "api_key": self.api_key,
                "batch": batch,
                "sent_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
        )
        headers = {"content-type": "application/json"}
        if len(body) > self.gzip_above:
            body = gzip.compress(body, 6)
            headers["content-encoding"] = "gzip"
        try:
            return await self.client.post(self.url, content=body, headers=headers)
        except httpx.TimeoutException as e:
            return f"timeout: {type(e).__name__}"
        except httpx.TransportError as e:
            return f"connection: {type(e).__name__}: {str(e)[:200]}"

    async def _send(self, batch: list[dict[str, Any]]) -> list[Outcome]:
        resp = await self._post(batch)
        if isinstance(resp, str):
            return retry_all(len(batch), resp)
        status = resp.status_code
        if 200 <= status < 300:
            return [DELIVERED] * len(batch)
        reason = f"HTTP {status}: {resp.text[:300]}"
        if status in (401, 403):
            return retry_all(len(batch), reason, config_error=True)
        if status == 429 or status >= 500 or status < 400:
            return retry_all(len(batch), reason, _retry_after(resp))
        # 400, 413 and the other 4xx: the batch is halved until the refused
        # events stand alone; those are rejected, the rest delivered
        if len(batch) == 1:
            return [Outcome("rejected", reason)]
        half = len(batch) // 2
        return await self._send(batch[:half]) + await self._send(batch[half:])
