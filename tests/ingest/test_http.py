"""The ingest listener is a correct HTTP/1.1 server (real sockets, in-process estat)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import time
from pathlib import Path

import pytest

from estat.app import App
from tests.ingest.helpers import close_all, connect, lake_records, post, read_response, start_app


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b""
    except ConnectionResetError:
        return True


async def test_record_fields_and_keep_alive(app: App, tmp_path: Path) -> None:
    r, w = await connect(app)
    w.write(
        post(
            "/collect",
            b'{"e":"page"}',
            b"User-Agent: UA/1\r\nCookie: a=b\r\nX-Forwarded-For: 10.0.0.1, 81.2.69.160\r\n",
        )
    )
    w.write(b"GET /collect?x=1&y=%20 HTTP/1.1\r\nHost: x\r\n\r\n")
    await w.drain()
    first, second = await read_response(r), await read_response(r)
    assert (first.status, second.status) == (200, 200)
    assert first.headers["access-control-allow-origin"] == "*"
    assert first.headers["connection"] == "keep-alive"
    w.close()
    await app.shutdown()
    recs = lake_records(tmp_path / "data" / "lake")
    assert len(recs) == 2
    a, b = recs
    assert a["ip"] == "81.2.69.160"
    assert a["user_agent"] == "UA/1"
    assert a["cookie"] == "a=b"
    assert a["body"] == '{"e":"page"}'
    assert abs(a["ts"] - time.time()) < 60
    assert b["body"] == "x=1&y=%20"
    assert b["ip"] == "127.0.0.1"
    assert set(a) == {"ts", "ip", "user_agent", "cookie", "body"}


async def test_hostile_bytes_become_one_valid_json_line(app: App, tmp_path: Path) -> None:
    body = b'{"q":"a\\"b"}\n\r\t\x00\x1f \xff\xfe caf\xc3\xa9 \xe2\x80\xa8 </script>'
    r, w = await connect(app)
    w.write(post("/collect", body, b'User-Agent: x"y\\z\tq \xc3\xa9\xff\r\nCookie: s="a b"\r\n'))
    await w.drain()
    assert (await read_response(r)).status == 200
    w.close()
    await app.shutdown()
    raw = b"".join(
        gzip.decompress(p.read_bytes()) for p in (tmp_path / "data" / "lake").rglob("*.jsonl.gz")
    )
    # one line, whatever the body held
    assert raw.count(b"\n") == 1
    assert raw.endswith(b"\n")
    (rec,) = lake_records(tmp_path / "data" / "lake")
    assert rec["body"] == body.decode("utf-8", "replace")
    assert rec["user_agent"] == 'x"y\\z\tq \xe9\ufffd'
    assert rec["cookie"] == 's="a b"'


async def test_pipelined_requests_are_answered_in_order(app: App) -> None:
    r, w = await connect(app)
    w.write(
        post("/collect", b"1")
        + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"PUT /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        + post("/collect", b"2")
    )
    await w.drain()
    statuses = [(await read_response(r)).status for _ in range(4)]
    assert statuses == [200, 200, 405, 200]
    w.close()


async def test_chunked_body(app: App, tmp_path: Path) -> None:
    r, w = await connect(app)
    w.write(
        b"POST /collect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    await w.drain()
    assert (await read_response(r)).status == 200
    w.close()
    await app.shutdown()
    assert [x["body"] for x in lake_records(tmp_path / "data" / "lake")] == ["hello world"]


async def test_chunked_body_over_limit_is_413(app: App, tmp_path: Path) -> None:
    r, w = await connect(app)
    w.write(b"POST /collect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(5):
        w.write(b"12c\r\n" + b"x" * 300 + b"\r\n")
    await w.drain()
    resp = await read_response(r)
    assert resp.status == 413
    assert b"BODY_TOO_LARGE" in resp.body
    assert await closed_by_server(r)
    await app.shutdown()
    assert lake_records(tmp_path / "data" / "lake") == []


async def test_content_length_over_limit_is_413_before_the_body(app: App) -> None:
    r, w = await connect(app)
    w.write(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n")
    await w.drain()
    resp = await read_response(r)
    assert resp.status == 413
    assert resp.headers["connection"] == "close"
    m = app.metrics
    m.flush()
    assert m.registry.get_sample_value("http_requests_rejected_body_too_large_total") == 1


@pytest.mark.parametrize(
    ("length", "status"),
    [(b"1000", 200), (b"999", 200), (b"0001000", 200), (b"00001001", 413), (b"99999", 413)],
)
async def test_content_length_at_the_limit(app: App, length: bytes, status: int) -> None:
    r, w = await connect(app)
    n = int(length)
    body = b"x" * n if status == 200 else b""
    w.write(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n" + body)
    await w.drain()
    assert (await read_response(r)).status == status


async def test_expect_100_continue(app: App, tmp_path: Path) -> None:
    r, w = await connect(app)
    w.write(
        b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    await w.drain()
    assert await asyncio.wait_for(r.readline(), 5) == b"HTTP/1.1 100 Continue\r\n"
    assert await r.readline() == b"\r\n"
    w.write(b"data")
    await w.drain()
    assert (await read_response(r)).status == 200
    w.close()


async def test_expect_100_continue_too_large_is_refused_first(app: App) -> None:
    r, w = await connect(app)
    w.write(
        b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
    )
    await w.drain()
    assert (await read_response(r)).status == 413


async def test_http10_closes_unless_keep_alive(app: App) -> None:
    r, w = await connect(app)
    w.write(b"POST /collect HTTP/1.0\r\nContent-Length: 1\r\n\r\na")
    await w.drain()
    resp = await read_response(r)
    assert resp.status == 200
    assert resp.headers["connection"] == "close"
    assert await closed_by_server(r)
    r, w = await connect(app)
    w.write(b"POST /collect HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\na")
    w.write(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    await w.drain()
    assert (await read_response(r)).headers["connection"] == "keep-alive"
    assert (await read_response(r)).status == 200
    w.close()


async def test_connection_close_is_honoured(app: App) -> None:
    r, w = await connect(app)
    w.write(post("/collect", b"x", b"Connection: close\r\n"))
    await w.drain()
    assert (await read_response(r)).headers["connection"] == "close"
    assert await closed_by_server(r)


async def test_head_limits(app: App) -> None:
    r, w = await connect(app)
    w.write(b"GET /collect HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n")
    await w.drain()
    assert (await read_response(r)).status == 431
    r, w = await connect(app)
    w.write(b"GET /collect?" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    await w.drain()
    assert (await read_response(r)).status == 414


async def test_trickled_head_is_cut_off(app: App) -> None:
    assert app.address is not None
    addr = app.address
    loop = asyncio.get_running_loop()

    def trickle() -> bytes:
        with socket.create_connection(addr, timeout=5) as s:
            s.sendall(b"GET /collect HTTP/1.1\r\nHost: x\r\n")
            with contextlib.suppress(OSError):
                for _ in range(30):
                    s.sendall(b"X-Pad: " + b"b" * 100 + b"\r\n")
                    time.sleep(0.005)
            return s.recv(4096)

    answer = await loop.run_in_executor(None, trickle)
    assert answer.startswith(b"HTTP/1.1 431 ")


async def test_slow_head_gets_408(app: App) -> None:
    r, w = await connect(app)
    w.write(b"POST /collect HTTP/1.1\r\nHost: x\r\n")
    await w.drain()
    t0 = time.monotonic()
    resp = await asyncio.wait_for(read_response(r), 10)
    assert resp.status == 408
    assert 0.9 <= time.monotonic() - t0 <= 4
    assert await closed_by_server(r)


async def test_slow_body_gets_408(app: App, tmp_path: Path) -> None:
    r, w = await connect(app)
    w.write(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    await w.drain()
    resp = await asyncio.wait_for(read_response(r), 10)
    assert resp.status == 408
    await app.shutdown()
    assert lake_records(tmp_path / "data" / "lake") == []


async def test_idle_keep_alive_is_closed(app: App) -> None:
    r, w = await connect(app)
    w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    await w.drain()
    assert (await read_response(r)).status == 200
    t0 = time.monotonic()
    assert await closed_by_server(r)
    assert time.monotonic() - t0 >= 1.5


async def test_malformed_request_is_400(app: App) -> None:
    r, w = await connect(app)
    w.write(b"THIS IS NOT HTTP\r\n\r\n")
    await w.drain()
    resp = await read_response(r)
    assert resp.status == 400
    assert b"BAD_REQUEST" in resp.body


async def test_routes_methods_and_preflight(app: App) -> None:
    r, w = await connect(app)
    w.write(
        b"OPTIONS /collect HTTP/1.1\r\nHost: x\r\nOrigin: https://a.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type, x-trace\r\n\r\n"
    )
    w.write(b"DELETE /collect HTTP/1.1\r\nHost: x\r\n\r\n")
    w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    w.write(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    w.write(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
    await w.drain()
    pre = await read_response(r)
    assert pre.status == 204
    assert pre.headers["access-control-allow-origin"] == "*"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert pre.headers["access-control-allow-headers"] == "content-type, x-trace"
    bad = await read_response(r)
    assert bad.status == 405
    assert bad.headers["allow"] == "GET, POST, OPTIONS"
    assert (await read_response(r)).body == b'{"status":"ok"}'
    ready = await read_response(r)
    assert ready.status == 200
    assert ready.body == b'{"ready":true}'  # the details are on the admin listener
    metrics = await read_response(r)
    assert metrics.status == 404  # /metrics moved to the admin listener
    assert metrics.headers["connection"] == "close"


async def test_queue_full_is_503_with_retry_after_and_counted(tmp_path: Path) -> None:
    from tests.fakes import MemorySink

    sink = MemorySink()
    sink.delay = 30  # the lake hangs: batches back up
    app = await start_app(
        tmp_path,
        sink=sink,
        channel_size=4,
        batch_size=1,
        upload_queue=1,
        upload_concurrency=1,
        shutdown_timeout="1s",
    )
    r, w = await connect(app)
    statuses = []
    for i in range(40):
        w.write(post("/collect", b"%d" % i))
        await w.drain()
        statuses.append((await read_response(r)).status)
        await asyncio.sleep(0.01)
    assert 503 in statuses
    assert statuses.count(200) >= 4
    i = statuses.index(503)
    w.write(post("/collect", b"again"))
    await w.drain()
    resp = await read_response(r)
    assert resp.status == 503
    assert int(resp.headers["retry-after"]) >= 1
    app.metrics.flush()
    reg = app.metrics.registry
    assert (
        reg.get_sample_value("http_requests_rejected_queue_full_total") == statuses.count(503) + 1
    )
    assert reg.get_sample_value("http_requests_accepted_total") == statuses.count(200)
    assert i > 0
    # /ready answers 503 while the queue is full: a probe is not a rejected request
    w.write(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    await w.drain()
    assert (await read_response(r)).status == 503
    # which queue is full: the raw one, not the events one
    app.metrics.flush()
    assert reg.get_sample_value("event_queue_events", {"dataset": "raw"}) == 4
    assert reg.get_sample_value("event_queue_events", {"dataset": "events"}) == 0
    assert reg.get_sample_value("event_queue_capacity", {"dataset": "raw"}) == 4
    await close_all()
    await app.shutdown()
    reg_after = app.metrics.registry
    assert (
        reg_after.get_sample_value("http_requests_rejected_queue_full_total")
        == statuses.count(503) + 1
    )
    assert reg_after.get_sample_value(
        "http_requests_refused_total", {"route": "collect", "reason": "draining"}
    ) in (None, 0.0)
