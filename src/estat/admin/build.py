"""The admin listener of a process, from its settings and parts."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, func, select

from estat.activity_app import Activity
from estat.admin.api import build_admin_app
from estat.admin.audit import AuditLog
from estat.admin.auth import Authenticator
from estat.admin.context import AdminContext, DispatchOps, DlqOps
from estat.admin.listener import AdminListener
from estat.admin.workers import PauseWatcher
from estat.bus.base import BusError
from estat.circuit import Circuit
from estat.clock import Clock
from estat.dlq.queue import DeadLetterQueue, Sink
from estat.ops.metrics import Metrics
from estat.settings import Settings
from estat.store.budget import estimated_rows, exact_or_estimated
from estat.store.db import Database
from estat.store.dispatch import DispatchOutbox
from estat.store.dispatch import by_status as dispatch_by_status
from estat.store.dispatch import estimated_by_status as estimated_dispatch
from estat.store.outbox import by_status as source_by_status
from estat.store.outbox import estimated_by_status as estimated_source
from estat.store.schema import (
    user_activity_event,
)


def serves_admin() -> bool:
    """One admin listener per server: the process itself, or worker 0 of
    ``--workers N`` (every answer covers all workers, as ``/metrics`` does)."""
    return os.environ.get("ESTAT_WORKER_INDEX", "0") == "0"


def build_admin(
    settings: Settings,
    *,
    metrics: Metrics,
    clock: Clock,
    ready: Callable[[], tuple[bool, dict[str, object]]],
    activity: Activity | None,
    db: Database | None,
    workers: PauseWatcher | None = None,
    dlq: DlqOps | None = None,
) -> AdminListener | None:
    addr = settings.admin_listen
    if addr is None or not serves_admin():
        return None
    from estat import __version__
    from estat.ingest.openapi import render

    async def detailed_ready() -> tuple[bool, dict[str, object]]:
        return ready()

    ctx = AdminContext(
        metrics=metrics,
        auth=Authenticator(settings.admin_token_entries, clock),
        ready=detailed_ready,
        ingest_openapi=render(),
        audit=AuditLog(db) if db is not None else None,
        outbox=activity.outbox if activity is not None else None,
        replay=activity.replay if activity is not None and activity.bus is not None else None,
        version=__version__,
        workers=workers,
        running=_running(activity),
        dlq=dlq,
        bus=activity.bus if activity is not None else None,
        store_counts=_store_counts(activity) if activity is not None else None,
        dispatch=_dispatch_ops(settings, activity, clock) if activity is not None else None,
        ledger=(db, settings.completeness_grace) if db is not None else None,
    )
    return AdminListener(build_admin_app(ctx), addr[0], addr[1])


def _running(activity: Activity | None) -> frozenset[str]:
    """The workers this process runs (the DLQ replayer runs with ingest)."""
    out = set()
    if activity is None or "ingest" in activity.roles:
        out.add("dlq-replayer")
    if activity is not None:
        if activity.relay is not None:
            out.add("relay")
        if activity.consumer is not None:
            out.add("store")
        if activity.dispatcher is not None:
            out.add("dispatcher")
        out.add("retention")  # the housekeeper of every pipeline process
    return frozenset(out)


def _dispatch_ops(settings: Settings, activity: Activity, clock: Clock) -> DispatchOps:
    s = settings
    d = activity.dispatcher
    return DispatchOps(
        outbox=d.outbox if d is not None else DispatchOutbox(activity.db),
        circuit=Circuit(
            s.dispatch_circuit_failure_threshold,
            s.dispatch_circuit_open_duration,
            max(s.dispatch_circuit_open_duration, s.dispatch_circuit_max_open_duration),
        ),
        clock=clock,
        targets=s.targets,
        notify=d.notify if d is not None else (lambda: None),
    )


def _store_counts(activity: Activity) -> Callable[[], Awaitable[dict[str, Any]]]:
    db = activity.db

    def exact(conn: Connection) -> dict[str, Any]:
        events = conn.execute(select(func.count()).select_from(user_activity_event)).scalar_one()
        return {
            "events": int(events),
            "sourceOutbox": {k: n for k, (n, _) in source_by_status(conn, None).items()},
            "dispatchOutbox": _dispatch_counts(dispatch_by_status(conn, None)),
        }

    def estimated(conn: Connection) -> dict[str, Any]:
        return {
            "events": estimated_rows(conn, user_activity_event.name)[""],
            "sourceOutbox": {k: n for k, (n, _) in estimated_source(conn).items()},
            "dispatchOutbox": _dispatch_counts(estimated_dispatch(conn)),
        }

    def read() -> dict[str, Any]:
        """Exact within SUMMARY_BUDGET; past it (a large PostgreSQL store),
        the rows still to be sent exactly and the rest estimated."""
        out, guessed = exact_or_estimated(db, exact, estimated)
        return {**out, "estimated": guessed}

    async def counts() -> dict[str, Any]:
        out = await db.run(read, on="admin")
        pending = parked = None
        if activity.bus is not None:
            try:
                stats = await activity.bus.stats()
                pending, parked = stats.pending, stats.parked
            except BusError:
                pass
        return {**out, "busPending": pending, "busParked": parked}

    return counts


def _dispatch_counts(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """target → status → rows (PARKED counted as FAILED, as stored)."""
    out: dict[str, dict[str, int]] = {}
    for target, row in rows.items():
        counts = {k: int(row[k]) for k in ("PENDING", "FAILED", "DISPATCHED") if row.get(k)}
        if row.get("PARKED"):
            counts["FAILED"] = counts.get("FAILED", 0) + int(row["PARKED"])
        out[target] = counts
    return out


def dlq_ops(dlq: DeadLetterQueue, sink: Sink) -> DlqOps:
    """The admin API's view of a process's DLQ (the ``estat dlq`` operations)."""
    store = dlq.store

    async def totals() -> tuple[int, int, int, float | None]:
        return await asyncio.to_thread(store.totals)

    async def files(limit: int, offset: int) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            return [
                {
                    "name": e.name,
                    "createdAt": datetime.fromtimestamp(e.created, UTC),
                    "events": e.events,
                    "bytes": e.nbytes,
                }
                for e in itertools.islice(store.ordered(), offset, offset + limit)
            ]

        return await asyncio.to_thread(read)

    async def replay(limit: int) -> dict[str, int]:
        done = {"replayed": 0, "quarantined": 0, "failed": 0}
        while done["replayed"] + done["quarantined"] < limit:
            result = await dlq.replay_one(sink)
            if result == "ok":
                done["replayed"] += 1
            elif result == "quarantined":
                done["quarantined"] += 1
            elif result == "failed":
                done["failed"] += 1
                break
            elif result == "empty":
                break
        return done

    return DlqOps(totals, files, replay)
