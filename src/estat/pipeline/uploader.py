"""The uploader: encodes batches (in a worker thread) and stores them with retries.

Each batch keeps the key it was given when it was cut. An attempt is bounded
by ``S3_TIMEOUT``; a retryable failure is retried ``S3_APP_RETRIES`` times
with exponential backoff and jitter. A batch that exhausts its retries, or
meets a permanent error, or arrives while the lake is marked failing (the
``LakeGate``'s circuit is open), is handed to the ``Spill`` (the local DLQ)
at once. When the spill cannot save it either, the batch is *held*: the
spill and (as the circuit allows) the lake are retried on a short capped
backoff, the gate makes ingest refuse new events, and the batch is never
dropped.

Every worker catches everything at the sink boundary: any exception from a
sink, including a ``BaseException`` that a native library raises (a Rust
panic), is a retryable delivery error of class ``internal``. Should a worker
itself fail, it saves the batch it holds (DLQ) before anything else, counts
it if it cannot, and then fails, so its supervisor sees it.

During the drain the uploader works until the deadline; whatever it still
holds then is spilled if possible and otherwise counted in
``shutdown_events_unsaved_total`` and logged as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Final, Protocol

from estat.clock import Clock
from estat.errors import DeliveryError, RetryableDeliveryError
from estat.model import Batch, EncodedBatch
from estat.ops.ledger import Ledger
from estat.ops.logging import get_logger
from estat.ops.metrics import Metrics
from estat.pipeline.gate import LakeGate
from estat.retry import RetryPolicy
from estat.stage import Spawn

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


_RETRY: Final = RetryPolicy(base=0.2, cap=5.0, max_attempts=3)
_HELD: Final = RetryPolicy(base=0.2, cap=2.0)


@dataclass(frozen=True, slots=True)
class UploadPolicy:
    """How hard an upload is tried: ``retry`` within a batch's budget
    (``max_attempts`` = 1 + ``S3_APP_RETRIES``), ``held`` for a batch that
    neither the lake nor the DLQ would take (retried without end)."""

    attempt_timeout: float = 3.0
    retry: RetryPolicy = _RETRY
    held: RetryPolicy = _HELD

    @classmethod
    def with_retries(cls, retries: int, attempt_timeout: float) -> UploadPolicy:
        return cls(attempt_timeout, RetryPolicy(base=0.2, cap=5.0, max_attempts=retries + 1))


def encode_batch(
    batch: Batch, instance: str, encode: Callable[[bytes | bytearray], bytes]
) -> EncodedBatch:
    data = encode(batch.data)
    return EncodedBatch(
        key=batch.key,
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),  # here, off the event loop
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
        policy: UploadPolicy,
        concurrency: int,
        executor: Executor | None,
        clock: Clock,
        metrics: Metrics,
        instance: str,
        encode: Callable[[bytes | bytearray], bytes],
        spill: Spill | None = None,
        gate: LakeGate | None = None,
        dataset: str = "raw",
        rng: random.Random | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self._ledger = ledger
        self._rng = rng
        self._encode = encode
        self._in_flight_gauge = metrics.uploads_in_flight.labels(dataset)
        self._inbox = inbox
        self._sink = sink
        self._policy = policy
        self._concurrency = concurrency
        self._executor = executor
        self._clock = clock
        self._m = metrics
        self._instance = instance
        self._spill = spill
        self.gate = gate or LakeGate(
            threshold=0, probe_interval=1.0, max_probe_interval=1.0, clock=clock, metrics=metrics
        )
        self._deadline: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.in_flight = 0  # batches taken from the inbox and not yet settled
        self.in_flight_events = 0
        self.unsaved_events = 0  # given up at the drain deadline, or lost with a failed worker
        self._spill_grace = 1.0 if spill is not None else 0.0

    def start_drain(self, deadline: float) -> None:
        """From now on, give up on whatever is not stored by ``deadline`` (monotonic)."""
        self._deadline = deadline

    def _time_left(self) -> float | None:
        if self._deadline is None:
            return None
        return self._deadline - self._clock.monotonic()

    def start(self, spawn: Spawn, name: str = "uploader") -> None:
        """Start the workers, each a supervised task named ``<name>:<i>``."""
        self._tasks = [spawn(f"{name}:{i}", self._worker()) for i in range(self._concurrency)]

    async def run(self) -> None:
        """Upload until the inbox yields ``None`` once per worker (see ``stop``)."""
        await asyncio.gather(*(self._worker() for _ in range(self._concurrency)))

    async def stop(self) -> None:
        """Ask every live worker to finish (after the batches already queued)."""
        live = sum(1 for t in self._tasks if not t.done()) if self._tasks else self._concurrency
        for _ in range(live):
            await self._inbox.put(None)  # type: ignore[arg-type]

    async def wait(self, timeout: float) -> bool:
        """Wait for the workers to finish; True if they all did."""
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(self._tasks, timeout=max(0.0, timeout))
        return not pending

    async def cancel(self) -> None:
        """Cancel the workers still running (the events they hold are
        ``in_flight_events``, counted by the caller)."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, BaseException):
                await t

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._inbox.get()
            if batch is None:
                return
            self.in_flight += 1
            self.in_flight_events += batch.events
            self._in_flight_gauge.inc()
            encoded: EncodedBatch | None = None
            try:
                encoded = await loop.run_in_executor(
                    self._executor, encode_batch, batch, self._instance, self._encode
                )
                await self._deliver(encoded)
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                await self._rescue(batch, encoded, e)
                raise
            finally:
                self.in_flight -= 1
                self.in_flight_events -= batch.events
                self._in_flight_gauge.dec()

    async def _rescue(self, batch: Batch, encoded: EncodedBatch | None, exc: BaseException) -> None:
        """A worker is failing: save its batch before anything else."""
        err = RetryableDeliveryError(f"upload worker failed: {exc!r}", error_class="internal")
        if encoded is not None and self._spill is not None:
            try:
                saved = await self._spill.spill(encoded, err, 0)
            except BaseException:  # the batch is counted below
                saved = False
            if saved:
                log.error(
                    "upload worker failed; its batch was saved to the DLQ", batchKey=batch.key
                )
                return
        self.unsaved_events += batch.events
        self._m.events_unsaved.inc(batch.events)
        log.error(
            "upload worker failed; its batch is lost", batchKey=batch.key, events=batch.events
        )

    async def _attempt(self, enc: EncodedBatch) -> DeliveryError | None:
        timeout = self._policy.attempt_timeout
        left = self._time_left()
        if left is not None:
            timeout = max(0.05, min(timeout, left))
        probing = self.gate.breaker.state == "half_open"
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self._sink.put(enc.key, enc.data, enc.metadata), timeout)
        except DeliveryError as e:
            err: DeliveryError | None = e
        except TimeoutError:
            err = RetryableDeliveryError(
                f"attempt timed out after {timeout:g}s", error_class="timeout"
            )
        except asyncio.CancelledError:
            if probing:
                self.gate.breaker.abandon()
            raise
        except BaseException as e:  # a native library's panic is a delivery error
            err = RetryableDeliveryError(f"{type(e).__name__}: {e}", error_class="internal")
        else:
            err = None
        elapsed = time.perf_counter() - t0
        self._m.s3_put_duration.labels("ok" if err is None else "error").observe(elapsed)
        if err is None:
            self.gate.uploaded()
            self._m.s3_events_stored.inc(enc.events)
            self._m.lake_last_upload.set(time.time())
            if self._ledger is not None:
                self._ledger.stored_object(enc.key, enc.events, len(enc.data), enc.sha256)
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
            self.gate.upload_failed(err)
            self._m.s3_put_errors.inc()
            self._m.s3_put_errors_by_class.labels(err.error_class).inc()
        return err

    async def _deliver(self, enc: EncodedBatch) -> None:
        policy = self._policy
        gate = self.gate
        attempts = held = 0
        err: DeliveryError | None = None
        while True:
            left = self._time_left()
            if left is not None and left <= 0 and (attempts or held):
                # past the drain deadline: save it without another attempt
                if await self._give_up(enc, err or _DEADLINE, attempts):
                    return
                await self._clock.sleep(0.1)
                continue
            if gate.breaker.allow():
                attempts += 1
                err = await self._attempt(enc)
                if err is None:
                    return
                retry = (
                    err.retryable
                    and not policy.retry.exhausted(attempts)
                    and gate.breaker.state == "closed"
                )
                log.warning(
                    "lake upload failed",
                    batchKey=enc.key,
                    events=enc.events,
                    attempt=attempts,
                    errorClass=err.error_class,
                    error=str(err).splitlines()[0][:300],
                    willRetry=retry or self._spill is None,
                )
                if retry:
                    await self._pause(policy.retry.delay(attempts, self._rng))
                    continue
            elif err is None:
                # the lake is marked failing: straight to the DLQ
                err = gate.last_error or RetryableDeliveryError(
                    "lake marked failing", error_class="lake_failing"
                )
            if self._spill is not None:
                if await self._spill.spill(enc, err, attempts):
                    gate.spilled()
                    return
                gate.spill_failed()
            held += 1
            await self._pause(policy.held.delay(held, self._rng))

    async def _pause(self, delay: float) -> None:
        left = self._time_left()
        if left is not None:
            delay = min(delay, max(0.0, left))
        await self._clock.sleep(delay)

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


_DEADLINE = RetryableDeliveryError("drain deadline", error_class="deadline")
