"""The exception tree.

Who raises what, and who maps it:

- ``ConfigError``: raised by ``estat.settings`` while reading the environment;
  ``estat.cli`` prints its one-line message and exits with status 2.
- ``Overloaded(retry_after)``: raised by the event queue when it is full (by
  events or by bytes). The ingest listener maps it, in exactly one place, to
  ``503`` with ``Retry-After``.
- ``DeliveryError`` and its two subclasses: raised by lake sinks.
  ``RetryableDeliveryError`` (timeouts, connection errors, 5xx, throttling) is
  retried by the uploader with backoff; ``PermanentDeliveryError`` (access
  denied, missing bucket, invalid key) is never retried in a tight loop: the
  batch is held and retried on the slow path so nothing is lost while an
  operator fixes the cause.
"""

from __future__ import annotations


class EstatError(Exception):
    """Base class of every error estat raises on purpose."""


class ConfigError(EstatError):
    """Invalid configuration; the message names every invalid variable, and
    ``problems`` maps each to its one-line explanation."""

    def __init__(self, message: str, problems: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or {}


class Overloaded(EstatError):
    """Backpressure: the pipeline cannot take more right now.

    ``kind`` is the low-cardinality cause: ``queue_full`` (counted in
    ``http_requests_rejected_queue_full_total``), ``draining`` or
    ``lake_unavailable`` (``http_requests_refused_total{reason}``)."""

    def __init__(self, reason: str, retry_after: int = 1, kind: str = "queue_full") -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.kind = kind


class DeliveryError(EstatError):
    """A sink could not store an object."""

    retryable: bool = True

    def __init__(self, message: str, *, error_class: str) -> None:
        super().__init__(message)
        #: low-cardinality classification, safe as a metric label or log field
        self.error_class = error_class


class RetryableDeliveryError(DeliveryError):
    retryable = True


class PermanentDeliveryError(DeliveryError):
    retryable = False
