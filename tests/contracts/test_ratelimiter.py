"""The ``RateLimiter`` seam, one suite for every backend: in-process,
shared by the workers of a server (the supervisor's socket), and Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from estat.clock import SystemClock
from estat.ingest.ratelimit import (
    Decision,
    MemoryRateLimiter,
    RedisRateLimiter,
    SharedRateLimiter,
    serve_shared_limiter,
)
from estat.ops.metrics import Metrics

LIMIT, WINDOW = 3, 60.0


@pytest.fixture(params=["memory", "shared", "redis"])
async def limiter(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    m = Metrics(CollectorRegistry())
    rl: Any
    if request.param == "memory":
        rl = MemoryRateLimiter(LIMIT, WINDOW, SystemClock())
    elif request.param == "shared":
        path = str(tmp_path / "rl.sock")
        serve_shared_limiter(path, LIMIT, WINDOW, SystemClock())
        rl = SharedRateLimiter(path, m)
    else:
        redis = request.getfixturevalue("redis_server")
        rl = RedisRateLimiter(redis.url, LIMIT, WINDOW, m, prefix=f"t{uuid.uuid4().hex}:")
    yield rl
    await rl.close()


async def hit(rl: Any, key: str) -> Decision:
    d: Decision = await rl.hit_async(key) if rl.is_async else rl.hit(key)
    return d


async def test_the_limit_then_a_retry_hint(limiter: Any) -> None:
    got = [await hit(limiter, "anonymous:a") for _ in range(LIMIT + 2)]
    assert [d.allowed for d in got] == [True] * LIMIT + [False, False]
    assert all(0 < d.retry_after <= WINDOW for d in got[LIMIT:])


async def test_keys_are_independent(limiter: Any) -> None:
    for _ in range(LIMIT):
        await hit(limiter, "member:1")
    assert not (await hit(limiter, "member:1")).allowed
    assert (await hit(limiter, "member:2")).allowed
