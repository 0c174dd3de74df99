"""The metrics flush loop as a stage (``estat.stage``)."""

from __future__ import annotations

import asyncio
import contextlib

from estat.ops.metrics import Metrics
from estat.stage import Deadline, Spawn

METRICS_FLUSH_SECONDS = 0.5


class MetricsFlusher:
    """Folds the hot-path tallies into the metrics every half second."""

    name = "metrics-flush"

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._task: asyncio.Task[None] | None = None

    async def start(self, spawn: Spawn) -> None:
        self._task = spawn("metrics-flush", self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(METRICS_FLUSH_SECONDS)
            self._m.flush()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def join(self, deadline: Deadline) -> int:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._m.flush()
        return 0
