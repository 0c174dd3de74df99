"""Structured logs: one JSON object per line on stdout.

Fields: ``level``, ``time`` (ISO 8601, UTC), ``service``, ``env``, ``msg``,
plus event fields (``durationMs``, ``batchKey``, ``events`` ...). Request
bodies and tokens are never logged, client addresses at info level only
masked (``mask_ip``). ``LOG_PRETTY=true`` renders for humans.
Every ERROR line is also counted (``log_errors_total{reason}``, the reason
being its ``msg``) once a process calls ``count_errors``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

import orjson
import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_ERRORS = ("error", "exception", "critical")

#: called with the reason of every ERROR line (``count_errors``)
_error_counter: Callable[[str], None] | None = None


def count_errors(counter: Callable[[str], None] | None) -> None:
    """Count every ERROR line from now on: ``counter(reason)``, the reason
    being the line's ``msg`` without its ``=value`` parts (bounded)."""
    global _error_counter
    _error_counter = counter


def mask_ip(addr: str) -> str:
    """An address as info-level lines may show it: IPv4 without its last
    byte (``203.0.113.0/24``), IPv6 to its /48; anything else unchanged
    (``testclient``, a socket path)."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr
    if ip.is_loopback:
        return addr
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def reason_of(msg: str) -> str:
    return re.sub(r"=\S*", "", msg)[:100]


def _count(_logger: Any, method: str, event: Any) -> Any:
    counter = _error_counter
    if counter is not None and method in _ERRORS:
        # a library's message may hold anything: its logger names the reason
        library = event.get("logger")
        reason = f"library {library}" if library else reason_of(str(event.get("event", "")))
        # e.g. EMFILE: a new label's file (multiprocess metrics) cannot be
        # opened while descriptors run out; the error being logged is often
        # that very condition, and logging must never raise
        with contextlib.suppress(Exception):
            counter(reason[:100])
    return event


class _Bridge(logging.Handler):
    """Records of libraries that log through the standard library (asyncio's
    "Task exception was never retrieved", uvicorn, SQLAlchemy, nats-py) as
    estat's lines: JSON, one per record (a traceback in its ``exception``
    field), with ``service``, ``env`` and ``logger``, and counted like
    estat's own when they are errors."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            kw: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                kw["exc_info"] = record.exc_info
            structlog.get_logger(record.name).log(record.levelno, record.getMessage()[:2000], **kw)
        except Exception:
            self.handleError(record)


def _dumps(obj: Any, default: Any = None) -> bytes:
    return orjson.dumps(obj, default=default)


def setup_logging(
    level: str = "info", *, pretty: bool = False, service: str = "estat", env: str = "local"
) -> None:
    def identity(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        # a processor, not bound context vars: threads (the database's) have their own context
        event.setdefault("service", service)
        event.setdefault("env", env)
        return event

    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        identity,
        structlog.processors.add_log_level,
        _count,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
        structlog.processors.format_exc_info,
    ]
    if pretty:
        processors.append(structlog.dev.ConsoleRenderer())
        factory: Any = structlog.PrintLoggerFactory(sys.stdout)
    else:
        processors.append(structlog.processors.EventRenamer("msg"))
        processors.append(structlog.processors.JSONRenderer(serializer=_dumps))
        factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, 20)),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard library: from WARNING, as lines
    # of estat's own
    logging.basicConfig(level=logging.WARNING, handlers=[_Bridge()])


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


class Sampler:
    """Lets 1 of every ``n`` calls through; for per-request warnings."""

    __slots__ = ("_i", "n")

    def __init__(self, n: int) -> None:
        self.n = max(1, n)
        self._i = 0

    def __call__(self) -> bool:
        self._i += 1
        if self._i >= self.n:
            self._i = 0
            return True
        return False


class Outage:
    """A dependency's failure said once, until it works again, and its
    return said then: a task retrying every few seconds through an outage
    writes two lines, not one per try (its metrics count every try)."""

    __slots__ = ("down", "log")

    def __init__(self, log: Any) -> None:
        self.log = log
        self.down = False

    def failed(self, msg: str, **kw: Any) -> None:
        if not self.down:
            self.down = True
            self.log.warning(msg, **kw)

    def recovered(self, msg: str, **kw: Any) -> None:
        if self.down:
            self.down = False
            self.log.info(msg, **kw)
