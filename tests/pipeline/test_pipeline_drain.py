"""The drain's count of lost events is the truth, also when it times out."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from estat.clock import SystemClock
from estat.codec import encode
from estat.ops.metrics import Metrics
from estat.ops.tasks import Supervisor
from estat.pipeline.pipeline import Pipeline
from estat.pipeline.uploader import UploadPolicy
from tests.fakes import MemorySink


async def test_a_drain_that_times_out_counts_every_event_it_loses() -> None:
    """A hanging lake, no DLQ, a full upload queue and a batch waiting for
    room in it: every accepted event is either stored or counted."""
    m = Metrics(CollectorRegistry())
    sink = MemorySink()
    sink.delay = 3600  # hangs
    clock = SystemClock()
    p = Pipeline(
        sink=sink,
        make_key=lambda now: f"raw/{time.monotonic_ns()}",
        encode=encode,
        clock=clock,
        metrics=m,
        instance="t",
        channel_size=10_000,
        channel_max_bytes=10**8,
        batch_size=10,
        batch_max_bytes=10**6,
        flush_interval=60,
        upload_queue=2,
        upload_concurrency=2,
        policy=UploadPolicy.with_retries(0, attempt_timeout=3600),
        executor=None,
    )
    sup = Supervisor(m, lambda name: None)
    await p.start(sup.spawn)
    accepted = 0
    for i in range(137):
        p.queue.put_line(b'{"i":%d}' % i)
        accepted += 1
    await asyncio.sleep(0.3)  # 2 uploading, 2 waiting, 1 handing off, the rest queued
    assert p.builder.handing_off == 10
    sup.stopping()
    lost = await asyncio.wait_for(p.drain(clock.monotonic() + 0.2), 10)
    assert sink.objects == {}
    assert lost == accepted
    assert m.registry.get_sample_value("shutdown_events_unsaved_total") == accepted
