"""CORS for the ingest routes (``/collect`` and the client event API)."""

from __future__ import annotations

from estat.ingest.http import HttpConnection


class Cors:
    """CORS answers for ingest routes (never credentials)."""

    def __init__(self, origins: frozenset[str] | None, methods: bytes) -> None:
        self.origins = origins
        self.methods = methods

    def headers(self, origin: bytes | None) -> bytes:
        if self.origins is None:
            return b"access-control-allow-origin: *\r\n"
        if origin is not None and origin.decode("latin-1") in self.origins:
            return b"access-control-allow-origin: " + origin + b"\r\nvary: Origin\r\n"
        return b"vary: Origin\r\n"

    def preflight(self, c: HttpConnection) -> None:
        h = c.headers
        allow = h.get("access-control-request-headers") or b"content-type"
        c.respond(
            204,
            b"",
            self.headers(h.get("origin"))
            + b"access-control-allow-methods: "
            + self.methods
            + b"\r\naccess-control-allow-headers: "
            + allow
            + b"\r\naccess-control-max-age: 86400\r\n",
        )
