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
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, cast

import httptools

from estat.errors import Overloaded
from estat.ingest.answers import JSON_HDR, count_overloaded
from estat.ingest.deferred import Deferred, queue_answer, run_deferred
from estat.ingest.edges import Abort, expect_continue, refuse_too_large, trailer_received
from estat.ops.logging import get_logger

if TYPE_CHECKING:
    from estat.ingest.route import Route
    from estat.ingest.server import HttpServer, Mount

log = get_logger("estat.http")

# Headers the routes read, by lower-case name; every other header is only
# counted against the size limit. ``_names`` maps each spelling seen on the
# wire to its lower-case name (or "" for headers nobody reads), so the hot
# path does one dict lookup per header instead of lower-casing it.
WANTED_HEADERS = frozenset(
    {
        "content-length",
        "user-agent",
        "cookie",
        "x-forwarded-for",
        "cloudfront-viewer-address",
        "expect",
        "content-type",
        "content-encoding",
        "origin",
        "access-control-request-headers",
        "authorization",
        "x-anonymous-id",
        "host",
        "transfer-encoding",
    }
)
#: RFC 9112 asks for a limit; 100 fields is far above any real client
MAX_HEADER_FIELDS: Final = 100
_NAMES_MAX = 4096
_names: Final[dict[bytes, str]] = {}


def _learn(name: bytes) -> str:
    low = name.decode("latin-1").lower()
    key = low if low in WANTED_HEADERS else ""
    if len(_names) >= _NAMES_MAX:
        _names.clear()
    _names[name] = key
    return key


def http_compiled() -> bool:
    """True when this module runs compiled (mypyc, ``scripts/build_native.py``)."""
    return not __file__.endswith(".py")


_perf: Final = time.perf_counter


