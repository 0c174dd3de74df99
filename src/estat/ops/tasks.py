"""The supervisor of a process's long-running tasks.

Every long-running task (batchers, upload workers, the DLQ replayer, the
metrics flush loop, and the stages that come later) is started with
``Supervisor.spawn``; nothing else calls ``create_task`` for work that
outlives a request. A task is expected to run until the process stops:
one that raises, or returns or is cancelled before ``stopping()`` was
called, has *failed*. A failure is logged at ERROR with its traceback,
counted in ``stage_failures_total{stage}``, recorded (readiness turns false
and names it) and reported to ``on_failure``, which makes the process drain
and exit non-zero so that the orchestrator restarts it.

Unlike ``asyncio.TaskGroup``, a failure does not cancel the other tasks:
they hold accepted data, and the drain that follows needs them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from estat.ops.logging import get_logger
from estat.ops.metrics import Metrics

log = get_logger("estat.supervisor")


class Supervisor:
    def __init__(self, metrics: Metrics, on_failure: Callable[[str], None]) -> None:
        self._m = metrics
        self._on_failure = on_failure
        self._stopping = False
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.failed: list[str] = []

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks[name] = task
        task.add_done_callback(self._done)
        return task

    def stopping(self) -> None:
        """From now on tasks may finish (the drain ends them)."""
        self._stopping = True

    def stage_of(self, name: str) -> str:
        """``uploader:raw:2`` → ``uploader``: the label is the stage, not the worker."""
        return name.split(":", 1)[0]

    def _done(self, task: asyncio.Task[None]) -> None:
        name = task.get_name()
        if task.cancelled():
            if self._stopping:
                return
            self.fail(name, None, "cancelled")
            return
        exc = task.exception()
        if exc is None:
            if not self._stopping:
                self.fail(name, None, "exited")
            return
        self.fail(name, exc, "raised")

    def fail(self, name: str, exc: BaseException | None, how: str) -> None:
        """Record a stage failure (also for failures found outside a task)."""
        stage = self.stage_of(name)
        self._m.stage_failures.labels(stage).inc()
        if name not in self.failed:
            self.failed.append(name)
        log.error(
            "stage failed: draining and exiting",
            stage=stage,
            task=name,
            how=how,
            error=repr(exc)[:300] if exc is not None else "",
            exc_info=exc,
        )
        self._on_failure(name)
