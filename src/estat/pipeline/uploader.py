"""The uploader: encodes batches (in a worker thread) and stores them with retries.

Each batch keeps the key it was given when it was cut. An attempt is bounded
by ``S3_TIMEOUT``; a retryable failure is retried ``S3_APP_RETRIES`` times
with exponential backoff and jitter. A batch that exhausts its retries, or
meets a permanent error, is handed to the ``Spill`` (the local DLQ) when one
is configured; without one it is *held*: retried on a slow, capped backoff
for as long as the process runs, occupying its upload slot, so the upload
queue and then the event queue fill up and ingest answers 503 instead of
accepting events it cannot store.

During the drain the uploader works until the deadline; whatever it still
holds then is spilled if possible and otherwise counted in
``shutdown_events_unsaved_total`` and logged as an error.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

from estat.clock import Clock
from estat.errors import DeliveryError, RetryableDeliveryError
from estat.model import Batch, EncodedBatch
from estat.ops.logging import get_logger
from estat.ops.metrics import Metrics

log = get_logger("estat.uploader")


class Sink(Protocol):
    """Stores whole objects (the lake).

    ``put`` may block as long as the store takes; the uploader bounds it with
    a timeout and may cancel it. It stores ``data`` at ``key`` atomically,
    overwriting an object with the same key, or raises
    ``RetryableDeliveryError`` / ``PermanentDeliveryError``. After
    ``close()`` no further ``put`` is made.
    """

    description: str

    async def put(self, key: str, data: bytes, metadata: Mapping[str, str]) -> None: ...

    async def close(self) -> None: ...


class Spill(Protocol):
    """Where a batch goes when the lake will not take it (the local DLQ).

    ``spill`` returns True once the batch is durably saved, False if it
    could not be saved (the uploader then keeps holding it).
    """

    async def spill(self, batch: EncodedBatch, error: DeliveryError, attempts: int) -> bool: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int = 2
    attempt_timeout: float = 3.0
    base_delay: float = 0.2
    max_delay: float = 5.0
    held_max_delay: float = 30.0

    def delay(self, attempt: int, cap: float | None = None) -> float:
        """Backoff before retry ``attempt`` (1-based): exponential, equal jitter."""
        d = min(cap if cap is not None else self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return float(d / 2 + random.uniform(0, d / 2))


def encode_batch(
    batch: Batch, instance: str, encode: Callable[[bytes | bytearray], bytes]
) -> EncodedBatch:
    data = encode(batch.data)
    return EncodedBatch(
        key=batch.key,
        data=data,
        events=batch.events,
        raw_bytes=batch.nbytes,
        first_ts=batch.first_ts,
        last_ts=batch.last_ts,
        metadata={
            "estat-events": str(batch.events),
            "estat-first-ts": str(batch.first_ts),
            "estat-last-ts": str(batch.last_ts),
            "estat-instance": instance,
        },
    )


class Uploader:
    def __init__(
        self,
        inbox: asyncio.Queue[Batch],
        sink: Sink,
        *,
        policy: RetryPolicy,
        concurrency: int,
        executor: Executor | None,
        clock: Clock,
        metrics: Metrics,
        instance: str,
        encode: Callable[[bytes | bytearray], bytes],
        spill: Spill | None = None,
        on_success: Callable[[], None] | None = None,
    ) -> None:
        self._encode = encode
        self._on_success = on_success
        self._inbox = inbox
        self._sink = sink
        self._policy = policy
        self._concurrency = concurrency
        self._executor = executor
        self._clock = clock
        self._m = metrics
        self._instance = instance
        self._spill = spill
        self._deadline: float | None = None
        self._stopping = False
        self.in_flight = 0  # batches taken from the inbox and not yet settled
        self.in_flight_events = 0
        self.consecutive_failures = 0
        self.unsaved_events = 0  # given up at the drain deadline
        self._spill_grace = 1.0 if spill is not None else 0.0

    def start_drain(self, deadline: float) -> None:
        """From now on, give up on whatever is not stored by ``deadline`` (monotonic)."""
        self._deadline = deadline

    def _time_left(self) -> float | None:
        if self._deadline is None:
            return None
        return self._deadline - self._clock.monotonic()

    async def run(self) -> None:
        """Upload until the inbox yields ``None`` once per worker (see ``stop``)."""
        await asyncio.gather(*(self._worker() for _ in range(self._concurrency)))

    async def stop(self) -> None:
        for _ in range(self._concurrency):
            await self._inbox.put(None)  # type: ignore[arg-type]

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._inbox.get()
            if batch is None:
                return
            self.in_flight += 1
            self.in_flight_events += batch.events
            self._m.uploads_in_flight.inc()
            try:
                encoded = await loop.run_in_executor(
                    self._executor, encode_batch, batch, self._instance, self._encode
                )
                await self._deliver(encoded)
            finally:
                self.in_flight -= 1
                self.in_flight_events -= batch.events
                self._m.uploads_in_flight.dec()

    async def _attempt(self, enc: EncodedBatch) -> DeliveryError | None:
        timeout = self._policy.attempt_timeout
        left = self._time_left()
        if left is not None:
            timeout = max(0.05, min(timeout, left))
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self._sink.put(enc.key, enc.data, enc.metadata), timeout)
        except DeliveryError as e:
            err: DeliveryError | None = e
        except TimeoutError:
            err = RetryableDeliveryError(
                f"attempt timed out after {timeout:g}s", error_class="timeout"
            )
        else:
            err = None
        elapsed = time.perf_counter() - t0
        self._m.s3_put_duration.labels("ok" if err is None else "error").observe(elapsed)
        if err is None:
            self.consecutive_failures = 0
            if self._on_success is not None:
                self._on_success()
            self._m.s3_events_stored.inc(enc.events)
            self._m.s3_objects_stored.inc()
            self._m.s3_bytes_stored.inc(len(enc.data))
            log.info(
                "lake upload ok",
                batchKey=enc.key,
                events=enc.events,
                bytes=len(enc.data),
                durationMs=round(elapsed * 1000, 2),
            )
        else:
            self.consecutive_failures += 1
            self._m.s3_put_errors.inc()
            self._m.s3_put_errors_by_class.labels(err.error_class).inc()
        return err

    async def _deliver(self, enc: EncodedBatch) -> None:
        policy = self._policy
        attempts = 0
        last_err: DeliveryError = RetryableDeliveryError("drain deadline", error_class="deadline")
        while True:
            left = self._time_left()
            if left is not None and left <= 0 and attempts:
                # past the drain deadline: save it without another attempt
                if await self._give_up(enc, last_err, attempts):
                    return
                await asyncio.sleep(0.1)
                continue
            attempts += 1
            err = await self._attempt(enc)
            if err is None:
                return
            last_err = err
            exhausted = (not err.retryable) or attempts > policy.retries
            log.warning(
                "lake upload failed",
                batchKey=enc.key,
                events=enc.events,
                attempt=attempts,
                errorClass=err.error_class,
                error=str(err).splitlines()[0][:300],
                willRetry=not exhausted or self._spill is None,
            )
            if (
                exhausted
                and self._spill is not None
                and await self._spill.spill(enc, err, attempts)
            ):
                return
            # retry: fast backoff within the retry budget, slow and capped beyond it
            cap = policy.held_max_delay if exhausted else policy.max_delay
            delay = policy.delay(attempts, cap)
            left = self._time_left()
            if left is not None and left <= delay:
                await asyncio.sleep(max(0.0, left))
                continue
            await asyncio.sleep(delay)

    async def _give_up(self, enc: EncodedBatch, err: DeliveryError, attempts: int) -> bool:
        """At the drain deadline: spill if possible, else count the loss."""
        if self._spill is not None and await self._spill.spill(enc, err, attempts):
            return True
        if self._time_left() is not None and (self._time_left() or 0) > -self._spill_grace:
            return False  # the DLQ may recover (it is retried until the grace runs out)
        self.unsaved_events += enc.events
        self._m.events_unsaved.inc(enc.events)
        log.error(
            "shutdown deadline reached: batch not stored",
            batchKey=enc.key,
            events=enc.events,
            attempts=attempts,
            errorClass=err.error_class,
        )
        return True
