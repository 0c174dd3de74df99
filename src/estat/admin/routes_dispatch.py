"""The dispatch routes: the dispatch outbox by target and status, its
replay, and the circuit breaker of each target (state, manual reset)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request

from estat.admin.context import ADMIN_PREFIX, AdminContext, AdminError, DispatchOps, doc
from estat.admin.models import (
    REFUSALS,
    CircuitView,
    DispatchDiscardResult,
    DispatchReplayResult,
    DispatchTargetSummary,
    IsoTime,
    aware,
)
from estat.circuit import CircuitState
from estat.ops.logging import get_logger
from estat.settings.admin import AdminTokenEntry
from estat.store.circuit import SharedCircuit, circuits

log = get_logger("estat.admin")

Target = Annotated[str, Path(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,29}$")]


def add_dispatch_routes(app: FastAPI, ctx: AdminContext, scope: Callable[[str], Any]) -> None:
    def ops() -> DispatchOps:
        if ctx.dispatch is None:
            raise AdminError(
                409,
                "ADMIN_PIPELINE_DISABLED",
                "the user-activity pipeline is off (MQ_PROVIDER=none)",
            )
        return ctx.dispatch

    @app.get(
        f"{ADMIN_PREFIX}/dispatch/summary", tags=["dispatch"], responses=REFUSALS,
        openapi_extra=doc("read"),
    )  # fmt: skip
    async def dispatch_summary(_: AdminTokenEntry = scope("read")) -> list[DispatchTargetSummary]:
        """Dispatch outbox rows per target by status (PARKED: FAILED with no
        next retry), the highest retry count, the oldest due row."""
        d = ops()
        now = ctx.now()
        rows = await d.outbox.db.run(lambda: d.outbox.summary(now), on="admin")
        for t in d.targets:
            rows.setdefault(t, {"maxRetryCount": 0, "oldestDue": None})
        return [
            DispatchTargetSummary(
                target=t,
                pendingCount=r.get("PENDING", 0),
                failedCount=r.get("FAILED", 0),
                parkedCount=r.get("PARKED", 0),
                dispatchedCount=r.get("DISPATCHED", 0),
                maxRetryCount=r["maxRetryCount"],
                oldestDueAt=r["oldestDue"],
                dispatchedCountEstimated=r.get("estimated", False),
            )
            for t, r in sorted(rows.items())
        ]

    @app.post(
        f"{ADMIN_PREFIX}/dispatch/replay", tags=["dispatch"], responses=REFUSALS,
        openapi_extra=doc("replay"),
    )  # fmt: skip
    async def dispatch_replay(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        target: Annotated[str | None, Query(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,29}$")] = None,
        dry_run: Annotated[bool, Query(alias="dryRun")] = False,
        created_from: Annotated[IsoTime, Query(alias="from")] = None,
        created_to: Annotated[IsoTime, Query(alias="to")] = None,
        after_id: Annotated[int | None, Query(alias="afterId", ge=0, le=2**63 - 1)] = None,
        _: AdminTokenEntry = scope("replay"),
    ) -> DispatchReplayResult:
        """FAILED rows (parked ones and those waiting for their backoff),
        oldest first: due now with their attempts reset, for the dispatchers
        to send; ``dryRun`` counts them only. ``from``/``to``: ``created_at``
        range (from inclusive, to exclusive; ISO 8601, UTC when no offset)."""
        d = ops()
        now = ctx.now()
        tgt = target.upper() if target else None
        n = await d.outbox.db.run(
            lambda: d.outbox.replay(
                limit,
                now,
                target=tgt,
                created_from=aware(created_from),
                created_to=aware(created_to),
                after_id=after_id,
                dry_run=dry_run,
            ),
            on="admin",
        )
        if n.rows and not dry_run:
            d.notify()
        result = DispatchReplayResult(
            replayedCount=n.rows, target=tgt, dryRun=dry_run, lastId=n.last_id
        )
        request.state.effect = result.model_dump()
        return result

    @app.post(
        f"{ADMIN_PREFIX}/dispatch/discard", tags=["dispatch"], responses=REFUSALS,
        openapi_extra=doc("operate"),
    )  # fmt: skip
    async def dispatch_discard(
        request: Request,
        target: Annotated[str, Query(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,29}$")],
        limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
        dry_run: Annotated[bool, Query(alias="dryRun")] = False,
        token: AdminTokenEntry = scope("operate"),
    ) -> DispatchDiscardResult:
        """Delete up to ``limit`` rows still to be sent (PENDING, FAILED,
        parked) of a target no longer in ``DISPATCH_TARGETS``: nothing would
        ever send them. The events stay in the store; DISPATCHED rows are
        left to the retention. ``dryRun`` counts them only. A configured
        target is refused (``409 ADMIN_TARGET_CONFIGURED``)."""
        d = ops()
        name = target.upper()
        if name in d.targets:
            raise AdminError(
                409,
                "ADMIN_TARGET_CONFIGURED",
                f"{name} is in DISPATCH_TARGETS: its rows are being sent; remove it there "
                "(every estat that dispatches) before discarding them",
            )
        n = await d.outbox.db.run(
            lambda: d.outbox.discard(name, limit, dry_run=dry_run), on="admin"
        )
        if n and not dry_run:
            ctx.metrics.dispatch_discarded.labels(name).inc(n)
            log.warning("dispatch rows discarded", target=name, rows=n, by=token.name)
        result = DispatchDiscardResult(discardedCount=n, target=name, dryRun=dry_run)
        request.state.effect = result.model_dump()
        return result

    def view(d: DispatchOps, target: str, s: CircuitState) -> CircuitView:
        return CircuitView(
            target=target, state=s.state, failures=s.failures,
            openForSeconds=d.circuit.current(s),
            retryInSeconds=round(d.circuit.retry_in(s, d.clock.time()), 3),
            configured=target in d.targets,
        )  # fmt: skip

    @app.get(
        f"{ADMIN_PREFIX}/dispatch/circuits", tags=["dispatch"], responses=REFUSALS,
        openapi_extra=doc("read"),
    )  # fmt: skip
    async def dispatch_circuits(_: AdminTokenEntry = scope("read")) -> list[CircuitView]:
        """Each target's circuit breaker, as every dispatcher shares it."""
        d = ops()
        stored = await d.outbox.db.run(lambda: circuits(d.outbox.db), on="admin")
        names = sorted({*d.targets, *stored})
        return [view(d, t, stored.get(t, CircuitState())) for t in names]

    @app.post(
        f"{ADMIN_PREFIX}/dispatch/circuits/{{target}}/reset", tags=["dispatch"],
        responses=REFUSALS, openapi_extra=doc("operate"),
    )  # fmt: skip
    async def dispatch_circuit_reset(
        request: Request, target: Target, _: AdminTokenEntry = scope("operate")
    ) -> CircuitView:
        """Close a target's circuit now (the destination is known to be
        back): every dispatcher sends to it at its next look."""
        d = ops()
        name = target.upper()
        shared = SharedCircuit(d.outbox.db, name, d.circuit, d.clock)
        state = await d.outbox.db.run(shared.reset, on="admin")
        d.notify()
        result = view(d, name, state)
        request.state.effect = {"target": name, "state": state.state}
        return result
