"""One dataset's pipeline: event queue → batcher → upload queue → uploader → sink."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor

from estat.clock import Clock
from estat.model import Batch
from estat.ops.ledger import Ledger
from estat.ops.logging import get_logger
from estat.ops.metrics import Metrics
from estat.pipeline.batcher import BatchBuilder, run_batcher
from estat.pipeline.gate import LakeGate
from estat.pipeline.queue import EventQueue
from estat.pipeline.uploader import Sink, Spill, Uploader, UploadPolicy
from estat.stage import Deadline, Spawn

log = get_logger("estat.pipeline")

#: time past the drain deadline allowed for the last spills and bookkeeping
DRAIN_MARGIN = 2.0


class Pipeline:
    def __init__(
        self,
        *,
        sink: Sink,
        make_key: Callable[[float], str],
        encode: Callable[[bytes | bytearray], bytes],
        clock: Clock,
        metrics: Metrics,
        instance: str,
        channel_size: int,
        channel_max_bytes: int,
        batch_size: int,
        batch_max_bytes: int,
        flush_interval: float,
        upload_queue: int,
        upload_concurrency: int,
        policy: UploadPolicy,
        executor: Executor | None,
        spill: Spill | None = None,
        gate: LakeGate | None = None,
        name: str = "raw",
        partition_tz: str = "UTC",
        ledger: Ledger | None = None,
    ) -> None:
        self.name = name
        self.ledger = ledger
        self._has_spill = spill is not None
        self.queue = EventQueue(channel_size, channel_max_bytes)
        self.inbox: asyncio.Queue[Batch] = asyncio.Queue(maxsize=upload_queue)
        self.builder = BatchBuilder(
            max_events=batch_size,
            max_bytes=batch_max_bytes,
            max_age=flush_interval,
            clock=clock,
            make_key=make_key,
            partition_tz=partition_tz,
        )
        self.uploader = Uploader(
            self.inbox,
            sink,
            policy=policy,
            concurrency=upload_concurrency,
            executor=executor,
            clock=clock,
            metrics=metrics,
            instance=instance,
            encode=encode,
            spill=spill,
            gate=gate,
            dataset=name,
            ledger=ledger,
        )
        self.uploader.gate.watch(self.queue)
        self._clock = clock
        self._m = metrics
        self._batcher_task: asyncio.Task[None] | None = None
        metrics.add_flusher(self._publish_depths)

    def _publish_depths(self) -> None:
        d = self.name
        self._m.event_queue_events.labels(d).set(len(self.queue))
        self._m.event_queue_bytes.labels(d).set(self.queue.nbytes)
        self._m.event_queue_capacity.labels(d).set(self.queue.max_events)
        self._m.upload_queue_batches.labels(d).set(self.inbox.qsize())

    def _on_batch(self, batch: Batch) -> None:
        if self.ledger is not None:
            self.ledger.add_key(batch.key, "accepted", batch.events)

    def _on_cut(self, reason: str) -> None:
        self._m.batches_cut.labels(self.name, reason).inc()

    # -- Stage (estat.stage) -------------------------------------------------------
    async def start(self, spawn: Spawn) -> None:
        self._batcher_task = spawn(
            f"batcher:{self.name}",
            run_batcher(self.queue, self.builder, self.inbox, self._on_cut, self._on_batch),
        )
        self.uploader.start(spawn, f"uploader:{self.name}")

    def close(self) -> None:
        """No more events: the queue refuses (503 ``draining``)."""
        self.queue.close()

    async def join(self, deadline: Deadline) -> int:
        return await self.drain(deadline.at)

    def pending_events(self) -> int:
        """Accepted events not yet stored: queued, batching, waiting or uploading."""
        waiting = sum(b.events for b in list(self.inbox._queue) if b is not None)  # type: ignore[attr-defined]
        b = self.builder
        return len(self.queue) + b.events + b.handing_off + waiting + self.uploader.in_flight_events

    async def drain(self, deadline: float) -> int:
        """Flush everything accepted; by ``deadline`` (monotonic) give up.

        Uploads stop a little before the deadline when a spill (the DLQ) is
        configured, so that what is left can be written to it in time.
        Returns the number of accepted events that could not be stored or
        spilled (also counted in ``shutdown_events_unsaved_total``): what the
        workers gave up, plus, if the drain itself runs out of time, every
        event still queued, batching, waiting for the upload queue, or held
        by a worker.
        """
        assert self._batcher_task is not None
        total = max(0.0, deadline - self._clock.monotonic())
        reserve = min(2.0, 0.2 * total) if self._has_spill else 0.0
        self.uploader.start_drain(deadline - reserve)
        self.queue.close()
        end = deadline + DRAIN_MARGIN

        def left() -> float:
            return max(0.0, end - self._clock.monotonic())

        batcher = self._batcher_task
        await asyncio.wait([batcher], timeout=left())
        finished = False
        if batcher.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.uploader.stop(), left())
                finished = await self.uploader.wait(left())
        # Whatever is still anywhere in the pipeline now is lost: the drain ran
        # out of time, or a stage failed and left events behind.
        lost = self.pending_events()
        if not batcher.done():
            batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, BaseException):
                await batcher
        if not finished:
            await self.uploader.cancel()  # what the workers held is in ``lost`` already
        if lost:
            self._m.events_unsaved.inc(lost)
            log.error("shutdown deadline reached: events not stored", events=lost)
        return lost + self.uploader.unsaved_events
