"""Runs stages: starts them layer by layer under one supervisor, stops them
in reverse.

Layers are started in order (the pipelines before the listener that feeds
them) and stopped in reverse: every stage of a layer is closed, then joined
concurrently, before the next layer down is closed. Adding a stage (the
relay, the dispatcher) is one more entry in the layers ``app.py`` passes;
it needs no shutdown code of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from estat.clock import Clock
from estat.ops.logging import get_logger
from estat.ops.tasks import Supervisor
from estat.stage import Deadline, Stage

log = get_logger("estat.runtime")

#: how long the stages already started get to stop when a later one fails to start
ABORT_SECONDS = 5.0


class Runtime:
    def __init__(
        self, layers: Sequence[Sequence[Stage]], supervisor: Supervisor, clock: Clock
    ) -> None:
        self.layers = [list(layer) for layer in layers]
        self.supervisor = supervisor
        self._clock = clock
        self._started: list[list[Stage]] = []

    async def start(self) -> None:
        """Start every layer in order; if a stage cannot start, stop those
        that did (nothing is left running) and raise."""
        try:
            for layer in self.layers:
                started: list[Stage] = []
                self._started.append(started)
                for stage in layer:
                    await stage.start(self.supervisor.spawn)
                    started.append(stage)
        except BaseException:
            await self.stop(Deadline.after(ABORT_SECONDS, self._clock))
            raise

    async def stop(self, deadline: Deadline) -> int:
        """Close and join every started stage, last layer first. Returns the
        accepted events lost (each stage counts and logs its own)."""
        self.supervisor.stopping()
        lost = 0
        while self._started:
            layer = self._started.pop()
            for stage in layer:
                stage.close()
            results = await asyncio.gather(
                *(stage.join(deadline) for stage in layer), return_exceptions=True
            )
            for stage, result in zip(layer, results, strict=True):
                if isinstance(result, BaseException):
                    log.error("stage failed to stop", stage=stage.name, error=repr(result)[:300])
                else:
                    lost += result
        return lost
