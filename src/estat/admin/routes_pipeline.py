"""Seed 004's routes (outbox summary and replay, MQ traces) and the
pipeline's other views: the event store's counters, the bus's parked
messages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request

from estat.admin.context import (
    ADMIN_PREFIX,
    AdminContext,
    AdminError,
    doc,
)
from estat.admin.models import (
    REFUSALS,
    IsoTime,
    OutboxSummary,
    Parked,
    ReplayResult,
    Requeued,
    StoreCounts,
    TraceRow,
    aware,
)
from estat.bus.base import Bus, BusError
from estat.settings.admin import AdminTokenEntry
from estat.store.outbox import ReplayFilter, SourceOutbox
from estat.store.trace import traces


def add_pipeline_routes(app: FastAPI, ctx: AdminContext, scope: Callable[[str], Any]) -> None:
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
        responses=REFUSALS, openapi_extra=doc("read"),
    )  # fmt: skip
    async def outbox_summary(_: AdminTokenEntry = scope("read")) -> OutboxSummary:
        """Source outbox rows by status, and the highest retry count."""
        box = outbox()
        return OutboxSummary(**await box.db.run(box.summary, on="admin"))

    @app.post(
        f"{ADMIN_PREFIX}/user-activity/outbox/replay", tags=["user-activity"],
        responses=REFUSALS, openapi_extra=doc("replay"),
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
        which = ReplayFilter(event_name, aware(created_from), aware(created_to))
        if dry_run:
            now = ctx.now()
            n = await box.db.run(lambda: box.count_replayable(which, now, limit), on="admin")
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
        f"{ADMIN_PREFIX}/mq-traces", tags=["user-activity"], responses=REFUSALS,
        openapi_extra=doc("read"),
    )  # fmt: skip
    async def mq_traces(
        message_id: Annotated[str, Query(alias="messageId", min_length=1, max_length=64)],
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        _: AdminTokenEntry = scope("read"),
    ) -> list[TraceRow]:
        """The message's trace rows (message_queue_trace_log), newest first."""
        box = outbox()
        rows = await box.db.run(lambda: traces(box.db, message_id, limit), on="admin")
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
                createdAt=aware(r["created_at"]) or r["created_at"],
            )
            for r in rows
        ]

    # -- the event store ---------------------------------------------------------------
    @app.get(
        f"{ADMIN_PREFIX}/user-activity/store", tags=["user-activity"], responses=REFUSALS,
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
        f"{ADMIN_PREFIX}/user-activity/parked", tags=["user-activity"], responses=REFUSALS,
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
        responses=REFUSALS, openapi_extra=doc("replay"),
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
