"""A webhook (``WEBHOOK_URL``): ``POST`` of a JSON batch,
``{"batch": [event, ...], "sent_at": "..."}``, each event as estat stores
it (the line of the ``events`` lake dataset: ``event_id`` is the key to
deduplicate on, since a retry or a replay sends an event again).

Signed with ``WEBHOOK_SECRET``: ``X-Estat-Signature: t=<unix seconds>,
v1=<hex HMAC-SHA256 of "<t>.<body>">``, computed over the body as sent
before any gzip encoding. The receiver recomputes it with the shared
secret, compares in constant time, and refuses a ``t`` too far from its
clock (a replayed request). Outcomes as for every HTTP destination
(``dispatch/http.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime
from typing import Any, Unpack

import msgspec

from estat.dispatch.http import HttpBatchDestination, HttpOptions
from estat.model import EventRecord

SIGNATURE_HEADER = "x-estat-signature"

_encode = msgspec.json.encode


def signature(secret: bytes, body: bytes, t: int) -> str:
    mac = hmac.new(secret, str(t).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, now: float, tolerance: float = 300) -> bool:
    """A receiver's check (also what the tests use)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
        given = parts["v1"]
    except (KeyError, ValueError):
        return False
    if abs(now - t) > tolerance:
        return False
    return hmac.compare_digest(signature(secret, body, t), f"t={t},v1={given}")


class Webhook(HttpBatchDestination):
    name = "WEBHOOK"

    def __init__(self, url: str, secret: str, **options: Unpack[HttpOptions]) -> None:
        super().__init__(url, **options)
        self.secret = secret.encode()

    def item(self, e: EventRecord) -> EventRecord:
        return e

    def body(self, batch: list[Any]) -> bytes:
        sent_at = datetime.now(UTC).isoformat(timespec="milliseconds")
        return _encode({"batch": batch, "sent_at": sent_at})

    def sign(self, body: bytes) -> dict[str, str]:
        return {SIGNATURE_HEADER: signature(self.secret, body, int(time.time()))}
