"""``POST /api/v1/server-events``: events from backend services, with a
member identity, committed to the source outbox before the answer.

``Authorization: Bearer <token>``, checked against ``SERVER_EVENT_TOKENS``
(``name:sha256hex``; only the SHA-256 of a token is configured, compared in
constant time). Body: the client event shape plus ``memberId`` (on the
batch or on an event; the event's wins); each event needs ``memberId`` or
``anonymousId``. ``source`` is ``SERVER``; the allowlist and the per-identity
rate limit apply to browsers, not to services. A 200 means every event is
committed in the source outbox (an ``event_id`` already there counts in
``duplicateCount``); the relay publishes them.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Protocol

import msgspec

from estat.errors import Overloaded
from estat.ingest.answers import count_overloaded
from estat.ingest.codes import Rejected
from estat.ingest.deferred import Deferred
from estat.ingest.events import _JSON, EventsRoute, _error_body, _iso
from estat.ingest.http import HttpConnection
from estat.ingest.schema import batch_type
from estat.model import EventRecord
from estat.ops.logging import get_logger

log = get_logger("estat.server_events")


class OutboxWriter(Protocol):
    async def commit(self, records: list[EventRecord]) -> tuple[int, int]:
        """Commit ``records`` to the source outbox: (inserted, duplicates).
        Raises ``Overloaded`` when the database is unavailable."""
        ...


def token_name(header: bytes | None, tokens: Mapping[str, str]) -> str:
    """The name of the service whose bearer token this is."""
    if header is None:
        raise Rejected("SERVER_EVENTS_TOKEN_REQUIRED", "send Authorization: Bearer <service token>")
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        raise Rejected("SERVER_EVENTS_TOKEN_REQUIRED", "send Authorization: Bearer <service token>")
    digest = hashlib.sha256(token.strip()).hexdigest()
    found = None
    for known, name in tokens.items():  # every entry compared: constant time
        if hmac.compare_digest(known, digest):
            found = name
    if found is None:
        raise Rejected("SERVER_EVENTS_TOKEN_INVALID", "unknown service token")
    return found


class ServerEventsRoute(EventsRoute):
    name = "server_events"

    def __init__(self, writer: OutboxWriter, *, tokens: Mapping[str, str], **kw: object) -> None:
        super().__init__(_NoPublisher(), **kw)  # type: ignore[arg-type]
        self._writer = writer
        self._tokens = dict(tokens)
        self._decoder = msgspec.json.Decoder(batch_type(self.limits.max_depth, server=True))
        self.unavailable_body = b'{"code":"ANALYTICS_INGEST_UNAVAILABLE","message":"the event store is unavailable; retry later"}'

    def precheck(self, c: HttpConnection) -> bool:
        try:
            self._check_head(c)
            token_name(c.headers.get("authorization"), self._tokens)
        except Rejected as r:
            self._reject(c, b"", r, close=True)
            return False
        return True

    def handle(self, c: HttpConnection) -> None:
        try:
            self._check_head(c)
            service = token_name(c.headers.get("authorization"), self._tokens)
            batch = self._decode(c)
            ip, ua = self._client(c)
            records = self._server_records(batch, ip, ua)
        except Rejected as r:
            self._reject(c, b"", r)
            return
        n = len(records)

        async def finish(d: Deferred) -> None:
            try:
                _inserted, duplicates = await self._writer.commit(records)
            except Overloaded as e:
                count_overloaded(self._m, self.name, e)
                self._m.analytics_events.labels("rejected", "ANALYTICS_INGEST_UNAVAILABLE").inc(n)
                d.respond(
                    503, self.unavailable_body, _JSON + b"retry-after: %d\r\n" % e.retry_after
                )
                return
            self._m.analytics_events.labels("accepted", "").inc(n)
            self._m.http_accepted.inc()
            log.debug("server events committed", service=service, events=n, duplicates=duplicates)
            d.respond(
                200,
                b'{"acceptedCount":%d,"duplicateCount":%d}' % (n, duplicates),
                _JSON,
            )

        c.run_deferred(finish)

    def _server_records(self, batch: object, ip: str, ua: str) -> list[EventRecord]:
        received = _iso(datetime.fromtimestamp(self._time(), UTC))
        b_member = getattr(batch, "memberId", None)
        anon = getattr(batch, "anonymousId", None)
        out = []
        for e in batch.events:  # type: ignore[attr-defined]
            m = e.memberId if e.memberId is not None else b_member
            if m is None and not anon:
                raise Rejected(
                    "SERVER_EVENTS_IDENTITY_REQUIRED", f"no memberId or anonymousId: {e.eventId}"
                )
            out.append(
                self._record(e, None if m is None else str(m), anon, received, "SERVER", ip, ua)
            )
        return out


class _NoPublisher:
    def publish(self, records: list[EventRecord]) -> None:
        raise AssertionError("server events go to the outbox")

    def shed(self, max_events: int) -> Overloaded | None:
        return None


__all__ = ["ServerEventsRoute", "_error_body", "token_name"]
