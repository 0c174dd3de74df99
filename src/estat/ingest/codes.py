"""The client event API's error codes, in one registry: each code's status
and meaning. The route raises ``Rejected`` with a code (its status comes
from here), the OpenAPI document lists them from here, and a test keeps
``docs/api.md`` in step."""

from __future__ import annotations

ERROR_CODES = {
    "ANALYTICS_INGEST_EMPTY_BATCH": (400, "events is empty or missing"),
    "ANALYTICS_INGEST_BATCH_LIMIT_EXCEEDED": (400, "more than ANALYTICS_MAX_BATCH_SIZE events"),
    "ANALYTICS_INGEST_ANONYMOUS_ID_REQUIRED": (
        400,
        "no member token and no anonymousId / X-Anonymous-Id",
    ),
    "ANALYTICS_INGEST_EVENT_NOT_ALLOWED": (400, "an event name is not in ANALYTICS_ALLOWLIST"),
    "ANALYTICS_INGEST_INVALID_EVENT": (
        400,
        "wrong types or lengths, bad occurredAt, properties too deep or too large",
    ),
    "ANALYTICS_INGEST_MALFORMED_JSON": (
        400,
        "the body is not JSON (NaN and Infinity are not JSON)",
    ),
    "ANALYTICS_INGEST_INVALID_ENCODING": (
        400,
        "the body is not UTF-8, or the gzip body is corrupt or truncated",
    ),
    "ANALYTICS_INGEST_INVALID_TOKEN": (
        401,
        "the bearer token is malformed, expired, forged or has no sub",
    ),
    "ANALYTICS_INGEST_METHOD_NOT_ALLOWED": (405, "use POST (or OPTIONS for CORS)"),
    "ANALYTICS_INGEST_BODY_TOO_LARGE": (
        413,
        "over ANALYTICS_MAX_BODY_SIZE, or the decompressed size or ratio caps",
    ),
    "ANALYTICS_INGEST_UNSUPPORTED_MEDIA_TYPE": (
        415,
        "Content-Type is not application/json or text/plain",
    ),
    "ANALYTICS_INGEST_UNSUPPORTED_ENCODING": (
        415,
        "Content-Encoding is not gzip or identity, or is stacked",
    ),
    "ANALYTICS_INGEST_RATE_LIMIT_EXCEEDED": (
        429,
        "over the rate limit for this identity; see Retry-After",
    ),
    "SERVER_EVENTS_TOKEN_REQUIRED": (
        401,
        "server events: no Authorization: Bearer service token",
    ),
    "SERVER_EVENTS_TOKEN_INVALID": (
        403,
        "server events: the token is not in SERVER_EVENT_TOKENS (or none is configured)",
    ),
    "SERVER_EVENTS_IDENTITY_REQUIRED": (
        400,
        "server events: an event has neither memberId nor anonymousId",
    ),
    "ANALYTICS_INGEST_UNAVAILABLE": (503, "the pipeline cannot accept events now; see Retry-After"),
}


class Rejected(Exception):
    """A request refused with a registered code; answered as
    ``{"code", "message"}`` with the code's status."""

    def __init__(self, code: str, message: str, headers: bytes = b"") -> None:
        super().__init__(message)
        self.status = ERROR_CODES[code][0]
        self.code = code
        self.message = message
        self.headers = headers
