"""What the admin routes work on (``AdminContext``), how they refuse
(``AdminError``) and how a route names the scope it needs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import Depends, Request

from estat.admin.audit import AuditLog
from estat.admin.auth import Authenticator
from estat.admin.models import client_of
from estat.admin.workers import PauseWatcher
from estat.bus.base import Bus
from estat.circuit import Circuit
from estat.clock import Clock
from estat.ops.metrics import Metrics
from estat.settings.admin import AdminTokenEntry
from estat.store.db import Database
from estat.store.dispatch import DispatchOutbox
from estat.store.outbox import ReplayFilter, SourceOutbox

ADMIN_PREFIX = "/api/v1/admin"

#: (processed, published, failed) of a replay of up to ``limit`` rows
Replayer = Callable[[int, ReplayFilter], Awaitable[tuple[int, int, int]]]


@dataclass
class AdminContext:
    """What the routes work on; ``None`` where this process has no such part."""

    metrics: Metrics
    auth: Authenticator
    ready: Callable[[], Awaitable[tuple[bool, dict[str, object]]]]
    ingest_openapi: bytes
    audit: AuditLog | None = None
    outbox: SourceOutbox | None = None
    replay: Replayer | None = None
    version: str = "0"
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    workers: PauseWatcher | None = None
    running: frozenset[str] = frozenset()
    dlq: DlqOps | None = None
    store_counts: Callable[[], Awaitable[dict[str, Any]]] | None = None
    bus: Bus | None = None
    dispatch: DispatchOps | None = None
    #: the completeness ledger's database and grace (seconds)
    ledger: tuple[Database, float] | None = None


@dataclass
class DispatchOps:
    """The dispatch outbox and the circuits, and this process's
    dispatcher to wake after a replay (when it runs one)."""

    outbox: DispatchOutbox
    circuit: Circuit
    clock: Clock
    targets: tuple[str, ...]
    notify: Callable[[], None] = lambda: None


@dataclass
class DlqOps:
    """The local DLQ, as ``estat dlq`` sees it."""

    totals: Callable[[], Awaitable[tuple[int, int, int, float | None]]]
    files: Callable[[int, int], Awaitable[list[dict[str, Any]]]]
    replay: Callable[[int], Awaitable[dict[str, int]]]


class AdminError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def scope_checker(ctx: AdminContext) -> Callable[[str], Any]:
    """``scope("read")``: a route's dependency that admits a token with that
    scope, or refuses (401 / 403 / 429, counted)."""

    def scope(name: str) -> Any:
        async def check(request: Request) -> AdminTokenEntry:
            entry, denied = ctx.auth.check(
                request.headers.get("authorization"), client_of(request), name
            )
            request.state.token_name = entry.name if entry is not None else None
            if denied is not None:
                ctx.metrics.admin_auth_failures.labels(denied.code).inc()
                raise AdminError(denied.status, denied.code, denied.message, denied.retry_after)
            assert entry is not None
            return entry

        return Depends(check)

    return scope


def doc(name: str) -> dict[str, Any]:
    """The route's scope in the OpenAPI document (``x-scope``)."""
    return {"x-scope": name}
