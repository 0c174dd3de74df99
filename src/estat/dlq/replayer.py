"""The background replayer: empties the DLQ while the lake is healthy.

It replays one file after another, yielding to live uploads (it waits while
the upload queue has batches). After a failed upload it backs off, doubling
from 0.5 s up to ``MAX_BACKOFF`` (10 s): replay resumes within 10 s of the
lake becoming reachable, and at once when a live upload succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from estat.dlq.queue import DeadLetterQueue, Sink
from estat.ops.logging import get_logger

log = get_logger("estat.dlq")

MAX_BACKOFF = 10.0
IDLE_SECONDS = 1.0
YIELD_SECONDS = 0.05


class Replayer:
    def __init__(self, dlq: DeadLetterQueue, sink: Sink, *, live_busy: Callable[[], bool]) -> None:
        self._dlq = dlq
        self._sink = sink
        self._busy = live_busy
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.backoff = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dlq-replayer")

    def notify_healthy(self) -> None:
        """A live upload succeeded: the lake is back, stop backing off."""
        if self.backoff:
            self.backoff = 0.0
            self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _run(self) -> None:
        while not self._stopping:
            if self._busy():
                await asyncio.sleep(YIELD_SECONDS)
                continue
            try:
                result = await self._dlq.replay_one(self._sink)
            except Exception:
                log.exception("DLQ replay error")
                result = "failed"
            if result == "empty":
                await self._sleep(IDLE_SECONDS)
            elif result == "failed":
                self.backoff = min(MAX_BACKOFF, max(0.5, self.backoff * 2))
                await self._sleep(self.backoff)
            else:
                self.backoff = 0.0

    async def stop(self, grace: float = 2.0) -> None:
        """Finish the file in progress (up to ``grace``), then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except TimeoutError:
            self._task.cancel()  # the claim is released by replay_one, or at next start
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
