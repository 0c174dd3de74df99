"""The lifecycle every stage shares, and the deadline it stops by.

A *stage* is a long-running part of the flow (a dataset's pipeline, the DLQ
replayer, the ingest listener, and the bus, relay and dispatcher that come
later). Its lifecycle, like arroyo's ``ProcessingStrategy``:

1. ``start(spawn)``: begin work. Long-running tasks are started with
   ``spawn`` (the supervisor's), never with a bare ``create_task``. May
   raise (an address in use); then nothing of the stage keeps running.
2. ``close()``: stop taking new work. Never blocks, may be called twice.
   What the stage already holds is kept.
3. ``join(deadline)``: finish what it holds by ``deadline``; what it cannot
   finish is handed on (the DLQ) or, if nothing can take it, counted as
   lost. Returns the number of accepted events lost (0 almost always). It
   returns by the deadline (plus a small, documented margin), whatever the
   stage's dependencies do.

``estat.runtime.Runtime`` starts stages layer by layer and stops them in
reverse, so that a stage is closed only after the stages that feed it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from estat.clock import Clock

#: starts a supervised task (``estat.ops.tasks.Supervisor.spawn``)
Spawn = Callable[[str, Coroutine[Any, Any, None]], "asyncio.Task[None]"]


@dataclass(frozen=True, slots=True)
class Deadline:
    """An instant on ``clock.monotonic()``."""

    at: float
    clock: Clock

    @classmethod
    def after(cls, seconds: float, clock: Clock) -> Deadline:
        return cls(clock.monotonic() + seconds, clock)

    def left(self) -> float:
        return max(0.0, self.at - self.clock.monotonic())


class Stage(Protocol):
    name: str

    async def start(self, spawn: Spawn) -> None: ...

    def close(self) -> None: ...

    async def join(self, deadline: Deadline) -> int: ...


async def finish_by(task: asyncio.Task[None] | None, deadline: Deadline) -> bool:
    """Wait for ``task`` until ``deadline``, then cancel it. True when it
    finished on its own. (``join`` of a stage with one task.)"""
    if task is None:
        return True
    try:
        await asyncio.wait_for(asyncio.shield(task), deadline.left())
        return True
    except TimeoutError:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False


class Wakeup:
    """Poll-or-woken, for a loop that looks for work every ``seconds`` when
    idle and at once when told there is some (``notify``). A notice that
    arrives while the loop is busy is kept: its next ``wait`` returns at
    once. After ``close`` every ``wait`` returns at once."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.closing = False

    def notify(self) -> None:
        self._event.set()

    def close(self) -> None:
        self.closing = True
        self._event.set()

    async def wait(self, seconds: float) -> None:
        if self.closing:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds)
        if not self.closing:
            self._event.clear()
