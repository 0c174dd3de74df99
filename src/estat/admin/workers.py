"""The pause state of the workers: a stage that follows
``estat_worker_state`` in every process (a change made through any replica's
admin API reaches the others within ``PAUSE_POLL`` seconds, and survives
restarts), and the writes of the admin API."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime

from estat.activity.common import TRANSIENT_DB
from estat.ops.logging import Outage, get_logger
from estat.ops.metrics import Metrics
from estat.pause import WORKERS, Pauses
from estat.stage import Deadline, Spawn, finish_by
from estat.store.db import Database
from estat.store.workers import read_states, set_state

log = get_logger("estat.admin")

PAUSE_POLL = 2.0


class PauseWatcher:
    name = "pause-watcher"

    def __init__(
        self, db: Database, pauses: Pauses, metrics: Metrics, interval: float = PAUSE_POLL
    ) -> None:
        self.db = db
        self.pauses = pauses
        self._m = metrics
        self.interval = interval
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.updated: dict[str, tuple[datetime | None, str | None]] = {}
        self._outage = Outage(log)  # the stages say theirs

    async def start(self, spawn: Spawn) -> None:
        for w in WORKERS:
            self._m.worker_paused.labels(w).set(0)
        await self.refresh()  # a pause made before this start holds from the first moment
        self._task = spawn(self.name, self._run())

    def close(self) -> None:
        self._closing.set()

    async def join(self, deadline: Deadline) -> int:
        await finish_by(self._task, deadline)
        return 0

    async def _run(self) -> None:
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.interval)
            if not self._closing.is_set():
                await self.refresh()

    async def refresh(self) -> None:
        try:
            states = await self.db.run(lambda: read_states(self.db), on="workers")
        except TRANSIENT_DB as e:
            self._outage.failed(
                "worker pause state not read: keeping the last one", error=str(e)[:300]
            )
            return
        self._outage.recovered("worker pause state read again")
        for w in WORKERS:
            row = states.get(w)
            self.apply(w, bool(row and row["paused"]), row["updated_by"] if row else None)
            if row:
                self.updated[w] = (row["updated_at"], row["updated_by"])

    def apply(self, worker: str, paused: bool, by: str | None) -> None:
        if self.pauses.set(worker, paused):
            log.warning("worker paused" if paused else "worker resumed", worker=worker, by=by)
        self._m.worker_paused.labels(worker).set(1 if paused else 0)

    async def write(self, worker: str, paused: bool, by: str | None, now: datetime) -> None:
        """The admin API's change: to the database (every process follows),
        and at once in this process."""
        await self.db.run(lambda: set_state(self.db, worker, paused, by, now), on="admin")
        self.updated[worker] = (now, by)
        self.apply(worker, paused, by)
