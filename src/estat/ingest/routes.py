"""The ingest listener's routes: ``/collect``, ``/health``, ``/ready``, ``/metrics``."""

from __future__ import annotations

from collections.abc import Callable
from time import time
from typing import Final

import orjson

from estat.ingest import ip as _ip
from estat.ingest.cors import Cors
from estat.ingest.http import HttpConnection
from estat.ingest.ip import client_ip
from estat.ops.metrics import Metrics

_xff_cache: Final = _ip.forwarded_cache  # bound once: the hot path reads it per request
_dumps: Final = orjson.dumps
_JSON: Final = b"content-type: application/json\r\n"
_CORS: Final = b"access-control-allow-origin: *\r\n"
_ALLOW_COLLECT: Final = b"allow: GET, POST, OPTIONS\r\n"


class CollectRoute:
    """``GET /collect`` (the raw query string is the body), ``POST /collect``
    (the raw body, any content type), ``OPTIONS /collect`` (CORS preflight).

    One accepted request is one lake record:
    ``{"ts", "ip", "user_agent", "cookie", "body"}`` in that order, serialised
    here with orjson (its string escaping is the cheapest measured) and
    handed to the queue as a finished line. Bytes that are not UTF-8
    are replaced with U+FFFD (the record is JSON text).
    """

    name = "collect"
    ingest = True
    unavailable_body = b""
    unavailable_headers = b"access-control-allow-origin: *\r\n"

    def __init__(
        self,
        put: Callable[[bytes], None],
        *,
        max_body: int,
        cors: Cors | None = None,
        clock: Callable[[], float] = time,
        metrics: Metrics | None = None,
    ) -> None:
        self._put = put
        # the route counts its own outcome (a plain int on the hot path,
        # folded into http_requests_accepted_total with the other tallies)
        self.accepted = 0
        self._folded = 0
        self._m = metrics
        if metrics is not None:
            metrics.add_flusher(self._fold)
        self.max_body = max_body
        self._time = clock
        self._cors = cors or Cors(None, b"GET, POST, OPTIONS")
        self._any_origin = self._cors.origins is None

    def _fold(self) -> None:
        delta = self.accepted - self._folded
        if delta and self._m is not None:
            self._m.http_accepted.inc(delta)
            self._folded += delta

    def precheck(self, c: HttpConnection) -> bool:
        """Before ``100 Continue``: a method that gets 405 is answered now."""
        if c.method in (b"POST", b"GET", b"OPTIONS"):
            return True
        c.respond(405, b"", _ALLOW_COLLECT, close=True)
        return False

    def handle(self, c: HttpConnection) -> None:
        method = c.method
        if method == b"POST":
            body = c.body()
        elif method == b"GET":
            body = c.query
            if len(body) > self.max_body:
                c.too_large()
                return
        elif method == b"OPTIONS":
            self._cors.preflight(c)
            return
        else:
            c.respond(405, b"", _ALLOW_COLLECT)
            return
        h = c.headers
        ua = h.get("user-agent")
        cookie = h.get("cookie")
        xff = h.get("x-forwarded-for")
        ip = _xff_cache.get(xff) if xff else None  # fast path for a repeated header
        if ip is None:
            ip = client_ip(xff, h.get("cloudfront-viewer-address"), c.peer)
        self._put(
            _dumps(
                {
                    "ts": int(self._time()),
                    "ip": ip,
                    "user_agent": ua.decode("utf-8", "replace") if ua else "",
                    "cookie": cookie.decode("utf-8", "replace") if cookie else "",
                    "body": body.decode("utf-8", "replace"),
                }
            )
        )
        self.accepted += 1
        c.respond(200, b"", _CORS if self._any_origin else self._cors.headers(h.get("origin")))


def _read_only(c: HttpConnection) -> bool:
    """GET and HEAD pass; anything else is answered 405."""
    if c.method in (b"GET", b"HEAD"):
        return True
    c.respond(405, b"", b"allow: GET, HEAD\r\n")
    return False


class HealthRoute:
    """``/health``: the process is alive and its event loop answers."""

    name = "health"
    ingest = False
    max_body = 0
    unavailable_body = b""
    unavailable_headers = b""

    def handle(self, c: HttpConnection) -> None:
        if not _read_only(c):
            return
        c.respond(200, b'{"status":"ok"}', _JSON)


class ReadyRoute:
    """``/ready``: 200 while the instance should get traffic, 503 otherwise
    (draining, or the pipeline cannot accept). The body says why."""

    name = "ready"
    ingest = False
    max_body = 0
    unavailable_body = b""
    unavailable_headers = b""

    def __init__(self, check: Callable[[], tuple[bool, dict[str, object]]]) -> None:
        self._check = check

    def handle(self, c: HttpConnection) -> None:
        if not _read_only(c):
            return
        ok, detail = self._check()
        c.respond(200 if ok else 503, orjson.dumps({"ready": ok, **detail}), _JSON)
