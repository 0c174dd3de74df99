"""``estat relay`` and ``estat store``: the pipeline's roles without the
ingest listener, and an admin listener when ``ADMIN_ADDR`` is set for the
process (its default port belongs to ``estat serve`` on the same host)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from estat.activity_app import Activity
from estat.admin.build import build_admin
from estat.admin.workers import PauseWatcher
from estat.clock import SystemClock
from estat.ops.flush import MetricsFlusher
from estat.ops.host import HostGauges
from estat.ops.ledger import Ledger
from estat.ops.logging import count_errors, get_logger
from estat.ops.metrics import Metrics
from estat.ops.tasks import Supervisor
from estat.pause import Pauses
from estat.runtime import Runtime
from estat.settings import Settings
from estat.stage import Deadline, Stage
from estat.store.ledger import LedgerFlusher

log = get_logger("estat.app")


class RolesApp:
    """The relay and store roles without the ingest listener."""

    def __init__(self, settings: Settings, roles: Sequence[str]) -> None:
        self.settings = settings
        self.clock = SystemClock()
        self.metrics = Metrics()
        self.pauses = Pauses()
        self.activity = Activity(settings, roles, self.metrics, self.clock, self.pauses)
        self.pause_watcher = PauseWatcher(self.activity.db, self.pauses, self.metrics)
        self.metrics.add_flusher(HostGauges(self.metrics, settings.data_dir).refresh)
        count_errors(lambda reason: self.metrics.log_errors.labels(reason).inc())
        self._stop = asyncio.Event()
        self.supervisor = Supervisor(self.metrics, lambda name: self._stop.set())
        low, middle, high = self.activity.layers()
        self.admin = None
        if "admin_addr" in settings.model_fields_set:
            self.admin = build_admin(
                settings,
                metrics=self.metrics,
                clock=self.clock,
                ready=self._ready,
                activity=self.activity,
                db=self.activity.db,
                workers=self.pause_watcher,
            )
        self.ledger = Ledger(settings.partition_tz)
        self.activity.count_in(self.ledger)
        first: list[Stage] = [
            MetricsFlusher(self.metrics),
            LedgerFlusher(
                self.ledger, self.activity.db, self.metrics, self.clock,
                grace=settings.completeness_grace,
            ),
            self.pause_watcher,
            *low,
        ]  # fmt: skip
        if self.admin is not None:
            first.insert(3, self.admin)
        self.runtime = Runtime([first, middle, high], self.supervisor, self.clock)

    def _ready(self) -> tuple[bool, dict[str, object]]:
        failed = self.supervisor.failed
        hk = self.activity.housekeeper
        detail: dict[str, object] = {
            "roles": list(self.activity.roles),
            "database": hk.database_status,
            "bus": hk.bus_status,
        }
        if self.activity.dispatcher is not None:
            detail["destinations"] = self.activity.destinations()
        if failed:
            detail["failedStages"] = list(failed)
        return not failed, detail

    async def start(self) -> None:
        await self.activity.prepare()
        await self.runtime.start()
        log.info("estat started", roles=",".join(self.activity.roles), pid=os.getpid())

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_for_stop(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> int:
        deadline = Deadline.after(self.settings.shutdown_timeout, self.clock)
        lost = await self.runtime.stop(deadline)
        await self.activity.close()
        self.metrics.flush()
        log.info("shutdown complete", unsavedEvents=lost)
        return lost
