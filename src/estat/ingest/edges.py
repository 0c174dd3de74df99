"""The HTTP/1.1 edge cases of a request, off the per-request path of
``estat.ingest.http``: chunked trailers, ``Expect: 100-continue`` and the
413 for a body over a route's limit."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httptools

from estat.ingest.answers import CONTINUE, JSON_HDR

if TYPE_CHECKING:
    from estat.ingest.http import HttpConnection
    from estat.ingest.route import Route


class Abort(Exception):
    """Raised from a parser callback after the answer is written: stops parsing."""


def trailer_received(c: HttpConnection, data: bytes) -> None:
    """Bytes after a chunk header: the trailer section, if no chunk data
    follows. Counted against the head limit (431), judged after parsing so
    that a chunk's data is never mistaken for a trailer."""
    c.head_read += len(data)
    try:
        c.parser.feed_data(data)
    except httptools.HttpParserError:
        if not c.closing:
            c.error(400, "BAD_REQUEST", "malformed HTTP request")
        return
    if c.in_trailer and c.head_read > c.max_head and not c.closing:
        c.error(431, "HEADERS_TOO_LARGE", "request trailers too large")


def expect_continue(c: HttpConnection, route: Route) -> None:
    """``100 Continue``: only to an HTTP/1.1 client, only when no earlier
    pipelined answer is still due, and only when an answer that depends on
    the headers alone (405, 415) is not already known."""
    if c.transport is None or c.pending or c.parser.get_http_version() != "1.1":
        return
    precheck = getattr(route, "precheck", None)
    if precheck is not None and not precheck(c):
        raise Abort  # it answered (with close: the body is never read)
    c.transport.write(CONTINUE)


def refuse_too_large(c: HttpConnection) -> None:
    """413: the route's own body when it has one (the event API's JSON), the
    generic one otherwise; counted for ingest routes."""
    route = c.route
    if route is not None and route.ingest:
        c.server.too_large += 1
    body = getattr(route, "too_large_body", None)
    if body is not None:
        c.in_head = False
        c.respond(413, body, JSON_HDR, close=True)
        return
    c.error(413, "BODY_TOO_LARGE", "request body too large", close=True)
