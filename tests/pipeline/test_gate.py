"""The uploaders and the lake gate: spill early while the lake fails, fail
closed while the DLQ cannot save, and a worker never loses its batch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from estat.clock import FakeClock
from estat.codec import encode
from estat.errors import DeliveryError, Overloaded, RetryableDeliveryError
from estat.model import Batch, EncodedBatch
from estat.ops.metrics import Metrics
from estat.ops.tasks import Supervisor
from estat.pipeline.gate import LakeGate
from estat.pipeline.queue import EventQueue
from estat.pipeline.uploader import Uploader, UploadPolicy
from estat.retry import RetryPolicy
from tests.fakes import MemorySink
from tests.pipeline.test_uploader import batch, value

POLICY = UploadPolicy(
    attempt_timeout=1.0,
    retry=RetryPolicy(base=0.01, cap=0.02, max_attempts=3),
    held=RetryPolicy(base=0.01, cap=0.02),
)


class RecordingSpill:
    """A DLQ stand-in: saves (or refuses to) and records what it saved."""

    def __init__(self) -> None:
        self.saved: list[EncodedBatch] = []
        self.works = True
        self.raise_next = 0
        self.calls = 0

    async def spill(self, b: EncodedBatch, error: DeliveryError, attempts: int) -> bool:
        self.calls += 1
        if self.raise_next:
            self.raise_next -= 1
            raise RuntimeError("a bug in the spill")
        if not self.works:
            return False
        self.saved.append(b)
        return True


class Panic(BaseException):
    """What a Rust panic looks like from Python (pyo3's PanicException)."""


class World:
    def __init__(self, threshold: int = 3, probe: float = 0.2) -> None:
        self.m = Metrics(CollectorRegistry())
        self.sink = MemorySink()
        self.spill = RecordingSpill()
        self.failures: list[str] = []
        self.sup = Supervisor(self.m, self.failures.append)
        self.recovered = 0
        self.clock = FakeClock()  # waits move it: no test here sleeps for real
        self.gate = LakeGate(
            threshold=threshold,
            probe_interval=probe,
            max_probe_interval=probe,
            clock=self.clock,
            metrics=self.m,
            on_recovered=self._recovered,
        )
        self.queue = EventQueue(100, 10**6)
        self.gate.watch(self.queue)
        self.inbox: asyncio.Queue[Batch] = asyncio.Queue()
        self.encode: Callable[[bytes | bytearray], bytes] = encode
        self.up = Uploader(
            self.inbox,
            self.sink,
            policy=POLICY,
            concurrency=1,
            executor=None,
            clock=self.clock,
            metrics=self.m,
            instance="t",
            encode=lambda data: self.encode(data),
            spill=self.spill,
            gate=self.gate,
        )

    def _recovered(self) -> None:
        self.recovered += 1

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return self.sup.spawn(name, coro)

    async def until(self, cond: Any, steps: int = 100_000) -> None:
        for _ in range(steps):
            if cond():
                return
            await asyncio.sleep(0)
        raise AssertionError("condition never held")

    async def finish(self) -> None:
        self.sup.stopping()
        await self.up.stop()
        assert await self.up.wait(5)


DOWN = RetryableDeliveryError("refused", error_class="connection_refused")


async def test_failing_lake_opens_the_circuit_and_batches_go_straight_to_the_dlq() -> None:
    w = World(threshold=3, probe=0.3)
    w.sink.always_fail = DOWN
    w.up.start(w.spawn)
    await w.inbox.put(batch("raw/0"))  # spends its budget: 3 attempts open the circuit
    await w.until(lambda: len(w.spill.saved) == 1)
    assert w.gate.breaker.state == "open"
    assert value(w.m, "lake_circuit_state") == 1
    for i in range(1, 21):
        await w.inbox.put(batch(f"raw/{i}"))
    await w.until(lambda: len(w.spill.saved) == 21)
    # 20 batches spilled without spending a retry budget: at most one probe each 0.3 s
    assert len(w.sink.attempts) <= 3 + 2
    # the lake comes back: the next probe closes the circuit, uploads resume
    w.sink.always_fail = None
    w.clock.advance(0.35)  # the probe interval passes
    await w.inbox.put(batch("raw/after"))
    await w.until(lambda: str(w.gate.breaker.state) == "closed")  # the probe succeeded
    assert "raw/after" in w.sink.objects
    assert value(w.m, "lake_circuit_transitions_total", {"state": "closed"}) == 1
    assert w.recovered >= 1
    await w.finish()
    assert w.failures == []


async def test_dlq_unwritable_refuses_ingest_until_a_save_succeeds() -> None:
    w = World(threshold=1)
    w.sink.always_fail = DOWN
    w.spill.works = False
    w.up.start(w.spawn)
    w.queue.put_line(b"{}")
    await w.inbox.put(batch("raw/held", 4))
    await w.until(lambda: not w.gate.accepting)
    with pytest.raises(Overloaded) as e:
        w.queue.put_line(b"{}")
    assert e.value.retry_after == 5
    assert value(w.m, "pipeline_accepting") == 0
    calls = w.spill.calls
    await w.until(lambda: w.spill.calls > calls)  # the held batch keeps being retried
    w.spill.works = True
    await w.until(lambda: w.gate.accepting)
    w.queue.put_line(b"{}")  # accepted again
    assert [b.key for b in w.spill.saved] == ["raw/held"]
    assert value(w.m, "pipeline_accepting") == 1
    await w.finish()


async def test_a_panicking_sink_is_a_retryable_internal_error() -> None:
    w = World()
    panics = [Panic("poisoned runtime"), Panic("again")]

    async def put(key: str, data: bytes, metadata: Any) -> None:
        if panics:
            raise panics.pop(0)
        w.sink.objects[key] = data

    w.sink.put = put  # type: ignore[method-assign]
    w.up.start(w.spawn)
    await w.inbox.put(batch("raw/p", 5))
    await w.until(lambda: value(w.m, "s3_events_stored_total") == 5)
    assert "raw/p" in w.sink.objects
    assert value(w.m, "s3_put_errors_by_class_total", {"error_class": "internal"}) == 2
    assert value(w.m, "s3_events_stored_total") == 5
    await w.finish()
    assert w.failures == []  # the worker lived


async def test_a_failing_worker_saves_its_batch_first_and_is_reported() -> None:
    w = World()
    w.sink.always_fail = DOWN
    w.spill.raise_next = 1  # a bug inside the delivery loop
    w.up.start(w.spawn)
    await w.inbox.put(batch("raw/w", 6))
    await w.until(lambda: w.failures)
    assert [b.key for b in w.spill.saved] == ["raw/w"]  # rescued into the DLQ
    assert w.failures == ["uploader:0"]
    assert value(w.m, "stage_failures_total", {"stage": "uploader"}) == 1
    assert value(w.m, "shutdown_events_unsaved_total") == 0


async def test_a_worker_that_cannot_save_its_batch_counts_it() -> None:
    w = World()

    def broken(data: bytes | bytearray) -> bytes:
        raise MemoryError("encoder")

    w.encode = broken
    w.up.start(w.spawn)
    await w.inbox.put(batch("raw/x", 7))
    await w.until(lambda: w.failures)
    assert value(w.m, "shutdown_events_unsaved_total") == 7
    assert w.up.unsaved_events == 7
