"""Answer rendering for the ingest listener: status lines, the per-second
``Date`` header, bodiless answers rendered once per second, and the one place
a 503 is counted by its cause."""

from __future__ import annotations

from email.utils import formatdate
from typing import Final

from estat.errors import Overloaded
from estat.ops.metrics import Metrics

_REASONS = {
    100: "Continue",
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    403: "Forbidden",
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
    501: "Not Implemented",
    503: "Service Unavailable",
}
STATUS_LINES: Final = {s: f"HTTP/1.1 {s} {r}\r\n".encode() for s, r in _REASONS.items()}
CONN_KEEP: Final = b"connection: keep-alive\r\n"
CONN_CLOSE: Final = b"connection: close\r\n"
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

JSON_HDR: Final = b"content-type: application/json\r\n"


class Answers:
    """Renders answers; refreshed once a second (``update_date``) by the server."""

    __slots__ = ("date_line", "empty")

    def __init__(self) -> None:
        self.date_line = b""
        #: answers without a body, fully rendered for the current second
        self.empty: dict[tuple[int, bytes, bool], bytes] = {}
        self.update_date()

    def update_date(self) -> None:
        self.date_line = b"date: " + formatdate(usegmt=True).encode() + b"\r\nserver: estat\r\n"
        self.empty = {}

    def render(self, status: int, body: bytes, headers: bytes, keep: bool, method: bytes) -> bytes:
        """One answer's bytes. Answers without a body are cached for the current second."""
        if not body:
            ckey = (status, headers, keep)
            data = self.empty.get(ckey)
            if data is None:
                data = b"".join(
                    (
                        STATUS_LINES[status],
                        self.date_line,
                        CONN_KEEP if keep else CONN_CLOSE,
                        headers,
                        b"content-length: 0\r\n\r\n",
                    )
                )
                if len(self.empty) < 64:  # headers may vary (Retry-After ...)
                    self.empty[ckey] = data
            return data
        return b"".join(
            (
                STATUS_LINES[status],
                self.date_line,
                CONN_KEEP if keep else CONN_CLOSE,
                headers,
                b"content-length: %d\r\n\r\n" % len(body),
                b"" if method == b"HEAD" else body,
            )
        )


def count_overloaded(m: Metrics, route: str, e: Overloaded) -> None:
    """Count one 503 by its cause (the seed's queue-full counter keeps its meaning)."""
    if e.kind == "queue_full":
        m.http_queue_full.inc()
    else:
        m.http_refused.labels(route, e.kind).inc()
