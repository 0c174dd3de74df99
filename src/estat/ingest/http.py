"""A lean HTTP/1.1 server on uvloop with httptools (llhttp) doing the parsing.

Why not an ASGI server: the ingest hot path is "parse a small request, hand
one line to the event queue, answer 200". A generic ASGI stack spends more
per request on its own machinery than that whole path costs, and its no-op
ceiling measured here is below the target (``docs/benchmarks.md``). This
module is the HTTP/1.1 part only; routes are small objects (``Route``).

What it implements, because clients and proxies rely on it: keep-alive and
HTTP/1.0 semantics (``Connection``), pipelining (requests are handled and
answered in order: every handler answers synchronously), chunked request
bodies, ``Expect: 100-continue``, limits on the request head (414/431) and
on bodies (413, checked from ``Content-Length`` before reading and while
streaming), deadlines for the request head, the body and idle keep-alive
connections (408 or a quiet close), write backpressure (a client that does
not read its answers stops being read), and a drain that lets requests in
progress finish and closes idle connections.

Handlers run on the event loop and must not block; each calls
``respond`` exactly once.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from typing import Protocol, cast

import httptools

from estat.errors import Overloaded
from estat.ops.logging import get_logger
from estat.ops.metrics import FastHistogram, Metrics, Tally

log = get_logger("estat.http")

_REASONS = {
    100: "Continue",
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_STATUS_LINES = {s: f"HTTP/1.1 {s} {r}\r\n".encode() for s, r in _REASONS.items()}
_CONN_KEEP = b"connection: keep-alive\r\n"
_CONN_CLOSE = b"connection: close\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# headers the routes read; everything else is only counted against the limit
_WANTED = {
    b"content-length": "content_length",
    b"user-agent": "user_agent",
    b"cookie": "cookie",
    b"x-forwarded-for": "xff",
    b"cloudfront-viewer-address": "cf_viewer",
    b"expect": "expect",
    b"content-type": "content_type",
    b"content-encoding": "content_encoding",
    b"origin": "origin",
    b"access-control-request-headers": "acr_headers",
    b"authorization": "authorization",
    b"x-anonymous-id": "anonymous_id",
}


class Route(Protocol):
    """One path. ``handle`` reads the request from the connection and calls
    ``respond`` exactly once; it may raise ``Overloaded`` (answered 503 with
    ``Retry-After`` and ``unavailable_body``)."""

    name: str
    max_body: int
    unavailable_body: bytes
    unavailable_headers: bytes

    def handle(self, c: HttpConnection) -> None: ...


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_head: int = 16384
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 75.0


class _Stats:
    """Hot-path tallies of the listener (see ``estat.ops.metrics``)."""

    def __init__(self, m: Metrics) -> None:
        self.m = m
        self.requests: Tally = m.tally(m.http_requests)
        self.too_large: Tally = m.tally(m.http_too_large)
        self.queue_full: Tally = m.tally(m.http_queue_full)
        self.responses: dict[tuple[str, int], int] = {}
        self._flushed: dict[tuple[str, int], int] = {}
        self.latency: dict[str, FastHistogram] = {}
        m.add_flusher(self.flush)

    def hist(self, route: str) -> FastHistogram:
        h = self.latency.get(route)
        if h is None:
            h = self.latency[route] = self.m.fast_histogram(self.m.http_duration.labels(route))
        return h

    def flush(self) -> None:
        for key, n in self.responses.items():
            delta = n - self._flushed.get(key, 0)
            if delta:
                self.m.http_responses.labels(key[0], str(key[1])).inc(delta)
                self._flushed[key] = n


class HttpServer:
    def __init__(
        self,
        routes: Mapping[bytes, Route],
        *,
        limits: HttpLimits,
        metrics: Metrics,
        log_sample: Callable[[], bool] = lambda: True,
    ) -> None:
        self.routes = dict(routes)
        self.limits = limits
        self.stats = _Stats(metrics)
        self.metrics = metrics
        self.log_sample = log_sample
        self.connections: set[HttpConnection] = set()
        self.draining = False
        self.now = time.monotonic()
        self.date_line = b""
        self._server: asyncio.base_events.Server | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._update_date()
        metrics.add_flusher(lambda: metrics.http_connections.set(len(self.connections)))

    # -- lifecycle -----------------------------------------------------------
    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpConnection(self),
            host=host,
            port=port,
            reuse_port=reuse_port,
            backlog=2048,
        )
        self._tick()
        sock = self._server.sockets[0]
        addr = sock.getsockname()
        return str(addr[0]), int(addr[1])

    def _update_date(self) -> None:
        self.date_line = b"date: " + formatdate(usegmt=True).encode() + b"\r\nserver: estat\r\n"

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        self.now = loop.time()
        self._update_date()
        now = self.now
        for c in [c for c in self.connections if c.deadline <= now]:
            c.on_deadline()
        self._tick_handle = loop.call_at(now + 1.0, self._tick)

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, grace: float) -> None:
        """Stop reading new requests: close idle connections now, busy ones
        after their answer; abort what is still open after ``grace`` seconds."""
        self.draining = True
        await self.stop_accepting()
        for c in list(self.connections):
            if not c.in_request:
                c.close()
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for c in list(self.connections):
            c.abort()
        if self._tick_handle is not None:
            self._tick_handle.cancel()


class HttpConnection(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_body_size",
        "_head_size",
        "_started",
        "acr_headers",
        "authorization",
        "anonymous_id",
        "cf_viewer",
        "closing",
        "content_encoding",
        "content_length",
        "content_type",
        "cookie",
        "deadline",
        "expect",
        "in_request",
        "keep_alive",
        "method",
        "origin",
        "parser",
        "path",
        "peer",
        "query",
        "route",
        "server",
        "transport",
        "url",
        "user_agent",
        "xff",
    )

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.closing = False
        self.in_request = False
        self.deadline = server.now + server.limits.keepalive_timeout
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self._head_size = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self.content_length: bytes | None = None
        self.user_agent: bytes | None = None
        self.cookie: bytes | None = None
        self.xff: bytes | None = None
        self.cf_viewer: bytes | None = None
        self.expect: bytes | None = None
        self.content_type: bytes | None = None
        self.content_encoding: bytes | None = None
        self.origin: bytes | None = None
        self.acr_headers: bytes | None = None
        self.authorization: bytes | None = None
        self.anonymous_id: bytes | None = None
        self.route: Route | None = None
        self.method = b""
        self.path = b""
        self.query = b""
        self.keep_alive = True

    # -- asyncio.Protocol ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        if self.peer.startswith("::ffff:"):
            self.peer = self.peer[7:]
        self.server.connections.add(self)
        if self.server.draining:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol upgrades here; the request itself was answered.
            if not self.closing:
                self.close()
        except httptools.HttpParserError:
            if not self.closing:
                self.respond(400, b'{"code":"BAD_REQUEST","message":"malformed HTTP request"}',
                             b"content-type: application/json\r\n", close=True)

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    # -- httptools callbacks ---------------------------------------------------
    def on_message_begin(self) -> None:
        self._reset()
        self.in_request = True
        self.deadline = self.server.now + self.server.limits.header_timeout
        self._started = time.perf_counter()

    def on_url(self, url: bytes) -> None:
        if self.closing:
            return
        self.url += url
        self._head_size += len(url)
        if self._head_size > self.server.limits.max_head:
            self._abort_request(414, "URI_TOO_LONG", "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.closing:
            return
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.server.limits.max_head:
            self._abort_request(431, "HEADERS_TOO_LARGE", "request headers too large")
            return
        attr = _WANTED.get(name.lower())
        if attr is not None:
            setattr(self, attr, value)

    def on_headers_complete(self) -> None:
        if self.closing:
            return
        parser = self.parser
        self.method = parser.get_method()
        self.keep_alive = parser.should_keep_alive()
        path, _, self.query = self.url.partition(b"?")
        self.path = path
        route = self.route = self.server.routes.get(path)
        limit = route.max_body if route is not None else 0
        if self.content_length is not None:
            try:
                length = int(self.content_length)
            except ValueError:
                length = -1
            if length > limit and route is not None:
                self.too_large()
                return
        if self.expect is not None and self.expect.lower() == b"100-continue" and self.transport:
            self.transport.write(_CONTINUE)
        self.deadline = self.server.now + self.server.limits.body_timeout

    def on_body(self, body: bytes) -> None:
        if self.closing:
            return
        self._body_size += len(body)
        route = self.route
        if route is None:
            return  # discarded; answered 404 at the end
        if self._body_size > route.max_body:
            self.too_large()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.closing:
            return
        route = self.route
        if route is None:
            self.respond(404, b'{"code":"NOT_FOUND","message":"no such route"}',
                         b"content-type: application/json\r\n")
            return
        try:
            route.handle(self)
        except Overloaded as e:
            # the one place backpressure becomes 503 + Retry-After
            self.server.stats.queue_full.n += 1
            if self.server.log_sample():
                log.warning("queue full (drop)", route=route.name, reason=e.reason)
            self.respond(
                503,
                route.unavailable_body,
                b"retry-after: %d\r\n" % e.retry_after + route.unavailable_headers,
            )
        except Exception:
            log.exception("handler failed", route=route.name)
            self.respond(500, b'{"code":"INTERNAL","message":"internal error"}',
                         b"content-type: application/json\r\n", close=True)

    # -- request accessors -----------------------------------------------------
    def body(self) -> bytes:
        parts = self._body
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    # -- answers ---------------------------------------------------------------
    def respond(
        self, status: int, body: bytes = b"", headers: bytes = b"", *, close: bool = False
    ) -> None:
        t = self.transport
        if t is None or self.closing:
            return
        server = self.server
        stats = server.stats
        stats.requests.n += 1
        route = self.route
        name = route.name if route is not None else "other"
        key = (name, status)
        stats.responses[key] = stats.responses.get(key, 0) + 1
        stats.hist(name).observe(time.perf_counter() - self._started)
        keep = self.keep_alive and not close and not server.draining
        t.write(
            b"".join(
                (
                    _STATUS_LINES[status],
                    server.date_line,
                    _CONN_KEEP if keep else _CONN_CLOSE,
                    headers,
                    b"content-length: %d\r\n\r\n" % len(body),
                    b"" if self.method == b"HEAD" else body,
                )
            )
        )
        self.in_request = False
        if keep:
            self.deadline = server.now + server.limits.keepalive_timeout
        else:
            self.close()

    def too_large(self) -> None:
        self.server.stats.too_large.n += 1
        self.respond(
            413,
            b'{"code":"BODY_TOO_LARGE","message":"request body too large"}',
            b"content-type: application/json\r\n",
            close=True,
        )

    def _abort_request(self, status: int, code: str, message: str) -> None:
        self.respond(
            status,
            b'{"code":"%s","message":"%s"}' % (code.encode(), message.encode()),
            b"content-type: application/json\r\n",
            close=True,
        )

    def on_deadline(self) -> None:
        if self.in_request and not self.closing:
            self._abort_request(408, "REQUEST_TIMEOUT", "request not received in time")
        else:
            self.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
