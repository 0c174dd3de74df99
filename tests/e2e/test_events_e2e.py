"""The client event API as a real process: exactly once in the events dataset,
and one rate limit shared by two workers through Redis."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from estat.codec import decode
from tests.conftest import EstatProcess, RedisServer

pytestmark = pytest.mark.e2e
PATH = b"/api/v1/analytics/events"


async def post_batches(port: int, bodies: list[bytes], connections: int) -> list[int]:
    statuses: list[int] = [0] * len(bodies)

    async def worker(idx: list[int]) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in idx:
                body = bodies[i]
                w.write(
                    b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (PATH, len(body), body)
                )
                await w.drain()
                status = int((await r.readline()).split()[1])
                length = 0
                while (line := await r.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await r.readexactly(length)
                statuses[i] = status
        finally:
            w.close()
            await w.wait_closed()

    await asyncio.gather(
        *(worker(list(range(c, len(bodies), connections))) for c in range(connections))
    )
    return statuses


def test_events_exactly_once_after_sigterm(estat_factory: Any, tmp_path: Path) -> None:
    p: EstatProcess = estat_factory(
        {"ANALYTICS_RATE_LIMIT_MAX_REQUESTS": "100000", "FLUSH_INTERVAL": "1h"}
    )
    p.start()
    tag = uuid.uuid4().hex[:6]
    bodies = [
        json.dumps(
            {
                "anonymousId": f"a{i % 7}",
                "events": [
                    {
                        "eventId": f"{tag}-{i}-{j}",
                        "eventName": "ui.page.viewed",
                        "properties": {"i": i},
                    }
                    for j in range(10)
                ],
            }
        ).encode()
        for i in range(400)
    ]
    statuses = asyncio.run(post_batches(p.port, bodies, 16))
    accepted = {f"{tag}-{i}-{j}" for i, s in enumerate(statuses) if s == 200 for j in range(10)}
    assert len(accepted) >= 3500
    assert set(statuses) <= {200, 503}
    assert p.stop() == 0
    seen: Counter[str] = Counter()
    for f in (tmp_path / "data" / "lake" / "events").rglob("*.jsonl.gz"):
        seen.update(r["event_id"] for r in decode(f.read_bytes()))
    assert set(seen) == accepted
    assert max(seen.values()) == 1


@pytest.mark.parametrize("backend", ["redis", "shared"])
def test_two_workers_share_one_limit(estat_factory: Any, request: Any, backend: str) -> None:
    """The configured limit is the server's, whatever the worker count: with
    Redis, and without it (the supervisor keeps the windows)."""
    env = {"ANALYTICS_RATE_LIMIT_MAX_REQUESTS": "20", "ANALYTICS_RATE_LIMIT_WINDOW": "1m"}
    if backend == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        env["RATE_LIMIT_REDIS_URL"] = redis.url
    p: EstatProcess = estat_factory(env, workers=2)
    p.start()
    who = f"shared-{uuid.uuid4().hex[:6]}"
    bodies = [
        json.dumps(
            {"anonymousId": who, "events": [{"eventId": f"r{i}", "eventName": "ui.page.viewed"}]}
        ).encode()
        for i in range(60)
    ]
    statuses = asyncio.run(post_batches(p.port, bodies, 30))
    assert statuses.count(200) == 20
    assert statuses.count(429) == 40
    m = p.metrics()
    assert m.get(f'analytics_rate_limiter_errors_total{{backend="{backend}"}}', 0) == 0
    assert p.stop() == 0
    log = p.log.read_text()
    assert log.count('"worker started"') == 2
