"""The admin listener of a process, from its settings and parts."""

from __future__ import annotations

import os
from collections.abc import Callable

from estat.activity_app import Activity
from estat.admin.api import AdminContext, build_admin_app
from estat.admin.audit import AuditLog
from estat.admin.auth import Authenticator
from estat.admin.listener import AdminListener
from estat.clock import Clock
from estat.ops.metrics import Metrics
from estat.settings import Settings
from estat.store.db import Database


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
    )
    return AdminListener(build_admin_app(ctx), addr[0], addr[1])
