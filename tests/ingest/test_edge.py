"""The listener under hostile connection patterns: idle connections, a
connection cap, pipelined floods whose answers are never read."""

from __future__ import annotations

import asyncio
import resource
import time
from pathlib import Path

import pytest

from estat.app import App
from tests.ingest.helpers import close_all, connect, read_response, start_app


@pytest.fixture
async def app(tmp_path: Path):  # type: ignore[no-untyped-def]
    a = await start_app(
        tmp_path,
        http_header_timeout="1s",
        http_keepalive_timeout="30s",
        max_connections=4,
    )
    yield a
    await close_all()
    if not a.draining:
        await a.shutdown()


async def closed(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def shed(app: App) -> float:
    app.metrics.flush()
    return app.metrics.registry.get_sample_value("http_connections_shed_total") or 0.0


async def test_a_silent_connection_gets_the_head_deadline_not_keep_alive(app: App) -> None:
    r, _ = await connect(app)
    t0 = time.monotonic()
    assert await closed(r, 10)
    assert time.monotonic() - t0 < 5  # HTTP_HEADER_TIMEOUT (1 s, checked each second), not 30 s


async def test_at_the_cap_the_oldest_idle_connection_makes_room(app: App) -> None:
    conns = []
    for _ in range(4):
        r, w = await connect(app)
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await w.drain()
        assert (await read_response(r)).status == 200
        conns.append((r, w))
        await asyncio.sleep(0.01)
    r5, w5 = await connect(app)
    w5.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    await w5.drain()
    assert (await asyncio.wait_for(read_response(r5), 5)).status == 200
    assert await closed(conns[0][0], 5)  # the oldest idle one
    assert shed(app) == 1


async def test_at_the_cap_with_every_connection_busy_a_new_one_is_closed_at_once(app: App) -> None:
    for _ in range(4):
        _, w = await connect(app)
        w.write(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")  # mid-body
        await w.drain()
    await asyncio.sleep(0.1)
    r5, _ = await connect(app)
    t0 = time.monotonic()
    assert await closed(r5, 5)
    assert time.monotonic() - t0 < 1  # a fast close, never a hang
    assert shed(app) == 1


async def test_a_pipelined_flood_never_read_stays_bounded(tmp_path: Path) -> None:
    app = await start_app(tmp_path, http_keepalive_timeout="30s")
    try:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        flood = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 10_000
        floods = []
        for _ in range(4):
            r, w = await connect(app)
            w.transport.set_write_buffer_limits(high=1 << 24)
            w.write(flood)  # and never read an answer
            floods.append((r, w))
        await asyncio.sleep(0.5)
        other_r, other_w = await connect(app)
        t0 = time.monotonic()
        for _ in range(20):
            other_w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            await other_w.drain()
            assert (await asyncio.wait_for(read_response(other_r), 5)).status == 200
        assert time.monotonic() - t0 < 5
        app.metrics.flush()
        answered = app.metrics.registry.get_sample_value(
            "http_responses_total", {"route": "health", "status": "200"}
        )
        assert answered is not None
        # it stopped handling what was not read: the kernel's socket buffers
        # hold a few MB of these small answers, never the whole flood
        assert answered < 4 * 10_000 * 0.75
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        assert grown_mb < 100
    finally:
        await close_all()
        await app.shutdown()


async def test_a_connection_waiting_on_a_deferred_answer_is_answered_during_the_drain(
    tmp_path: Path,
) -> None:
    """The rate limiter's Redis never answers (the request fails open after
    its 0.25 s timeout): a drain that starts meanwhile must wait for that
    answer instead of closing the connection while the events are published."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        app = await start_app(
            tmp_path, rate_limit_redis_url=f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        )
        r, w = await connect(app)
        body = b'{"anonymousId":"a","events":[{"eventId":"e1","eventName":"ui.page.viewed"}]}'
        w.write(
            b"POST /api/v1/analytics/events HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await w.drain()
        await asyncio.sleep(0.05)  # the answer is being worked on
        stop = asyncio.create_task(app.shutdown())
        resp = await asyncio.wait_for(read_response(r), 5)
        assert resp.status == 200
        assert resp.headers["connection"] == "close"
        await stop
        await close_all()
