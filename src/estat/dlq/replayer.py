"""The background replayer: empties the DLQ while the lake is healthy.

It replays one file after another, yielding to live uploads (it waits while
the upload queue has batches). It follows the lake's circuit (``Lake``):
while the lake is marked failing it replays nothing, except that a replay
may serve as the circuit's probe when one is due (so a DLQ drains after an
outage even when no new events arrive). After a failed upload it backs off,
doubling from 0.5 s up to ``MAX_BACKOFF`` (10 s); it resumes at once when a
live upload succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from estat.clock import Clock, SystemClock
from estat.dlq.queue import DeadLetterQueue, Sink
from estat.ops.logging import get_logger
from estat.pause import Pauses
from estat.retry import RetryPolicy
from estat.stage import Deadline, Spawn

log = get_logger("estat.dlq")

MAX_BACKOFF = 10.0
JOIN_GRACE = 2.0
#: after a failed replay: 0.5 s doubling to MAX_BACKOFF
BACKOFF = RetryPolicy(base=0.5, cap=MAX_BACKOFF, jitter="none")
IDLE_SECONDS = 1.0
YIELD_SECONDS = 0.05


class Lake(Protocol):
    """The lake's circuit as the replayer sees it (``estat.pipeline.gate.LakeGate``)."""

    def allow(self) -> bool:
        """May an upload be tried now (closed, or this caller is the probe)?"""

    def probing(self) -> bool:
        """Is the caller that was just allowed the probe?"""

    def uploaded(self) -> None: ...

    def probe_failed(self) -> None: ...

    def probe_abandoned(self) -> None: ...


class Replayer:
    def __init__(
        self,
        dlq: DeadLetterQueue,
        sink: Sink,
        *,
        live_busy: Callable[[], bool],
        lake: Lake | None = None,
        clock: Clock | None = None,
        pauses: Pauses | None = None,
    ) -> None:
        self._clock = clock or SystemClock()
        self.pauses = pauses
        self.failures = 0  # consecutive failed replays
        self._dlq = dlq
        self._sink = sink
        self._busy = live_busy
        self._lake = lake
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.backoff = 0.0

    name = "dlq-replayer"

    # -- Stage (estat.stage) -------------------------------------------------------
    async def start(self, spawn: Spawn) -> None:
        self._task = spawn("dlq-replayer", self._run())

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self.pauses is not None:
            self.pauses.interrupt()

    async def join(self, deadline: Deadline) -> int:
        """Finish the file in progress (at most ``JOIN_GRACE``); a file cut
        off is released and replayed later: nothing is lost."""
        await self.stop(grace=min(JOIN_GRACE, deadline.left()))
        return 0

    def notify_healthy(self) -> None:
        """A live upload succeeded: the lake is back, stop backing off."""
        if self.backoff:
            self.backoff = 0.0
            self.failures = 0
            self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on the clock, or until woken (a stop that came
        while a replay was running is not missed: it is checked first)."""
        if self._stopping:
            return
        self._wake.clear()
        waker = asyncio.ensure_future(self._wake.wait())
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait({waker, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (waker, sleeper):
                f.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await f

    async def _run(self) -> None:
        lake = self._lake
        while not self._stopping:
            if self.pauses is not None and self.pauses.paused("dlq-replayer"):
                await self.pauses.wait_change(1.0)  # the files wait in the DLQ
                continue
            if self._busy():
                await self._clock.sleep(YIELD_SECONDS)
                continue
            if lake is not None and not lake.allow():
                await self._sleep(IDLE_SECONDS)
                continue
            probe = lake is not None and lake.probing()
            try:
                result = await self._dlq.replay_one(self._sink)
            except asyncio.CancelledError:
                if probe and lake is not None:
                    lake.probe_abandoned()
                raise
            except Exception:
                log.exception("DLQ replay error")
                result = "failed"
            if lake is not None and probe:
                if result in ("ok", "quarantined"):
                    lake.uploaded()
                elif result == "failed":
                    lake.probe_failed()
                else:
                    lake.probe_abandoned()
            if result == "empty":
                await self._sleep(IDLE_SECONDS)
            elif result == "failed":
                self.failures += 1
                self.backoff = BACKOFF.delay(self.failures)
                await self._sleep(self.backoff)
            else:
                self.failures = 0
                self.backoff = 0.0

    async def stop(self, grace: float = 2.0) -> None:
        """Finish the file in progress (up to ``grace``), then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is None or self._task.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except TimeoutError:
            self._task.cancel()  # the claim is released by replay_one, or at next start
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
