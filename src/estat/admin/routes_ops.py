"""The operators' routes: pausing workers, the local DLQ, the audit log."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request

from estat.admin.context import (
    ADMIN_PREFIX,
    AdminContext,
    AdminError,
    DlqOps,
    doc,
)
from estat.admin.models import (
    REFUSALS,
    AuditRow,
    CompletenessHour,
    DlqFile,
    DlqReplay,
    DlqStats,
    ErrorBody,
    IsoTime,
    Worker,
    aware,
)
from estat.admin.workers import PauseWatcher
from estat.pause import WORKERS
from estat.settings.admin import AdminTokenEntry
from estat.store.ledger import read as ledger_read


def add_operations_routes(app: FastAPI, ctx: AdminContext, scope: Callable[[str], Any]) -> None:
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
                    updatedAt=aware(at),
                    updatedBy=by,
                )
            )
        return out

    @app.get(
        f"{ADMIN_PREFIX}/workers", tags=["workers"], responses=REFUSALS, openapi_extra=doc("read")
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
        responses={**REFUSALS, 404: {"model": ErrorBody, "description": "ADMIN_UNKNOWN_WORKER"}},
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

    @app.get(f"{ADMIN_PREFIX}/dlq", tags=["dlq"], responses=REFUSALS, openapi_extra=doc("read"))
    async def dlq_stats(_: AdminTokenEntry = scope("read")) -> DlqStats:
        """Files, events and bytes in the local DLQ, and the oldest file's age."""
        files, events, nbytes, oldest = await dlq().totals()
        age = None if oldest is None else max(0.0, ctx.now().timestamp() - oldest)
        return DlqStats(files=files, events=events, bytes=nbytes, oldestAgeSeconds=age)

    @app.get(
        f"{ADMIN_PREFIX}/dlq/files", tags=["dlq"], responses=REFUSALS, openapi_extra=doc("read")
    )
    async def dlq_files(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
        _: AdminTokenEntry = scope("read"),
    ) -> list[DlqFile]:
        """DLQ files, oldest first, a page at a time."""
        return [DlqFile(**f) for f in await dlq().files(limit, offset)]

    @app.post(
        f"{ADMIN_PREFIX}/dlq/replay", tags=["dlq"], responses=REFUSALS,
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

    # -- the completeness ledger ------------------------------------------------------
    @app.get(
        f"{ADMIN_PREFIX}/completeness", tags=["completeness"], responses=REFUSALS,
        openapi_extra=doc("read"),
    )  # fmt: skip
    async def completeness(
        start: Annotated[IsoTime, Query(alias="from")] = None,
        end: Annotated[IsoTime, Query(alias="to")] = None,
        _: AdminTokenEntry = scope("read"),
    ) -> list[CompletenessHour]:
        """Per dataset and partition hour (from inclusive, to exclusive; the
        last 24 hours by default): events accepted, in the lake, stored and
        delivered per destination, and whether the hour is complete."""
        if ctx.ledger is None:
            raise AdminError(409, "ADMIN_LEDGER_UNAVAILABLE", "no database for the ledger")
        db, grace_s = ctx.ledger
        now = ctx.now()
        to = aware(end) or now
        frm = aware(start) or to - timedelta(hours=24)
        hours = await db.run(lambda: ledger_read(db, frm, to), on="admin")
        grace = timedelta(seconds=grace_s)
        out = []
        for h in hours:
            closed = h.closed(now, grace)
            out.append(
                CompletenessHour(
                    dataset=h.dataset,
                    hour=h.hour,
                    accepted=h.accepted,
                    lake=h.lake,
                    stored=h.stages.get("stored", 0),
                    dispatched={
                        k.split(":", 1)[1]: v
                        for k, v in h.stages.items()
                        if k.startswith("dispatched:")
                    },
                    closed=closed,
                    complete=closed and h.lake >= h.accepted,
                    gap=h.gap(now, grace),
                )
            )
        return out

    # -- the audit log -------------------------------------------------------------
    @app.get(f"{ADMIN_PREFIX}/audit", tags=["audit"], responses=REFUSALS, openapi_extra=doc("read"))
    async def audit(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        since: Annotated[IsoTime, Query()] = None,
        _: AdminTokenEntry = scope("read"),
    ) -> list[AuditRow]:
        """Admin calls, newest first (refused ones included)."""
        if ctx.audit is None:
            raise AdminError(409, "ADMIN_AUDIT_UNAVAILABLE", "no database for the audit log")
        rows = await ctx.audit.recent(limit, aware(since))
        return [
            AuditRow(
                id=r["id"],
                createdAt=aware(r["created_at"]) or r["created_at"],
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
