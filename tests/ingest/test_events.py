"""POST /api/v1/analytics/events: every row of the contract, in order, against a real listener."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from estat.app import App
from tests.fakes import MemorySink
from tests.ingest.helpers import (
    Response,
    close_all,
    connect,
    lake_records,
    read_response,
    start_app,
)

PATH = "/api/v1/analytics/events"
SECRET = "s3cret-for-tests-and-long-enough-for-hs256"


def ev(i: int | str = 1, name: str = "ui.page.viewed", **kw: Any) -> dict[str, Any]:
    return {"eventId": f"e-{i}", "eventName": name, **kw}


async def send(
    app: App, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    head = "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()).encode()
    r, w = await connect(app)
    w.write(
        b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n"
        % (PATH.encode(), len(raw), head)
        + raw
    )
    await w.drain()
    resp = await read_response(r)
    return resp


def code(resp: Response) -> str:
    return str(json.loads(resp.body)["code"])


@pytest.fixture
async def app(tmp_path: Path):  # type: ignore[no-untyped-def]
    a = await start_app(
        tmp_path,
        analytics_rate_limit_max_requests=5,
        auth_jwt_secret=SECRET,
        analytics_max_body_size=64 * 1024,
        analytics_max_decompressed_size=256 * 1024,
    )
    yield a
    await close_all()
    if not a.draining:
        await a.shutdown()


async def events_in_lake(app: App, tmp_path: Path) -> list[dict[str, Any]]:
    await close_all()
    await app.shutdown()
    return lake_records(tmp_path / "data" / "lake" / "events")


async def test_accepted_with_defaults(app: App, tmp_path: Path) -> None:
    resp = await send(
        app,
        {
            "anonymousId": "anon-1",
            "events": [
                ev(1, properties={"page": "/x", "": "blank", "gone": None, "n": 3}),
                ev(2, "ui.tab.changed", eventVersion="v2", occurredAt="2026-01-02T03:04:05+09:00"),
            ],
        },
        {"User-Agent": "Browser/1", "X-Forwarded-For": "81.2.69.160"},
    )
    assert resp.status == 200
    assert json.loads(resp.body) == {"acceptedCount": 2}
    assert resp.headers["access-control-allow-origin"] == "*"
    recs = await events_in_lake(app, tmp_path)
    assert len(recs) == 2
    a, b = recs
    assert a["event_id"] == "e-1"
    assert a["event_version"] == "v1"
    assert a["occurred_at"] == a["received_at"]
    assert a["properties"] == {"page": "/x", "n": 3, "source": "CLIENT"}
    assert a["source"] == "CLIENT"
    assert a["anonymous_id"] == "anon-1"
    assert a["member_id"] is None
    assert a["ip"] == "81.2.69.160"
    assert a["user_agent"] == "Browser/1"
    assert b["event_version"] == "v2"
    assert b["occurred_at"] == "2026-01-01T18:04:05.000Z"
    keys = [
        p.relative_to(tmp_path / "data" / "lake").parts[0]
        for p in (tmp_path / "data" / "lake").rglob("*.jsonl.gz")
    ]
    assert keys == ["events"]


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ({"anonymousId": "a", "events": []}, 400, "ANALYTICS_INGEST_EMPTY_BATCH"),
        ({"anonymousId": "a"}, 400, "ANALYTICS_INGEST_EMPTY_BATCH"),
        ({"events": []}, 400, "ANALYTICS_INGEST_EMPTY_BATCH"),  # empty beats missing identity
        (
            {"anonymousId": "a", "events": [ev(i) for i in range(51)]},
            400,
            "ANALYTICS_INGEST_BATCH_LIMIT_EXCEEDED",
        ),
        ({"events": [ev()]}, 400, "ANALYTICS_INGEST_ANONYMOUS_ID_REQUIRED"),
        (
            {"anonymousId": "a", "events": [ev(1, "ui.evil")]},
            400,
            "ANALYTICS_INGEST_EVENT_NOT_ALLOWED",
        ),
        (
            {"anonymousId": "a", "events": [{"eventName": "ui.page.viewed"}]},
            400,
            "ANALYTICS_INGEST_INVALID_EVENT",
        ),
        ({"anonymousId": "a", "events": [ev("x" * 65)]}, 400, "ANALYTICS_INGEST_INVALID_EVENT"),
        ({"anonymousId": "a", "events": [ev(1, "u" * 101)]}, 400, "ANALYTICS_INGEST_INVALID_EVENT"),
        (
            {"anonymousId": "a", "events": [ev(1, occurredAt="yesterday")]},
            400,
            "ANALYTICS_INGEST_INVALID_EVENT",
        ),
        (
            {"anonymousId": "a", "events": [ev(1, properties=[1, 2])]},
            400,
            "ANALYTICS_INGEST_INVALID_EVENT",
        ),
        ({"anonymousId": "a", "events": "nope"}, 400, "ANALYTICS_INGEST_INVALID_EVENT"),
        ({"anonymousId": 7, "events": [ev()]}, 400, "ANALYTICS_INGEST_INVALID_EVENT"),
        (
            {
                "anonymousId": "a",
                "events": [
                    ev(
                        1,
                        properties={"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}},
                    )
                ],
            },
            400,
            "ANALYTICS_INGEST_INVALID_EVENT",
        ),
        (
            {"anonymousId": "a", "events": [ev(1, properties={"big": "x" * 40000})]},
            400,
            "ANALYTICS_INGEST_INVALID_EVENT",
        ),
        (b"{not json", 400, "ANALYTICS_INGEST_MALFORMED_JSON"),
        (
            b'{"anonymousId":"a","events":[{"eventId":"1","eventName":"ui.page.viewed","properties":{"x":NaN}}]}',
            400,
            "ANALYTICS_INGEST_MALFORMED_JSON",
        ),
        (b'{"anonymousId":"\xff\xfe","events":[]}', 400, "ANALYTICS_INGEST_INVALID_ENCODING"),
    ],
)
async def test_rejections(app: App, tmp_path: Path, body: Any, status: int, expected: str) -> None:
    resp = await send(app, body)
    assert resp.status == status
    assert code(resp) == expected
    assert "message" in json.loads(resp.body)
    assert await events_in_lake(app, tmp_path) == []


async def test_anonymous_id_header_fallback(app: App, tmp_path: Path) -> None:
    resp = await send(app, {"events": [ev()]}, {"X-Anonymous-Id": "hdr-anon"})
    assert resp.status == 200
    (rec,) = await events_in_lake(app, tmp_path)
    assert rec["anonymous_id"] == "hdr-anon"


async def test_rate_limit_per_identity_then_order(app: App) -> None:
    statuses = [
        (await send(app, {"anonymousId": "busy", "events": [ev(i)]})).status for i in range(7)
    ]
    assert statuses == [200] * 5 + [429] * 2
    resp = await send(app, {"anonymousId": "busy", "events": [ev(9, "ui.evil")]})
    assert resp.status == 429  # the rate limit is checked before the allowlist
    assert code(resp) == "ANALYTICS_INGEST_RATE_LIMIT_EXCEEDED"
    assert 1 <= int(resp.headers["retry-after"]) <= 60
    resp = await send(app, {"anonymousId": "busy", "events": [ev(i) for i in range(51)]})
    assert code(resp) == "ANALYTICS_INGEST_BATCH_LIMIT_EXCEEDED"  # before the rate limit
    assert (await send(app, {"anonymousId": "calm", "events": [ev()]})).status == 200
    app.metrics.flush()
    assert app.metrics.registry.get_sample_value("analytics_ingest_rate_limited_total") == 3


async def test_member_identity_from_a_signed_jwt(app: App, tmp_path: Path) -> None:
    token = jwt.encode(
        {"sub": "member-42", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"
    )
    resp = await send(app, {"events": [ev()]}, {"Authorization": f"Bearer {token}"})
    assert resp.status == 200
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    resp = await send(
        app, {"anonymousId": "a", "events": [ev(2)]}, {"Authorization": f"Bearer {tampered}"}
    )
    assert resp.status == 401
    assert code(resp) == "ANALYTICS_INGEST_INVALID_TOKEN"
    expired = jwt.encode({"sub": "m", "exp": int(time.time()) - 10}, SECRET, algorithm="HS256")
    assert (
        await send(app, {"events": [ev(3)]}, {"Authorization": f"Bearer {expired}"})
    ).status == 401
    other = jwt.encode(
        {"sub": "m"}, "another-secret-that-is-also-long-enough-ok", algorithm="HS256"
    )
    assert (
        await send(app, {"events": [ev(4)]}, {"Authorization": f"Bearer {other}"})
    ).status == 401
    # a subject longer than the store keeps whole: refused, never cut to another member's
    long_sub = jwt.encode({"sub": "m" * 256}, SECRET, algorithm="HS256")
    resp = await send(app, {"events": [ev(5)]}, {"Authorization": f"Bearer {long_sub}"})
    assert (resp.status, code(resp)) == (401, "ANALYTICS_INGEST_INVALID_TOKEN")
    (rec,) = await events_in_lake(app, tmp_path)
    assert rec["member_id"] == "member-42"
    assert rec["anonymous_id"] is None


async def test_rs256_public_key(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    app = await start_app(tmp_path, auth_jwt_public_key=pem)
    token = jwt.encode({"sub": "rsa-member"}, key, algorithm="RS256")
    assert (await send(app, {"events": [ev()]}, {"Authorization": f"Bearer {token}"})).status == 200
    hs = jwt.encode({"sub": "x"}, "guess-guess-guess-guess-guess-guess", algorithm="HS256")
    assert (await send(app, {"events": [ev()]}, {"Authorization": f"Bearer {hs}"})).status == 401
    (rec,) = await events_in_lake(app, tmp_path)
    assert rec["member_id"] == "rsa-member"


async def test_transport_gzip_types_and_limits(app: App, tmp_path: Path) -> None:
    body = json.dumps({"anonymousId": "g", "events": [ev("gz")]}).encode()
    ok = await send(app, gzip.compress(body), {"Content-Encoding": "gzip"})
    assert ok.status == 200
    beacon = await send(
        app,
        json.dumps({"anonymousId": "g", "events": [ev("beacon")]}).encode(),
        {"Content-Type": "text/plain;charset=UTF-8"},
    )
    assert beacon.status == 200
    bomb = gzip.compress(b"{" + b" " * 5_000_000 + b"}")
    resp = await send(app, bomb, {"Content-Encoding": "gzip"})
    assert (resp.status, code(resp)) == (413, "ANALYTICS_INGEST_BODY_TOO_LARGE")
    resp = await send(app, gzip.compress(body)[:-9], {"Content-Encoding": "gzip"})
    assert (resp.status, code(resp)) == (400, "ANALYTICS_INGEST_INVALID_ENCODING")
    for enc in ("br", "gzip, gzip", "deflate"):
        resp = await send(app, body, {"Content-Encoding": enc})
        assert (resp.status, code(resp)) == (415, "ANALYTICS_INGEST_UNSUPPORTED_ENCODING"), enc
    resp = await send(app, gzip.compress(gzip.compress(body)), {"Content-Encoding": "gzip"})
    assert resp.status == 400  # a gzip inside the gzip is not JSON
    resp = await send(app, body, {"Content-Type": "text/xml"})
    assert (resp.status, code(resp)) == (415, "ANALYTICS_INGEST_UNSUPPORTED_MEDIA_TYPE")
    resp = await send(app, b"x" * (64 * 1024 + 1))
    assert (resp.status, code(resp)) == (413, "ANALYTICS_INGEST_BODY_TOO_LARGE")
    recs = await events_in_lake(app, tmp_path)
    assert sorted(r["event_id"] for r in recs) == ["e-beacon", "e-gz"]


async def test_cors_preflight_and_restricted_origins(tmp_path: Path) -> None:
    app = await start_app(tmp_path, cors_allow_origins="https://shop.example")
    r, w = await connect(app)
    w.write(
        f"OPTIONS {PATH} HTTP/1.1\r\nHost: t\r\nOrigin: https://shop.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type, authorization\r\n\r\n".encode()
    )
    await w.drain()
    pre = await read_response(r)
    assert pre.status == 204
    assert pre.headers["access-control-allow-origin"] == "https://shop.example"
    assert pre.headers["access-control-allow-methods"] == "POST, OPTIONS"
    assert pre.headers["access-control-allow-headers"] == "content-type, authorization"
    assert "access-control-allow-credentials" not in pre.headers
    resp = await send(
        app, {"anonymousId": "a", "events": [ev()]}, {"Origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in resp.headers
    resp = await send(
        app, {"anonymousId": "a", "events": [ev(2)]}, {"Origin": "https://shop.example"}
    )
    assert resp.headers["access-control-allow-origin"] == "https://shop.example"
    await close_all()
    await app.shutdown()


async def test_pipeline_full_is_503_unavailable(tmp_path: Path) -> None:
    sink = MemorySink()
    sink.delay = 30
    app = await start_app(
        tmp_path,
        sink=sink,
        events_channel_size=3,
        batch_size=1,
        upload_queue=1,
        upload_concurrency=1,
        shutdown_timeout="1s",
    )
    statuses = []
    for i in range(20):
        resp = await send(app, {"anonymousId": f"a{i}", "events": [ev(i)]})
        statuses.append(resp.status)
        if resp.status == 503:
            assert code(resp) == "ANALYTICS_INGEST_UNAVAILABLE"
            assert int(resp.headers["retry-after"]) >= 1
    assert 503 in statuses
    await close_all()
    await app.shutdown()


async def test_deferred_answers_keep_pipelined_order(tmp_path: Path, redis_server: Any) -> None:
    app = await start_app(tmp_path, rate_limit_redis_url=redis_server.url)
    one = json.dumps({"anonymousId": "p1", "events": [ev(1)]}).encode()
    two = json.dumps({"anonymousId": "p2", "events": [ev(2), ev(3)]}).encode()
    r, w = await connect(app)
    w.write(
        b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
        % (PATH.encode(), len(one), one)
        + b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
        + b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
        % (PATH.encode(), len(two), two)
        + b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    await w.drain()
    bodies = [(await read_response(r)).body for _ in range(4)]
    assert bodies[0] == b'{"acceptedCount":1}'
    assert bodies[1] == b'{"status":"ok"}'
    assert bodies[2] == b'{"acceptedCount":2}'
    assert b"NOT_FOUND" in bodies[3]
    recs = await events_in_lake(app, tmp_path)
    assert sorted(x["event_id"] for x in recs) == ["e-1", "e-2", "e-3"]


async def test_a_full_publish_queue_refuses_before_parsing_and_both_queues_stay_consistent(
    tmp_path: Path,
) -> None:
    """The publish queue (events bound for the bus) full: 503 with
    Retry-After at the cost of the headers (a malformed body is not even
    read), and nothing of a refused request reaches the lake or the bus."""
    a = await start_app(tmp_path, mq_publish_queue_size=60, mq_publish_batch_size=1)
    try:
        assert a.activity is not None
        pub = a.activity.publisher
        assert pub is not None
        ok = await send(a, {"anonymousId": "x", "events": [ev(i) for i in range(5)]})
        assert ok.status == 200
        stuck = asyncio.Event()

        async def hang(messages: Any) -> None:  # a bus that never answers
            await stuck.wait()

        a.activity.bus.publish = hang  # type: ignore[union-attr, method-assign]
        pub.put([a_record(i) for i in range(30)])  # 8 in flight, 22 queued: 22 + 50 > 60
        await asyncio.sleep(0.05)
        assert pub.queued == 22
        refused = await send(a, b"{not json")
        assert refused.status == 503
        assert code(refused) == "ANALYTICS_INGEST_UNAVAILABLE"
        assert "retry-after" in refused.headers
        before = a.events_pipeline.queue.events
        assert (await send(a, {"anonymousId": "x", "events": [ev("z")]})).status == 503
        assert a.events_pipeline.queue.events == before
        stuck.set()
    finally:
        await close_all()
        await a.shutdown()


def a_record(i: int) -> Any:
    import msgspec

    from estat.model import EventRecord

    return EventRecord(
        f"q-{i}",
        "ui.page.viewed",
        "v1",
        "2026-11-30T00:00:00.000Z",
        "2026-11-30T00:00:00.000Z",
        None,
        "x",
        msgspec.Raw(b"{}"),
        "CLIENT",
        "",
        "",
    )
