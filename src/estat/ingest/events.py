"""``POST /api/v1/analytics/events``: named client events with identity,
allowlist and rate limits, into the ``events`` dataset.

Body (JSON, ``Content-Type: application/json`` or ``text/plain`` for
``navigator.sendBeacon``; optionally ``Content-Encoding: gzip``)::

    {"anonymousId"?: str, "events": [{"eventId": str, "eventName": str,
      "eventVersion"?: str, "occurredAt"?: ISO-8601, "properties"?: object}]}

Checks, in order, each answered with ``{"code", "message"}``: the body's
transport (413/415/400), JSON and types (400), then empty batch, batch
limit, identity, rate limit (429), allowlist, and pipeline capacity (503).
A request is accepted whole or not at all.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from time import time
from typing import Any, Protocol

import msgspec

from estat.errors import Overloaded
from estat.ingest.answers import count_overloaded
from estat.ingest.codes import Rejected
from estat.ingest.cors import Cors
from estat.ingest.deferred import Deferred
from estat.ingest.http import HttpConnection
from estat.ingest.identity import InvalidToken, TokenVerifier
from estat.ingest.ip import client_ip
from estat.ingest.ratelimit import Decision, RateLimiter
from estat.ingest.schema import ClientBatch, batch_type
from estat.model import EventRecord
from estat.ops.logging import get_logger
from estat.ops.metrics import Metrics

log = get_logger("estat.events")

_JSON = b"content-type: application/json\r\n"


class Publisher(Protocol):
    """Where accepted events go (the events pipeline; later also the bus).

    ``publish`` takes a whole request's records or none: it raises
    ``Overloaded`` when they do not fit. It never blocks.
    """

    def publish(self, records: list[EventRecord]) -> None: ...

    def shed(self, max_events: int) -> Overloaded | None:
        """Before the body is parsed: an ``Overloaded`` when a request of
        ``max_events`` could not be taken now, so that overload is refused
        for the cost of a 503, not of a parse."""
        ...


class Limits(msgspec.Struct, frozen=True):
    max_batch: int = 50
    max_body: int = 1024 * 1024
    max_decompressed: int = 4 * 1024 * 1024
    max_ratio: int = 100
    max_event_size: int = 32 * 1024
    max_depth: int = 8


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_fromiso = datetime.fromisoformat


class EventsRoute:
    name = "events"
    ingest = True

    def __init__(
        self,
        publisher: Publisher,
        *,
        limits: Limits,
        allowlist: frozenset[str] | None,
        limiter: RateLimiter,
        verifier: TokenVerifier,
        cors: Cors,
        metrics: Metrics,
        clock: Callable[[], float] = time,
    ) -> None:
        self._publisher = publisher
        self.limits = limits
        self.max_body = limits.max_body
        self._allowlist = allowlist
        self._limiter = limiter
        self._verifier = verifier
        self._cors = cors
        self._m = metrics
        self._time = clock
        self._decoder = msgspec.json.Decoder(batch_type(limits.max_depth))
        self._encoder = msgspec.json.Encoder()
        self.unavailable_body = b'{"code":"ANALYTICS_INGEST_UNAVAILABLE","message":"the pipeline cannot accept events now; retry later"}'
        self.unavailable_headers = _JSON + cors.headers(None)
        self.too_large_body = (
            b'{"code":"ANALYTICS_INGEST_BODY_TOO_LARGE","message":"request body too large"}'
        )

    # -- entry -------------------------------------------------------------------
    def precheck(self, c: HttpConnection) -> bool:
        """Before ``100 Continue``: answer what the headers alone decide (405,
        415) and close, so the client never sends a body for nothing."""
        if c.method == b"OPTIONS":
            return True
        try:
            self._check_head(c)
        except Rejected as r:
            self._reject(c, self._cors.headers(c.headers.get("origin")), r, close=True)
            return False
        return True

    def handle(self, c: HttpConnection) -> None:
        method = c.method
        if method == b"OPTIONS":
            self._cors.preflight(c)
            return
        cors = self._cors.headers(c.headers.get("origin"))
        shed = self._publisher.shed(self.limits.max_batch)
        if shed is not None:
            count_overloaded(self._m, self.name, shed)
            self._m.analytics_events.labels("rejected", "ANALYTICS_INGEST_UNAVAILABLE").inc()
            c.respond(
                503, self.unavailable_body, _JSON + cors + b"retry-after: %d\r\n" % shed.retry_after
            )
            return
        try:
            self._check_head(c)
            batch, member = self._parse(c)
            key = f"member:{member}" if member is not None else f"anonymous:{batch.anonymousId}"
        except Rejected as r:
            self._reject(c, cors, r)
            return
        if self._limiter.is_async:
            ip, ua = self._client(c)

            async def finish(d: Deferred) -> None:
                decision = await self._limiter.hit_async(key)
                self._finish(d.respond, cors, batch, member, decision, ip, ua)

            c.run_deferred(finish)
            return
        ip, ua = self._client(c)
        self._finish(c.respond, cors, batch, member, self._limiter.hit(key), ip, ua)

    @staticmethod
    def _client(c: HttpConnection) -> tuple[str, str]:
        h = c.headers
        ua = h.get("user-agent")
        return (
            client_ip(h.get("x-forwarded-for"), h.get("cloudfront-viewer-address"), c.peer),
            ua.decode("utf-8", "replace") if ua else "",
        )

    def _reject(self, c: HttpConnection, cors: bytes, r: Rejected, *, close: bool = False) -> None:
        self._m.analytics_events.labels("rejected", r.code).inc()
        if r.status == 413:
            self._m.http_too_large.inc()
        c.respond(r.status, _error_body(r.code, r.message), _JSON + cors + r.headers, close=close)

    # -- synchronous part: transport, JSON, types, batch, identity -----------------
    @staticmethod
    def _check_head(c: HttpConnection) -> None:
        """What the request head alone decides: the method (405), the media
        type and the content coding (415)."""
        if c.method != b"POST":
            raise Rejected(
                "ANALYTICS_INGEST_METHOD_NOT_ALLOWED", "use POST", b"allow: POST, OPTIONS\r\n"
            )
        h = c.headers
        ctype = h.get("content-type")
        if ctype is not None:
            media = ctype.split(b";", 1)[0].strip().lower()
            if media not in (b"application/json", b"text/plain", b""):
                raise Rejected(
                    "ANALYTICS_INGEST_UNSUPPORTED_MEDIA_TYPE",
                    "send application/json or text/plain",
                )
        encoding = h.get("content-encoding")
        if encoding is not None and encoding.strip().lower() not in (b"gzip", b"identity", b""):
            raise Rejected(
                "ANALYTICS_INGEST_UNSUPPORTED_ENCODING",
                "Content-Encoding must be gzip or identity",
            )

    def _parse(self, c: HttpConnection) -> tuple[ClientBatch, str | None]:
        h = c.headers
        batch = self._decode(c)
        member = None
        auth = h.get("authorization")
        if auth is not None:
            try:
                member = self._verifier.member_id(auth)
            except InvalidToken as e:
                raise Rejected(
                    "ANALYTICS_INGEST_INVALID_TOKEN", f"invalid bearer token: {e}"
                ) from None
        if not batch.anonymousId:
            header = h.get("x-anonymous-id")
            batch.anonymousId = header.decode("utf-8", "replace")[:128] if header else None
        if member is None and not batch.anonymousId:
            raise Rejected(
                "ANALYTICS_INGEST_ANONYMOUS_ID_REQUIRED",
                "send anonymousId or X-Anonymous-Id, or a member token",
            )
        return batch, member

    def _decode(self, c: HttpConnection) -> ClientBatch:
        """The body (gunzipped) decoded and typed, with 1 to ``max_batch`` events."""
        body = c.body()
        h = c.headers
        encoding = h.get("content-encoding")
        if encoding is not None and encoding.strip().lower() == b"gzip":
            body = self._gunzip(body)
        try:
            batch = self._decoder.decode(body)
        except UnicodeDecodeError:
            raise Rejected(
                "ANALYTICS_INGEST_INVALID_ENCODING", "the body is not valid UTF-8"
            ) from None
        except msgspec.ValidationError as e:
            raise Rejected("ANALYTICS_INGEST_INVALID_EVENT", str(e)[:200]) from None
        except (msgspec.DecodeError, RecursionError, ValueError):
            raise Rejected(
                "ANALYTICS_INGEST_MALFORMED_JSON", "the body is not valid JSON"
            ) from None
        n = len(batch.events)
        if n == 0:
            raise Rejected("ANALYTICS_INGEST_EMPTY_BATCH", "events is empty")
        if n > self.limits.max_batch:
            raise Rejected(
                "ANALYTICS_INGEST_BATCH_LIMIT_EXCEEDED",
                f"at most {self.limits.max_batch} events per request",
            )
        return batch

    def _gunzip(self, body: bytes) -> bytes:
        lim = self.limits
        cap = min(lim.max_decompressed, max(1, len(body)) * lim.max_ratio)
        d = zlib.decompressobj(wbits=31)
        try:
            out = d.decompress(body, cap + 1)
        except zlib.error:
            raise Rejected(
                "ANALYTICS_INGEST_INVALID_ENCODING", "the gzip body is corrupt"
            ) from None
        if len(out) > cap:
            raise Rejected("ANALYTICS_INGEST_BODY_TOO_LARGE", "the decompressed body is too large")
        if not d.eof:
            raise Rejected("ANALYTICS_INGEST_INVALID_ENCODING", "the gzip body is truncated")
        if d.unused_data:
            raise Rejected(
                "ANALYTICS_INGEST_UNSUPPORTED_ENCODING",
                "one gzip member expected (stacked encodings are not supported)",
            )
        return out

    # -- after the rate limit: allowlist, records, hand-off -------------------------------
    def _finish(
        self,
        respond: Callable[..., None],
        cors: bytes,
        batch: ClientBatch,
        member: str | None,
        decision: Decision,
        ip: str,
        ua: str,
    ) -> None:
        try:
            if not decision.allowed:
                self._m.analytics_rate_limited.inc()
                raise Rejected(
                    "ANALYTICS_INGEST_RATE_LIMIT_EXCEEDED",
                    "too many requests",
                    b"retry-after: %d\r\n" % decision.retry_after,
                )
            records = self._records(batch, member, ip, ua)
            self._publisher.publish(records)
        except Rejected as r:
            self._m.analytics_events.labels("rejected", r.code).inc(len(batch.events))
            respond(r.status, _error_body(r.code, r.message), _JSON + cors + r.headers)
            return
        except Overloaded as e:
            count_overloaded(self._m, self.name, e)
            self._m.analytics_events.labels("rejected", "ANALYTICS_INGEST_UNAVAILABLE").inc(
                len(batch.events)
            )
            respond(
                503, self.unavailable_body, _JSON + cors + b"retry-after: %d\r\n" % e.retry_after
            )
            return
        self._m.analytics_events.labels("accepted", "").inc(len(records))
        self._m.http_accepted.inc()
        respond(200, b'{"acceptedCount":%d}' % len(records), _JSON + cors)

    def _records(
        self, batch: ClientBatch, member: str | None, ip: str, ua: str
    ) -> list[EventRecord]:
        allow = self._allowlist
        if allow is not None:
            bad = [e.eventName for e in batch.events if e.eventName not in allow]
            if bad:
                self._m.analytics_not_allowed.inc()
                raise Rejected(
                    "ANALYTICS_INGEST_EVENT_NOT_ALLOWED", f"event not allowed: {bad[0][:100]}"
                )
        now = datetime.fromtimestamp(self._time(), UTC)
        received = _iso(now)
        anon = batch.anonymousId
        record = self._record
        return [record(e, member, anon, received, "CLIENT", ip, ua) for e in batch.events]

    def _record(
        self,
        e: Any,
        member: str | None,
        anon: str | None,
        received: str,
        source: str,
        ip: str,
        ua: str,
    ) -> EventRecord:
        """One accepted event: defaults filled, properties cleaned and
        encoded once, ``properties.source`` set."""
        occurred = e.occurredAt
        if occurred:
            try:
                when = _fromiso(occurred)
                # already canonical (UTC, milliseconds, Z): keep the text as sent
                if not (len(occurred) == 24 and occurred[23] == "Z" and occurred[19] == "."):
                    occurred = _iso(when if when.tzinfo else when.replace(tzinfo=UTC))
            except (ValueError, OverflowError):
                # not ISO-8601, or no UTC instant (9999-12-31T23:59:59-14:00)
                raise Rejected(
                    "ANALYTICS_INGEST_INVALID_EVENT",
                    f"occurredAt is not an ISO-8601 instant: {e.eventId}",
                ) from None
        else:
            occurred = received
        props = e.properties
        if props is None:
            props = {}
        else:
            if None in props.values():
                props = {k: v for k, v in props.items() if v is not None}
            if "" in props or any(map(str.isspace, props)):
                props = {k: v for k, v in props.items() if k.strip()}
        props["source"] = source
        try:
            raw = self._encoder.encode(props)
        except (UnicodeEncodeError, OverflowError, TypeError):
            raise Rejected(
                "ANALYTICS_INGEST_INVALID_EVENT",
                f"properties cannot be stored: {e.eventId}",
            ) from None
        max_size = self.limits.max_event_size
        if len(raw) > max_size:
            raise Rejected(
                "ANALYTICS_INGEST_INVALID_EVENT",
                f"properties larger than {max_size} bytes: {e.eventId}",
            )
        return EventRecord(
            e.eventId,
            e.eventName,
            e.eventVersion or "v1",
            occurred,
            received,
            member,
            anon,
            msgspec.Raw(raw),
            source,
            ip,
            ua,
        )


def _error_body(code: str, message: str) -> bytes:
    return msgspec.json.encode({"code": code, "message": message})
