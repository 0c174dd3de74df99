"""The contract between the HTTP/1.1 listener and a route."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from estat.ingest.http import HttpConnection


class Route(Protocol):
    """One path. ``handle`` reads the request from the connection and calls
    ``respond`` exactly once; it may raise ``Overloaded`` (answered 503 with
    ``Retry-After`` and ``unavailable_body``). On an ``ingest`` route a 200
    means the request's events were enqueued (``http_requests_accepted_total``).
    """

    name: str
    max_body: int
    ingest: bool
    unavailable_body: bytes
    unavailable_headers: bytes

    def handle(self, c: HttpConnection) -> None: ...
