"""The admin and ops routes (FastAPI): ops routes without a token
(``/health``, ``/ready``, ``/metrics``), the rest behind a bearer token with
a scope (``read``, ``replay``, ``operate``).

Every ``/api/v1/admin`` call, refused ones included, is a row of
``admin_audit_log`` and a count in ``admin_requests_total``. Parameters out
of range get ``400`` with a code (``ADMIN_INVALID_PARAMETER``), never a
silent clamp. The OpenAPI document is generated from these routes
(``/api/v1/admin/openapi.json``), so it cannot drift from them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator
from starlette.routing import Match

from estat.admin.audit import AuditLog
from estat.admin.auth import Authenticator
from estat.admin.workers import PauseWatcher
from estat.bus.base import Bus, BusError
from estat.ops.logging import get_logger
from estat.ops.metrics import CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE, Metrics
from estat.pause import WORKERS
from estat.settings.admin import AdminTokenEntry
from estat.store.outbox import ReplayFilter, SourceOutbox
from estat.store.trace import traces

log = get_logger("estat.admin")

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


class ErrorBody(BaseModel):
    code: str
    message: str


class OutboxSummary(BaseModel):
    pendingCount: int
    failedCount: int
    publishedCount: int
    maxRetryCount: int


class ReplayResult(BaseModel):
    processedCount: int
    successCount: int
    failedCount: int
    dryRun: bool = False


class TraceRow(BaseModel):
    id: int
    messageId: str
    topic: str
    provider: str
    messageKey: str | None
    consumerGroup: str | None
    stage: str
    processingMillis: int | None
    errorMessage: str | None
    createdAt: datetime


class Worker(BaseModel):
    name: str
    paused: bool
    running: bool  # this process runs it
    updatedAt: datetime | None
    updatedBy: str | None


class DlqStats(BaseModel):
    files: int
    events: int
    bytes: int
    oldestAgeSeconds: float | None


class DlqFile(BaseModel):
    name: str
    createdAt: datetime
    events: int
    bytes: int


class DlqReplay(BaseModel):
    replayed: int
    quarantined: int
    failed: int


class Parked(BaseModel):
    id: str
    messageId: str
    key: str
    occurredAt: str
    error: str
    deliveries: int


class Requeued(BaseModel):
    requeuedCount: int


class StoreCounts(BaseModel):
    events: int
    dispatchOutbox: dict[str, dict[str, int]]
    sourceOutbox: dict[str, int]
    busPending: int | None
    busParked: int | None


class AuditRow(BaseModel):
    id: int
    createdAt: datetime
    tokenName: str | None
    client: str
    method: str
    route: str
    parameters: dict[str, Any]
    status: int
    effect: dict[str, Any] | None


_REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "ADMIN_INVALID_PARAMETER"},
    401: {"model": ErrorBody, "description": "ADMIN_TOKEN_REQUIRED, ADMIN_TOKEN_INVALID"},
    403: {"model": ErrorBody, "description": "ADMIN_SCOPE_REQUIRED"},
    429: {"model": ErrorBody, "description": "ADMIN_TOO_MANY_FAILURES"},
    409: {
        "model": ErrorBody,
        "description": "this process lacks the part the route needs: ADMIN_PIPELINE_DISABLED, "
        "ADMIN_BUS_UNAVAILABLE, ADMIN_DLQ_UNAVAILABLE, ADMIN_WORKERS_UNAVAILABLE, "
        "ADMIN_AUDIT_UNAVAILABLE",
    },
    503: {"model": ErrorBody, "description": "ADMIN_BUS_UNAVAILABLE: the bus did not answer"},
}


def _iso(v: Any) -> Any:
    """Only ISO 8601 text is a time here (pydantic would also take a bare
    number as a Unix time, which the document does not promise)."""
    if isinstance(v, str) and not re.match(r"\d{4}-\d{2}-\d{2}", v):
        raise ValueError("expected an ISO 8601 date-time, e.g. 2026-12-01T00:00:00Z")
    return v


IsoTime = Annotated[datetime | None, BeforeValidator(_iso)]


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def _aware(t: datetime | None) -> datetime | None:
    if t is None or t.tzinfo is not None:
        return t
    return t.replace(tzinfo=UTC)


def build_admin_app(ctx: AdminContext) -> FastAPI:
    app = FastAPI(
        title="estat admin API",
        version=ctx.version,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        description="The admin and ops listener of estat (ADMIN_ADDR). Bearer tokens "
        "from ADMIN_TOKENS; each route names the scope it needs (x-scope).",
    )
    app.state.ctx = ctx
    m = ctx.metrics

    def openapi() -> dict[str, Any]:
        """FastAPI's document, without the 422 it adds to every operation:
        invalid parameters are 400 ``ADMIN_INVALID_PARAMETER`` here."""
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes,
            )  # fmt: skip
            for ops in doc.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                doc.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    def scope(name: str) -> Any:
        async def check(request: Request) -> AdminTokenEntry:
            entry, denied = ctx.auth.check(
                request.headers.get("authorization"), _client(request), name
            )
            request.state.token_name = entry.name if entry is not None else None
            if denied is not None:
                m.admin_auth_failures.labels(denied.code).inc()
                raise AdminError(denied.status, denied.code, denied.message, denied.retry_after)
            assert entry is not None
            return entry

        return Depends(check)

    def doc(name: str) -> dict[str, Any]:
        return {"x-scope": name}

    @app.exception_handler(AdminError)
    async def _admin_error(request: Request, exc: AdminError) -> JSONResponse:
        headers = {"retry-after": str(exc.retry_after)} if exc.retry_after else None
        if exc.status == 401:
            headers = {**(headers or {}), "www-authenticate": "Bearer"}
        return JSONResponse(
            {"code": exc.code, "message": exc.message}, status_code=exc.status, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "query")
        return JSONResponse(
            {
                "code": "ADMIN_INVALID_PARAMETER",
                "message": f"{where}: {first.get('msg', 'invalid')}",
            },
            status_code=400,
        )

    @app.middleware("http")
    async def _audit(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        route = _template(app, request)
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            log.exception("admin route failed", route=route)
            response = JSONResponse(
                {"code": "ADMIN_INTERNAL", "message": "internal error"}, status_code=500
            )
        m.admin_requests.labels(route, str(response.status_code)).inc()
        if path.startswith(ADMIN_PREFIX) or path == "/openapi.json":
            token_name = getattr(request.state, "token_name", None)
            effect = getattr(request.state, "effect", None)
            if ctx.audit is not None:
                try:
                    await ctx.audit.write(
                        token_name=token_name,
                        client=_client(request),
                        method=request.method,
                        route=route,
                        parameters=dict(request.query_params),
                        status=response.status_code,
                        effect=effect,
                    )
                except Exception as e:  # the database is down: the log still has it
                    log.error("admin audit row not written", route=route, error=str(e)[:300])
            log.info(
                "admin call",
                token=token_name,
                client=_client(request),
                method=request.method,
                route=route,
                params=dict(request.query_params),
                status=response.status_code,
                effect=effect,
                durationMs=round((time.perf_counter() - started) * 1000, 1),
            )
        return response

    # -- ops routes: no token ------------------------------------------------
    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], responses={503: {"description": "not ready"}})
    async def ready() -> JSONResponse:
        ok, detail = await ctx.ready()
        return JSONResponse({"ready": ok, **detail}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics(request: Request) -> Response:
        om = "application/openmetrics-text" in request.headers.get("accept", "")
        body = m.exposition(openmetrics=om)
        return Response(body, media_type=OPENMETRICS_CONTENT_TYPE if om else CONTENT_TYPE)

    # -- documents -------------------------------------------------------------
    @app.get(
        "/openapi.json", tags=["docs"], response_class=Response, responses=_REFUSALS,
        openapi_extra=doc("read"),
    )  # fmt: skip
    async def ingest_openapi(_: AdminTokenEntry = scope("read")) -> Response:
        """The OpenAPI document of the ingest API."""
        return Response(ctx.ingest_openapi, media_type="application/json")

    @app.get(
        f"{ADMIN_PREFIX}/openapi.json", tags=["docs"], responses=_REFUSALS,
        openapi_extra=doc("read"),
    )  # fmt: skip
    async def admin_openapi(_: AdminTokenEntry = scope("read")) -> dict[str, Any]:
        """This document."""
        return app.openapi()

    # -- seed 004's routes -------------------------------------------------------
    def outbox() -> SourceOutbox:
        if ctx.outbox is None:
            raise AdminError(
                409,
                "ADMIN_PIPELINE_DISABLED",
                "the user-activity pipeline is off (MQ_PROVIDER=none)",
            )
        return ctx.outbox

    @app.get(
        f"{ADMIN_PREFIX}/user-activity/outbox/summary", tags=["user-activity"],
        responses=_REFUSALS, openapi_extra=doc("read"),
    )  # fmt: skip
    async def outbox_summary(_: AdminTokenEntry = scope("read")) -> OutboxSummary:
        """Source outbox rows by status, and the highest retry count."""
        box = outbox()
        counts = await box.db.run(box.counts)
        return OutboxSummary(
            pendingCount=counts.get("PENDING", (0, 0))[0],
            failedCount=counts.get("FAILED", (0, 0))[0],
            publishedCount=counts.get("PUBLISHED", (0, 0))[0],
            maxRetryCount=max((mx for _, mx in counts.values()), default=0),
        )

    @app.post(
        f"{ADMIN_PREFIX}/user-activity/outbox/replay", tags=["user-activity"],
        responses=_REFUSALS, openapi_extra=doc("replay"),
    )  # fmt: skip
    async def outbox_replay(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        dry_run: Annotated[bool, Query(alias="dryRun")] = False,
        event_name: Annotated[
            str | None, Query(alias="eventName", min_length=1, max_length=100)
        ] = None,
        created_from: Annotated[IsoTime, Query(alias="from")] = None,
        created_to: Annotated[IsoTime, Query(alias="to")] = None,
        _: AdminTokenEntry = scope("replay"),
    ) -> ReplayResult:
        """Publish FAILED (parked included) and due PENDING rows now, oldest
        first; ``dryRun`` counts them only. ``from``/``to``: ``created_at``
        range (from inclusive, to exclusive; ISO 8601, UTC when no offset)."""
        box = outbox()
        which = ReplayFilter(event_name, _aware(created_from), _aware(created_to))
        if dry_run:
            now = ctx.now()
            n = await box.db.run(lambda: box.count_replayable(which, now, limit))
            result = ReplayResult(processedCount=n, successCount=0, failedCount=0, dryRun=True)
        else:
            if ctx.replay is None:
                raise AdminError(
                    409, "ADMIN_BUS_UNAVAILABLE", "this process has no bus to publish to"
                )
            processed, ok, failed = await ctx.replay(limit, which)
            result = ReplayResult(processedCount=processed, successCount=ok, failedCount=failed)
        request.state.effect = result.model_dump()
        return result

    @app.get(
        f"{ADMIN_PREFIX}/mq-traces", tags=["user-activity"], responses=_REFUSALS,
        openapi_extra=doc("read"),
    )  # fmt: skip
    async def mq_traces(
        message_id: Annotated[str, Query(alias="messageId", min_length=1, max_length=64)],
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        _: AdminTokenEntry = scope("read"),
    ) -> list[TraceRow]:
        """The message's trace rows (message_queue_trace_log), newest first."""
        box = outbox()
        rows = await box.db.run(lambda: traces(box.db, message_id, limit))
        return [
            TraceRow(
                id=r["id"],
                messageId=r["message_id"],
                topic=r["topic"],
                provider=r["provider"],
                messageKey=r["message_key"],
                consumerGroup=r["consumer_group"],
                stage=r["stage"],
                processingMillis=r["processing_millis"],
                errorMessage=r["error_message"],
                createdAt=_aware(r["created_at"]) or r["created_at"],
            )
            for r in rows
        ]

    # -- workers: pause / resume -------------------------------------------------
    def watcher() -> PauseWatcher:
        if ctx.workers is None:
            raise AdminError(409, "ADMIN_WORKERS_UNAVAILABLE", "no database for the pause state")
        return ctx.workers

    def listing(w: PauseWatcher) -> list[Worker]:
        out = []
        for name in WORKERS:
            at, by = w.updated.get(name, (None, None))
            out.append(
                Worker(
                    name=name,
                    paused=w.pauses.paused(name),
                    running=name in ctx.running,
                    updatedAt=_aware(at),
                    updatedBy=by,
                )
            )
        return out

    @app.get(
        f"{ADMIN_PREFIX}/workers", tags=["workers"], responses=_REFUSALS, openapi_extra=doc("read")
    )
    async def workers(_: AdminTokenEntry = scope("read")) -> list[Worker]:
        """Every worker's pause state (as this process last read it) and
        whether this process runs it."""
        return listing(watcher())

    async def _set_pause(
        request: Request, name: str, paused: bool, token: AdminTokenEntry
    ) -> Worker:
        if name not in WORKERS:
            raise AdminError(404, "ADMIN_UNKNOWN_WORKER", f"workers are {', '.join(WORKERS)}")
        w = watcher()
        await w.write(name, paused, token.name, ctx.now())
        request.state.effect = {"worker": name, "paused": paused}
        return next(x for x in listing(w) if x.name == name)

    @app.post(
        f"{ADMIN_PREFIX}/workers/{{name}}/{{action}}", tags=["workers"],
        responses={**_REFUSALS, 404: {"model": ErrorBody, "description": "ADMIN_UNKNOWN_WORKER"}},
        openapi_extra=doc("operate"),
    )  # fmt: skip
    async def pause_or_resume(
        request: Request,
        name: str,
        action: Literal["pause", "resume"],
        token: AdminTokenEntry = scope("operate"),
    ) -> Worker:
        """Pause a worker in every process (within a few seconds; it
        survives restarts; its backlog waits, nothing is dropped), or resume it."""
        return await _set_pause(request, name, action == "pause", token)

    # -- the local DLQ ---------------------------------------------------------------
    def dlq() -> DlqOps:
        if ctx.dlq is None:
            raise AdminError(
                409, "ADMIN_DLQ_UNAVAILABLE", "this process has no DLQ (no ingest role)"
            )
        return ctx.dlq

    @app.get(f"{ADMIN_PREFIX}/dlq", tags=["dlq"], responses=_REFUSALS, openapi_extra=doc("read"))
    async def dlq_stats(_: AdminTokenEntry = scope("read")) -> DlqStats:
        """Files, events and bytes in the local DLQ, and the oldest file's age."""
        files, events, nbytes, oldest = await dlq().totals()
        age = None if oldest is None else max(0.0, ctx.now().timestamp() - oldest)
        return DlqStats(files=files, events=events, bytes=nbytes, oldestAgeSeconds=age)

    @app.get(
        f"{ADMIN_PREFIX}/dlq/files", tags=["dlq"], responses=_REFUSALS, openapi_extra=doc("read")
    )
    async def dlq_files(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
        _: AdminTokenEntry = scope("read"),
    ) -> list[DlqFile]:
        """DLQ files, oldest first, a page at a time."""
        return [DlqFile(**f) for f in await dlq().files(limit, offset)]

    @app.post(
        f"{ADMIN_PREFIX}/dlq/replay", tags=["dlq"], responses=_REFUSALS,
        openapi_extra=doc("replay"),
    )  # fmt: skip
    async def dlq_replay(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=1000)] = 10,
        _: AdminTokenEntry = scope("replay"),
    ) -> DlqReplay:
        """Upload up to ``limit`` DLQ files to the lake now, oldest first
        (the same as ``estat dlq replay --limit``); stops at the first failure."""
        result = DlqReplay(**await dlq().replay(limit))
        request.state.effect = result.model_dump()
        return result

    # -- the event store ---------------------------------------------------------------
    @app.get(
        f"{ADMIN_PREFIX}/user-activity/store", tags=["user-activity"], responses=_REFUSALS,
        openapi_extra=doc("read"),
    )  # fmt: skip
    async def store_counts(_: AdminTokenEntry = scope("read")) -> StoreCounts:
        """Stored events, outbox rows by status (dispatch: by target too),
        and the bus's pending and parked messages."""
        if ctx.store_counts is None:
            raise AdminError(
                409,
                "ADMIN_PIPELINE_DISABLED",
                "the user-activity pipeline is off (MQ_PROVIDER=none)",
            )
        return StoreCounts(**await ctx.store_counts())

    # -- the bus's parked messages ---------------------------------------------------
    def bus() -> Bus:
        if ctx.bus is None:
            raise AdminError(409, "ADMIN_BUS_UNAVAILABLE", "this process has no bus")
        return ctx.bus

    @app.get(
        f"{ADMIN_PREFIX}/user-activity/parked", tags=["user-activity"], responses=_REFUSALS,
        openapi_extra=doc("read"),
    )  # fmt: skip
    async def parked(
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        _: AdminTokenEntry = scope("read"),
    ) -> list[Parked]:
        """The oldest parked bus messages (given up after MQ_MAX_DELIVERIES), with their last error."""
        try:
            items = await bus().parked(limit)
        except BusError as e:
            raise AdminError(503, "ADMIN_BUS_UNAVAILABLE", str(e)[:300]) from e
        return [
            Parked(
                id=p.id,
                messageId=p.message.message_id,
                key=p.message.key,
                occurredAt=p.message.occurred_at,
                error=p.error,
                deliveries=p.deliveries,
            )
            for p in items
        ]

    @app.post(
        f"{ADMIN_PREFIX}/user-activity/parked/requeue", tags=["user-activity"],
        responses=_REFUSALS, openapi_extra=doc("replay"),
    )  # fmt: skip
    async def requeue(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        _: AdminTokenEntry = scope("replay"),
    ) -> Requeued:
        """Publish the oldest ``limit`` parked messages again (their delivery
        count starts over) once the cause is fixed; the store is idempotent."""
        try:
            b = bus()
            n = await b.requeue([p.id for p in await b.parked(limit)])
        except BusError as e:
            raise AdminError(503, "ADMIN_BUS_UNAVAILABLE", str(e)[:300]) from e
        request.state.effect = {"requeuedCount": n}
        return Requeued(requeuedCount=n)

    # -- the audit log -------------------------------------------------------------
    @app.get(
        f"{ADMIN_PREFIX}/audit", tags=["audit"], responses=_REFUSALS, openapi_extra=doc("read")
    )
    async def audit(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        since: Annotated[IsoTime, Query()] = None,
        _: AdminTokenEntry = scope("read"),
    ) -> list[AuditRow]:
        """Admin calls, newest first (refused ones included)."""
        if ctx.audit is None:
            raise AdminError(409, "ADMIN_AUDIT_UNAVAILABLE", "no database for the audit log")
        rows = await ctx.audit.recent(limit, _aware(since))
        return [
            AuditRow(
                id=r["id"],
                createdAt=_aware(r["created_at"]) or r["created_at"],
                tokenName=r["token_name"],
                client=r["client"],
                method=r["method"],
                route=r["route"],
                parameters=r["parameters"] or {},
                status=r["status"],
                effect=r["effect"],
            )
            for r in rows
        ]

    return app


def _template(app: FastAPI, request: Request) -> str:
    """The route's path template (bounded label values), or ``other``."""
    for r in app.router.routes:
        match, _ = r.matches(request.scope)
        if match == Match.FULL:
            return str(getattr(r, "path", "other"))
    return "other"


__all__ = ["ADMIN_PREFIX", "AdminContext", "AdminError", "build_admin_app"]
