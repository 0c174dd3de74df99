from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from estat.clock import FakeClock
from estat.codec import decode, encode
from estat.errors import RetryableDeliveryError
from estat.model import Batch
from estat.ops.metrics import Metrics
from estat.pipeline.uploader import Uploader, UploadPolicy
from tests.fakes import MemorySink

# the production backoff: the fake clock makes its waits free
FAST = UploadPolicy.with_retries(2, attempt_timeout=1.0)


def batch(key: str, n: int = 3) -> Batch:
    data = b"".join(b'{"i":%d}\n' % i for i in range(n))
    return Batch(key=key, data=data, events=n, first_ts=1, last_ts=2)


def make(
    sink: MemorySink, policy: UploadPolicy = FAST, clock: FakeClock | None = None
) -> tuple[Uploader, asyncio.Queue[Batch], Metrics]:
    m = Metrics(CollectorRegistry())
    inbox: asyncio.Queue[Batch] = asyncio.Queue()
    up = Uploader(
        inbox,
        sink,
        policy=policy,
        concurrency=2,
        executor=None,
        clock=clock or FakeClock(),
        metrics=m,
        instance="test",
        encode=encode,
    )
    return up, inbox, m


def value(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    v = m.registry.get_sample_value(name, labels or {})
    return 0.0 if v is None else v


async def run_until_empty(up: Uploader, inbox: asyncio.Queue[Batch]) -> None:
    task = asyncio.create_task(up.run())
    await up.stop()
    await asyncio.wait_for(task, 10)


async def test_retries_reuse_the_batch_key_and_store_once() -> None:
    sink = MemorySink()
    sink.fail(2)
    up, inbox, m = make(sink)
    await inbox.put(batch("raw/a.jsonl.gz"))
    await run_until_empty(up, inbox)
    assert sink.attempts == ["raw/a.jsonl.gz"] * 3
    assert list(sink.objects) == ["raw/a.jsonl.gz"]
    assert decode(sink.objects["raw/a.jsonl.gz"]) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert sink.metadata["raw/a.jsonl.gz"]["estat-events"] == "3"
    assert value(m, "s3_put_errors_total") == 2
    assert value(m, "s3_events_stored_total") == 3


async def test_exhausted_and_permanent_failures_are_held_not_dropped() -> None:
    sink = MemorySink()
    sink.fail(5)  # more than S3_APP_RETRIES
    sink.fail(2, permanent=True)
    up, inbox, m = make(sink)
    await inbox.put(batch("raw/b.jsonl.gz", 4))
    await run_until_empty(up, inbox)
    assert list(sink.objects) == ["raw/b.jsonl.gz"]
    assert len(sink.attempts) == 8
    assert value(m, "s3_events_stored_total") == 4
    assert value(m, "shutdown_events_unsaved_total") == 0


async def test_drain_deadline_counts_what_could_not_be_stored() -> None:
    sink = MemorySink()
    sink.always_fail = RetryableDeliveryError("down", error_class="connection_refused")
    clock = FakeClock()
    up, inbox, m = make(sink, clock=clock)
    task = asyncio.create_task(up.run())
    await inbox.put(batch("raw/c.jsonl.gz", 5))
    await inbox.put(batch("raw/d.jsonl.gz", 7))
    await asyncio.sleep(0)
    up.start_drain(clock.monotonic() + 0.3)
    await up.stop()
    await asyncio.wait_for(task, 5)
    assert sink.objects == {}
    assert value(m, "shutdown_events_unsaved_total") == 12
    assert up.unsaved_events == 12
    assert clock.slept < 5  # gave up at the deadline (plus the spill grace), not later


async def test_slow_sink_attempt_times_out_and_retries() -> None:
    sink = MemorySink()
    sink.delay = 0.3
    up, inbox, m = make(sink, UploadPolicy.with_retries(1, attempt_timeout=0.05))
    task = asyncio.create_task(up.run())
    await inbox.put(batch("raw/e.jsonl.gz"))
    await asyncio.sleep(0.2)
    sink.delay = 0.0
    await up.stop()
    await asyncio.wait_for(task, 5)
    assert "raw/e.jsonl.gz" in sink.objects
    assert value(m, "s3_put_errors_by_class_total", {"error_class": "timeout"}) >= 1


async def test_backoff_follows_the_policy_on_the_clock() -> None:
    """Two failed attempts, then success: the waits are the policy's, taken
    on the injected clock (no real sleep) with the injected randomness."""
    import random

    from estat.retry import RetryPolicy

    sink = MemorySink()
    sink.fail(2)
    clock = FakeClock()
    up, inbox, _ = make(sink, clock=clock)
    up._rng = random.Random(7)
    await inbox.put(batch("raw/f.jsonl.gz"))
    t0 = time.monotonic()
    await run_until_empty(up, inbox)
    rng = random.Random(7)
    policy = RetryPolicy(base=0.2, cap=5.0, max_attempts=3)
    expected = policy.delay(1, rng) + policy.delay(2, rng)
    assert abs(clock.slept - expected) < 1e-9
    assert time.monotonic() - t0 < 1
