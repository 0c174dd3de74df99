"""What every dataset's uploader knows about the lake and the DLQ, shared.

- **The lake circuit.** ``LAKE_FAILURE_THRESHOLD`` consecutive failed
  upload attempts (any dataset) mark the lake failing: new batches go
  straight to the DLQ without spending their retry budget, and one probe
  upload at a time tests the lake, first after ``LAKE_PROBE_INTERVAL`` and
  then at a doubling interval (capped). The first success closes the
  circuit, resumes normal uploads and wakes the DLQ replayer.
- **Fail closed.** Once a batch can be neither uploaded nor spilled (the DLQ
  directory is unwritable, full, or gone), every watched event queue refuses
  new events (ingest answers 503 with ``Retry-After``) instead of accepting
  into memory what cannot be saved. The first spill or upload that succeeds
  opens them again; the batches already held keep being retried.
"""

from __future__ import annotations

from collections.abc import Callable

from estat.circuit import CircuitBreaker, State
from estat.clock import Clock
from estat.errors import DeliveryError
from estat.ops.logging import get_logger
from estat.ops.metrics import Metrics
from estat.pipeline.queue import EventQueue

log = get_logger("estat.lake")

REFUSING = "the lake and the DLQ cannot take batches"
_STATE_VALUE = {"closed": 0, "open": 1, "half_open": 2}


class LakeGate:
    def __init__(
        self,
        *,
        threshold: int,
        probe_interval: float,
        max_probe_interval: float,
        clock: Clock,
        metrics: Metrics,
        on_recovered: Callable[[], None] | None = None,
    ) -> None:
        self.breaker = CircuitBreaker(
            threshold=threshold,
            open_for=probe_interval,
            max_open_for=max_probe_interval,
            clock=clock,
            on_change=self._changed,
        )
        self._m = metrics
        self._on_recovered = on_recovered
        self._queues: list[EventQueue] = []
        self.last_error: DeliveryError | None = None
        #: an upload has succeeded since the start
        self.succeeded = False
        self.accepting = True
        metrics.lake_circuit_state.set(0)
        metrics.pipeline_accepting.set(1)

    def watch(self, queue: EventQueue) -> None:
        self._queues.append(queue)

    def _changed(self, state: State) -> None:
        self._m.lake_circuit_state.set(_STATE_VALUE[state])
        self._m.lake_circuit_transitions.labels(state).inc()
        err = self.last_error
        if state == "open":
            log.warning(
                "lake marked failing: new batches go to the DLQ until a probe succeeds",
                errorClass=err.error_class if err else "",
                probeInS=round(self.breaker.retry_in(), 1),
            )
        elif state == "closed":
            log.info("lake healthy again: uploads and DLQ replay resume")

    # -- the replayer's view (``estat.dlq.replayer.Lake``) ------------------------
    def allow(self) -> bool:
        return self.breaker.allow()

    def probing(self) -> bool:
        return self.breaker.state == "half_open"

    def probe_failed(self) -> None:
        self.breaker.failure()

    def probe_abandoned(self) -> None:
        self.breaker.abandon()

    # -- reports from the uploaders --------------------------------------------
    def uploaded(self) -> None:
        self.last_error = None
        self.succeeded = True
        self.breaker.success()
        self._accept(True)
        if self._on_recovered is not None:
            self._on_recovered()

    def upload_failed(self, err: DeliveryError) -> None:
        self.last_error = err
        self.breaker.failure()

    def spilled(self) -> None:
        self._accept(True)

    def spill_failed(self) -> None:
        self._accept(False)

    def _accept(self, ok: bool) -> None:
        if ok == self.accepting:
            return
        self.accepting = ok
        self._m.pipeline_accepting.set(1 if ok else 0)
        for q in self._queues:
            q.refuse(None if ok else REFUSING)
        if ok:
            log.info("ingest accepting again: a batch was saved")
        else:
            log.error("ingest refusing (503): neither the lake nor the DLQ can save a batch")
