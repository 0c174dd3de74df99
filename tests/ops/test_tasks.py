"""The supervisor: a task that raises, or ends, or is cancelled before the
stop, is a failure that is counted, recorded and reported."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from estat.ops.metrics import Metrics
from estat.ops.tasks import Supervisor


def count(m: Metrics, stage: str) -> float:
    return m.registry.get_sample_value("stage_failures_total", {"stage": stage}) or 0.0


async def test_raising_ending_and_cancelled_tasks_are_failures() -> None:
    m = Metrics(CollectorRegistry())
    reported: list[str] = []
    sup = Supervisor(m, reported.append)

    async def boom() -> None:
        raise BaseException("a native panic")

    async def ends() -> None:
        return None

    async def forever() -> None:
        await asyncio.Event().wait()

    sup.spawn("uploader:raw:0", boom())
    sup.spawn("batcher:raw", ends())
    victim = sup.spawn("dlq-replayer", forever())
    await asyncio.sleep(0)
    victim.cancel()
    await asyncio.sleep(0.01)
    assert sorted(reported) == ["batcher:raw", "dlq-replayer", "uploader:raw:0"]
    assert sup.failed == reported
    assert count(m, "uploader") == 1
    assert count(m, "batcher") == 1
    assert count(m, "dlq-replayer") == 1


async def test_tasks_may_end_once_stopping() -> None:
    m = Metrics(CollectorRegistry())
    reported: list[str] = []
    sup = Supervisor(m, reported.append)

    async def forever() -> None:
        await asyncio.Event().wait()

    async def ends() -> None:
        return None

    t = sup.spawn("metrics-flush", forever())
    sup.stopping()
    sup.spawn("batcher:events", ends())
    t.cancel()
    await asyncio.sleep(0.01)
    assert reported == []
    assert count(m, "metrics-flush") == 0


async def test_a_failing_listener_tick_is_a_stage_failure_and_keeps_ticking() -> None:
    from estat.ingest.server import HttpLimits, HttpServer
    from estat.ops.logging import Sampler

    m = Metrics(CollectorRegistry())
    reported: list[str] = []
    sup = Supervisor(m, reported.append)
    server = HttpServer(
        {},
        limits=HttpLimits(max_head=8192, header_timeout=10, body_timeout=10, keepalive_timeout=75),
        metrics=m,
        log_sample=Sampler(1),
    )
    server.on_failure = lambda name, exc: sup.fail(name, exc, "raised")

    class Broken:
        answered = in_head = in_request = 0
        seen_state = (0, 0, 0)
        seen_at = -1e9

        def on_deadline(self) -> None:
            raise RuntimeError("deadline handling bug")

    server.connections[Broken()] = None  # type: ignore[index]
    server._tick()
    assert reported == ["listener"]
    assert count(m, "listener") == 1
    assert server._tick_handle is not None  # the next tick is still scheduled
    server._tick_handle.cancel()