class HttpConnection(asyncio.Protocol):
    __slots__ = (
        "_body_size",
        "_fields",
        "_get_method",
        "_head_size",
        "_hosts",
        "_keep_alive",
        "_max_body",
        "_write_paused",
        "answered",
        "body_parts",
        "closing",
        "head_read",
        "headers",
        "in_head",
        "in_request",
        "in_trailer",
        "keep_alive",
        "max_head",
        "method",
        "mount",
        "parser",
        "path",
        "peer",
        "pending",
        "query",
        "reading_paused",
        "route",
        "seen_at",
        "seen_state",
        "server",
        "started",
        "transport",
        "url",
    )

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        # the parser's methods, bound once instead of looked up per request
        self._get_method: Callable[[], bytes] = self.parser.get_method
        self._keep_alive: Callable[[], bool] = self.parser.should_keep_alive
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.closing = False
        self.in_request = False
        self.in_head = False
        self.answered = 0
        self.seen_state: tuple[int, bool, bool] = (0, False, False)
        self.seen_at = server.now
        self.max_head = server.limits.max_head
        self._max_body = 0
        self.started = 0.0
        self.headers: dict[str, bytes] = {}
        self.url = b""
        self._head_size = 0
        self.head_read = 0
        self.body_parts: list[bytes] = []
        self._body_size = 0
        self.mount: Mount = server.unknown
        self.route: Route | None = None
        self.method = b""
        self.path = b""
        self.query = b""
        self.keep_alive = True
        self.pending: deque[Deferred] | None = None
        self.reading_paused = False
        self._write_paused = False
        self.in_trailer = False
        self._fields = 0
        self._hosts = 0

    # -- asyncio.Protocol ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        if self.peer.startswith("::ffff:"):
            self.peer = self.peer[7:]
        if not self.server.admit(self) or self.server.draining:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.forget(self)
        self.transport = None

    def busy(self) -> bool:
        """A request is being read or answered (answers computed later included)."""
        return self.in_request or bool(self.pending)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.in_trailer:
            trailer_received(self, data)
            return
        if self.in_head:
            # Bytes read while a request head is incomplete, counted per read
            # (the read that starts a request is checked when the head ends):
            # a client trickling an endless head is cut off at the limit.
            self.head_read += len(data)
            if self.head_read > self.max_head:
                self.error(431, "HEADERS_TOO_LARGE", "request head too large")
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol upgrades here; the request itself was answered.
            self.close()
        except httptools.HttpParserError:
            # includes the callback error raised by Abort after an answer
            if not self.closing:
                self.error(400, "BAD_REQUEST", "malformed HTTP request")

    def pause_writing(self) -> None:
        # a client that does not read its answers is not read either, and no
        # further request already read is handled (see on_message_complete)
        self._write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    # -- httptools callbacks ---------------------------------------------------
    def on_message_begin(self) -> None:
        self.headers = {}
        self.url = b""
        self._head_size = self.head_read = 0
        self.body_parts = []
        self._body_size = 0
        self._fields = self._hosts = 0
        self.in_trailer = False
        self.in_head = self.in_request = True
        self.started = _perf()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        self._fields += 1
        if not self.in_head:
            # a chunked trailer field: counted, never read (it must not change
            # what the request's headers said)
            if self._head_size + len(self.url) > self.max_head:
                self.error(431, "HEADERS_TOO_LARGE", "request trailers too large")
                raise Abort
            return
        key = _names.get(name)
        if key is None:
            key = _learn(name)
        if key:
            if key == "host":
                self._hosts += 1
            elif key == "transfer-encoding" and key in self.headers:
                value = self.headers[key] + b", " + value  # every coding counts
            self.headers[key] = value

    def on_chunk_header(self) -> None:
        # data follows (on_body clears this), or, after the last chunk, trailers
        self.in_trailer = True
        self.head_read = self._head_size + len(self.url)

    def on_chunk_complete(self) -> None:
        self.in_trailer = False

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.closing:
            raise Abort  # an earlier pipelined answer closed the connection
        url = self.url
        if self._head_size + len(url) > self.max_head or self._fields > MAX_HEADER_FIELDS:
            if len(url) > self.max_head:
                self.error(414, "URI_TOO_LONG", "request target too long")
            else:
                self.error(431, "HEADERS_TOO_LARGE", "request head too large")
            raise Abort
        self.method = self._get_method()
        self.keep_alive = self._keep_alive()
        headers = self.headers
        if self._hosts > 1 or (self._hosts == 0 and self.parser.get_http_version() == "1.1"):
            self.error(400, "BAD_REQUEST", "an HTTP/1.1 request needs exactly one Host")
            raise Abort
        te = headers.get("transfer-encoding")
        if te is not None:
            if te.strip().lower() != b"chunked":
                self.error(501, "NOT_IMPLEMENTED", "only the chunked transfer coding is supported")
                raise Abort
            if self.parser.get_http_version() == "1.0":
                self.keep_alive = False  # RFC 9112 6.1: faulty framing, close after it
        self.path, _, self.query = url.partition(b"?")
        mount = self.server.mounts.get(self.path)
        if mount is None:
            self.mount = self.server.unknown
            self.route = None
            self.error(404, "NOT_FOUND", "no such route", close=True)
            raise Abort
        self.mount = mount
        route = self.route = mount.route
        assert route is not None
        self._max_body = route.max_body
        length = headers.get("content-length")
        # llhttp has already rejected a malformed or conflicting length; a
        # length with fewer digits than the limit needs no parsing
        if (
            length is not None
            and len(length) >= mount.max_body_digits
            and int(length) > self._max_body
        ):
            self.too_large()
            raise Abort
        expect = headers.get("expect")
        if expect is not None and expect.lower() == b"100-continue":
            expect_continue(self, route)

    def on_body(self, body: bytes) -> None:
        self.in_trailer = False
        self._body_size += len(body)
        if self._body_size > self._max_body:
            self.too_large()
            raise Abort
        self.body_parts.append(body)

    def on_message_complete(self) -> None:
        route = self.route
        assert route is not None
        self.in_trailer = False
        if self.closing:
            raise Abort  # never handle a request that cannot be answered
        if self._write_paused:
            # The client does not read its answers: handle nothing more that
            # it pipelined (a request not handled was not stored, so its retry
            # is not a duplicate); flush what was answered and close.
            self.in_request = False
            self.close()
            raise Abort
        try:
            handle = self.mount.handle
            assert handle is not None
            handle(self)
        except Overloaded as e:
            # the one place backpressure becomes 503 + Retry-After
            count_overloaded(self.server.metrics, route.name, e)
            if self.server.log_sample():
                log.warning("queue full (drop)", route=route.name, reason=e.reason)
            self.respond(
                503,
                route.unavailable_body,
                b"retry-after: %d\r\n" % e.retry_after + route.unavailable_headers,
            )
        except Exception:
            log.exception("handler failed", route=route.name)
            self.error(500, "INTERNAL", "internal error", close=True)

    # -- request accessors -----------------------------------------------------
    def body(self) -> bytes:
        """The request body (the chunks read, joined only when there are several)."""
        parts = self.body_parts
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- answers ---------------------------------------------------------------
    def respond(
        self, status: int, body: bytes = b"", headers: bytes = b"", *, close: bool = False
    ) -> None:
        t = self.transport
        if t is None or self.closing:
            return
        server = self.server
        mount = self.mount
        counts = mount.counts
        counts[status] = counts.get(status, 0) + 1
        mount.latency.observe(_perf() - self.started)
        keep = self.keep_alive and not close and not server.draining
        data = None if body else server.answers.empty.get((status, headers, keep))
        if data is None:
            data = server.answers.render(status, body, headers, keep, self.method)
        self.in_request = False
        if self.pending:  # an earlier request's answer is still being worked on
            queue_answer(self, data, keep)
            return
        t.write(data)
        self.answered += 1
        if not keep:
            self.close()

    # -- answers computed asynchronously (estat.ingest.deferred) ----------------
    def run_deferred(self, work: Callable[[Deferred], Awaitable[None]]) -> None:
        """Answer this request from ``work`` (a coroutine function given a
        ``Deferred``). Answers still leave in request order: later pipelined
        requests wait for this one."""
        run_deferred(self, work)

    def error(self, status: int, code: str, message: str, *, close: bool = True) -> None:
        self.in_head = False
        self.respond(
            status,
            b'{"code":"%s","message":"%s"}' % (code.encode(), message.encode()),
            JSON_HDR,
            close=close,
        )

    def too_large(self) -> None:
        refuse_too_large(self)

    def on_deadline(self) -> None:
        if self.in_request and not self.closing:
            self.error(408, "REQUEST_TIMEOUT", "request not received in time")
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
