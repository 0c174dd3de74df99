from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry

from estat.clock import FakeClock
from estat.ingest.ratelimit import MemoryRateLimiter, RedisRateLimiter
from estat.ops.metrics import Metrics
from tests.conftest import RedisServer, free_port


def test_memory_window_and_retry_after() -> None:
    clock = FakeClock()
    rl = MemoryRateLimiter(3, 60, clock)
    assert [rl.hit("anonymous:a").allowed for _ in range(4)] == [True, True, True, False]
    assert rl.hit("anonymous:b").allowed  # per key
    clock.advance(45)
    d = rl.hit("anonymous:a")
    assert not d.allowed
    assert d.retry_after == 15
    clock.advance(15)
    assert rl.hit("anonymous:a").allowed  # a new window


def test_memory_is_bounded() -> None:
    clock = FakeClock()
    rl = MemoryRateLimiter(1, 60, clock, max_keys=100)
    for i in range(1000):
        rl.hit(f"anonymous:{i}")
    assert len(rl) <= 100
    clock.advance(61)
    rl.hit("anonymous:new")
    assert len(rl) <= 100


async def test_redis_shared_limit(redis_server: RedisServer) -> None:
    m = Metrics(CollectorRegistry())
    a = RedisRateLimiter(redis_server.url, 5, 60, m, prefix="t1:")
    b = RedisRateLimiter(redis_server.url, 5, 60, m, prefix="t1:")  # another replica
    results = await asyncio.gather(*(x.hit_async("member:7") for x in [a, b] * 5))
    assert sum(d.allowed for d in results) == 5
    denied = [d for d in results if not d.allowed]
    assert all(1 <= d.retry_after <= 60 for d in denied)
    assert (await a.hit_async("member:8")).allowed
    await a.close()
    await b.close()


async def test_redis_down_fails_open_and_counts(redis_server: Any) -> None:
    m = Metrics(CollectorRegistry())
    rl = RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0", 1, 60, m)
    assert all([(await rl.hit_async("anonymous:x")).allowed for _ in range(3)])
    assert (
        m.registry.get_sample_value("analytics_rate_limiter_errors_total", {"backend": "redis"})
        == 3
    )
    await rl.close()


def test_memory_evicts_oldest_windows_first_and_renewed_ones_last() -> None:
    clock = FakeClock()
    rl = MemoryRateLimiter(1, 60, clock, max_keys=3)
    rl.hit("a")
    clock.advance(1)
    rl.hit("b")
    clock.advance(60)  # a's and b's windows are over
    rl.hit("a")  # a new window for a: now the newest
    clock.advance(1)
    rl.hit("c")  # b (expired) is dropped; a survives
    assert list(rl._windows) == ["a", "c"]
    rl.hit("d")
    rl.hit("e")  # at max_keys: the oldest live window (a) goes
    assert list(rl._windows) == ["c", "d", "e"]
    assert not rl.hit("e").allowed  # e's own window is intact


async def test_shared_limiter_is_one_limit_and_fails_open(tmp_path: Any) -> None:
    from estat.clock import SystemClock
    from estat.ingest.ratelimit import SharedRateLimiter, serve_shared_limiter

    path = str(tmp_path / "rl.sock")
    serve_shared_limiter(path, 3, 60, SystemClock())
    m = Metrics(CollectorRegistry())
    a, b = SharedRateLimiter(path, m), SharedRateLimiter(path, m)  # two workers
    got = [await (a if i % 2 else b).hit_async("anonymous:x\nmore") for i in range(5)]
    assert [d.allowed for d in got] == [True, True, True, False, False]
    assert 0 < got[-1].retry_after <= 60
    gone = SharedRateLimiter(str(tmp_path / "nobody-here.sock"), m)
    assert (await gone.hit_async("anonymous:y")).allowed
    assert (
        m.registry.get_sample_value("analytics_rate_limiter_errors_total", {"backend": "shared"})
        == 1
    )
    for rl in (a, b, gone):
        await rl.close()
