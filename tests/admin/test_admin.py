"""The admin listener: its own port, scoped tokens, the audit log, seed
004's routes, on a real in-process estat (uvicorn on a free port)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from sqlalchemy import select, update

from estat.admin.context import ADMIN_PREFIX
from estat.app import App
from estat.model import EventRecord
from estat.store.schema import admin_audit_log, user_activity_event, user_activity_source_outbox
from tests.conftest import free_port
from tests.ingest.helpers import close_all, connect, read_response, start_app

TOKENS = {name: f"estat_test_{name}_{'x' * 20}" for name in ("reader", "replayer", "operator")}
SCOPES = {"reader": "read", "replayer": "read+replay", "operator": "operate"}
ENTRIES = ",".join(
    f"{n}:{SCOPES[n]}:{hashlib.sha256(t.encode()).hexdigest()}" for n, t in TOKENS.items()
)


def auth(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {TOKENS[name]}"}


def rec(name: str = "ui.page.viewed") -> EventRecord:
    import uuid

    import msgspec

    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return EventRecord(
        uuid.uuid4().hex, name, "1", now, now, None, "anon-1",
        msgspec.Raw(b'{"k":1}'), "SERVER", "127.0.0.1", "ua",
    )  # fmt: skip


class Admin:
    def __init__(self, app: App, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    app = await start_app(
        tmp_path, admin_addr=f"127.0.0.1:{free_port()}", admin_tokens=ENTRIES,
        outbox_poll_interval="1h", mq_trace="all",
    )  # fmt: skip
    assert app.admin is not None
    assert app.admin.address is not None
    host, port = app.admin.address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as client:
        yield Admin(app, client)
    await close_all()
    await app.shutdown()


def admin_routes(app: App) -> list[tuple[str, str, str]]:
    """(method, path, scope) of every token-protected route, from the app itself."""
    assert app.admin is not None
    fastapi_app = app.admin.app
    out = []
    for r in fastapi_app.routes:
        if isinstance(r, APIRoute) and (r.openapi_extra or {}).get("x-scope"):
            for method in r.methods or ():
                out.append((method, r.path, r.openapi_extra["x-scope"]))  # type: ignore[index]
    return out


async def test_every_admin_route_needs_a_token_with_its_scope(admin: Admin) -> None:
    assert admin.app.admin is not None
    admin.app.admin.app.state.ctx.auth.allowed = 1000  # many refusals on purpose
    routes = admin_routes(admin.app)
    paths = {p for _, p, _ in routes}
    assert f"{ADMIN_PREFIX}/user-activity/outbox/summary" in paths
    assert f"{ADMIN_PREFIX}/user-activity/outbox/replay" in paths
    assert f"{ADMIN_PREFIX}/mq-traces" in paths
    assert f"{ADMIN_PREFIX}/audit" in paths
    assert f"{ADMIN_PREFIX}/workers/{{name}}/{{action}}" in paths
    assert f"{ADMIN_PREFIX}/dlq/replay" in paths
    assert f"{ADMIN_PREFIX}/dispatch/replay" in paths
    assert f"{ADMIN_PREFIX}/dispatch/circuits/{{target}}/reset" in paths
    assert f"{ADMIN_PREFIX}/dispatch/discard" in paths
    assert "/openapi.json" in paths
    params = {"messageId": "m", "limit": "1", "target": "RETIRED"}
    for method, template, scope in routes:
        path = template.replace("{name}", "relay").replace("{action}", "resume")
        path = path.replace("{target}", "POSTHOG")
        r = await admin.client.request(method, path, params=params)
        assert r.status_code == 401, (method, path)
        assert r.json()["code"] == "ADMIN_TOKEN_REQUIRED"
        assert r.headers["www-authenticate"] == "Bearer"
        r = await admin.client.request(
            method, path, params=params, headers={"authorization": "Bearer wrong"}
        )
        assert r.status_code == 401, (method, path)
        assert r.json()["code"] == "ADMIN_TOKEN_INVALID"
        lacking = "operator" if scope != "operate" else "reader"
        r = await admin.client.request(method, path, params=params, headers=auth(lacking))
        assert r.status_code == 403, (method, path)
        assert r.json()["code"] == "ADMIN_SCOPE_REQUIRED"
        holder = {"read": "reader", "replay": "replayer", "operate": "operator"}[scope]
        r = await admin.client.request(method, path, params=params, headers=auth(holder))
        assert r.status_code < 400, (method, path, r.text)


async def test_ops_routes_answer_without_a_token(admin: Admin) -> None:
    assert (await admin.client.get("/health")).json() == {"status": "ok"}
    ready = await admin.client.get("/ready")
    assert ready.status_code == 200
    detail = ready.json()
    assert detail["ready"] is True
    assert {"lake", "dlq", "queueHasRoom", "database", "bus"} <= set(detail)
    assert detail["dlqDisk"] in ("ok",) or detail["dlqDisk"].startswith("low: ")
    assert "destinations" not in detail  # no destination configured
    text = await admin.client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    assert "http_requests_accepted_total" in text.text
    om = await admin.client.get("/metrics", headers={"accept": "application/openmetrics-text"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")


async def test_the_ingest_openapi_document_is_on_the_admin_listener(admin: Admin) -> None:
    doc = (await admin.client.get("/openapi.json", headers=auth("reader"))).json()
    assert doc["openapi"].startswith("3.")
    post = doc["paths"]["/api/v1/analytics/events"]["post"]
    assert "ANALYTICS_INGEST_RATE_LIMIT_EXCEEDED" in json.dumps(post["responses"]["429"])
    assert doc["components"]["schemas"]["ClientEvent"]["properties"]["eventId"]["maxLength"] == 64
    own = (await admin.client.get(f"{ADMIN_PREFIX}/openapi.json", headers=auth("reader"))).json()
    replay = own["paths"][f"{ADMIN_PREFIX}/user-activity/outbox/replay"]["post"]
    assert replay["x-scope"] == "replay"
    assert {p["name"] for p in replay["parameters"]} >= {
        "limit",
        "dryRun",
        "eventName",
        "from",
        "to",
    }


async def test_out_of_range_parameters_are_400_never_clamped(admin: Admin) -> None:
    c = admin.client
    replay = f"{ADMIN_PREFIX}/user-activity/outbox/replay"
    for params in ({"limit": "0"}, {"limit": "501"}, {"limit": "x"}, {"from": "yesterday"}):
        r = await c.post(replay, params=params, headers=auth("replayer"))
        assert r.status_code == 400, params
        assert r.json()["code"] == "ADMIN_INVALID_PARAMETER"
    for params in ({"messageId": "m", "limit": "201"}, {"limit": "5"}):
        r = await c.get(f"{ADMIN_PREFIX}/mq-traces", params=params, headers=auth("reader"))
        assert r.status_code == 400, params
        assert r.json()["code"] == "ADMIN_INVALID_PARAMETER"


async def test_summary_and_replay_with_filters_publish_and_store_once(admin: Admin) -> None:
    activity = admin.app.activity
    assert activity is not None
    box = activity.outbox
    failed = [rec("order.completed") for _ in range(5)] + [rec("ui.clicked") for _ in range(3)]
    box.enqueue(failed, status="FAILED", next_retry_at=None, last_error="bus down")
    # two of them were created long ago (outside the range replayed below)
    old = datetime.now(UTC) - timedelta(days=2)
    with box.db.engine.begin() as conn:
        conn.execute(
            update(user_activity_source_outbox)
            .where(
                user_activity_source_outbox.c.event_id.in_([failed[0].event_id, failed[1].event_id])
            )
            .values(created_at=old, retry_count=3)
        )
    c = admin.client
    summary = f"{ADMIN_PREFIX}/user-activity/outbox/summary"
    replay = f"{ADMIN_PREFIX}/user-activity/outbox/replay"
    s = (await c.get(summary, headers=auth("reader"))).json()
    assert s == {
        "pendingCount": 0, "failedCount": 8, "publishedCount": 0, "maxRetryCount": 3,
        "publishedCountEstimated": False,
    }  # fmt: skip
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    dry = await c.post(
        replay, params={"dryRun": "true", "eventName": "order.completed", "from": since},
        headers=auth("replayer"),
    )  # fmt: skip
    assert dry.json() == {"processedCount": 3, "successCount": 0, "failedCount": 0, "dryRun": True}
    assert (await c.get(summary, headers=auth("reader"))).json()["failedCount"] == 8  # counted only
    r = await c.post(
        replay, params={"limit": 2, "eventName": "order.completed", "from": since},
        headers=auth("replayer"),
    )  # fmt: skip
    assert r.json() == {"processedCount": 2, "successCount": 2, "failedCount": 0, "dryRun": False}
    s = (await c.get(summary, headers=auth("reader"))).json()
    assert (s["failedCount"], s["publishedCount"]) == (6, 2)
    r = await c.post(replay, params={"limit": 500}, headers=auth("replayer"))
    assert r.json()["successCount"] == 6
    s = (await c.get(summary, headers=auth("reader"))).json()
    assert (s["failedCount"], s["publishedCount"]) == (0, 8)

    def stored() -> list[str]:
        with box.db.engine.connect() as conn:
            return [row[0] for row in conn.execute(select(user_activity_event.c.event_id))]

    for _ in range(200):
        if len(stored()) >= 8:
            break
        await asyncio.sleep(0.05)
    assert sorted(stored()) == sorted(r.event_id for r in failed)  # once each


async def test_traces_newest_first(admin: Admin) -> None:
    activity = admin.app.activity
    assert activity is not None
    assert activity.trace is not None
    from estat.store.outbox import utcnow

    t = utcnow(datetime.now(UTC).timestamp())
    activity.trace.add("PUBLISH", "msg-1", "k", t)
    activity.trace.add("CONSUME_FAIL", "msg-1", "k", t, 12, "boom")
    activity.trace.add("CONSUME_SUCCESS", "msg-1", "k", t, 3)
    activity.trace.flush()
    r = await admin.client.get(
        f"{ADMIN_PREFIX}/mq-traces",
        params={"messageId": "msg-1", "limit": 2},
        headers=auth("reader"),
    )
    rows = r.json()
    assert [x["stage"] for x in rows] == ["CONSUME_SUCCESS", "CONSUME_FAIL"]
    assert rows[1]["errorMessage"] == "boom"
    assert rows[0]["messageId"] == "msg-1"


async def test_every_call_is_audited_and_the_token_is_never_written(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    c = admin.client
    await c.get(f"{ADMIN_PREFIX}/user-activity/outbox/summary")  # refused: no token
    await c.post(f"{ADMIN_PREFIX}/user-activity/outbox/replay", headers=auth("reader"))  # 403
    ok = await c.post(
        f"{ADMIN_PREFIX}/user-activity/outbox/replay", params={"dryRun": "true", "limit": 7},
        headers=auth("replayer"),
    )  # fmt: skip
    assert ok.status_code == 200
    activity = admin.app.activity
    assert activity is not None
    with activity.db.engine.connect() as conn:
        rows = [
            dict(r._mapping)
            for r in conn.execute(select(admin_audit_log).order_by(admin_audit_log.c.id))
        ]
    assert [(r["token_name"], r["status"]) for r in rows] == [
        (None, 401),
        ("reader", 403),
        ("replayer", 200),
    ]
    assert rows[2]["route"] == f"{ADMIN_PREFIX}/user-activity/outbox/replay"
    assert rows[2]["parameters"] == {"dryRun": "true", "limit": "7"}
    assert rows[2]["effect"]["dryRun"] is True
    assert all(r["client"] == "127.0.0.1" for r in rows)
    listed = (
        await c.get(f"{ADMIN_PREFIX}/audit", params={"limit": 3}, headers=auth("reader"))
    ).json()
    assert [x["status"] for x in listed] == [
        200,
        403,
        401,
    ]  # newest first (this call is not in yet)
    logged = capsys.readouterr().out  # the structured log (stdout)
    assert logged.count("admin call") >= 4
    everything = json.dumps([str(r) for r in rows]) + json.dumps(listed) + logged
    for token in TOKENS.values():
        assert token not in everything


async def test_failed_authentications_are_limited_per_address(admin: Admin) -> None:
    c = admin.client
    path = f"{ADMIN_PREFIX}/user-activity/outbox/summary"
    codes = [
        (await c.get(path, headers={"authorization": f"Bearer bad{i}"})).status_code
        for i in range(12)
    ]
    assert codes[:10] == [401] * 10
    assert codes[10:] == [429, 429]
    r = await c.get(path, headers=auth("reader"))  # even a good token waits out the window
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    m = admin.app.metrics.registry
    assert m.get_sample_value("admin_auth_failures_total", {"code": "ADMIN_TOKEN_INVALID"}) == 10
    assert m.get_sample_value("admin_auth_failures_total", {"code": "ADMIN_TOO_MANY_FAILURES"}) == 3
    # the ops routes never need a token, so they are not limited
    assert (await c.get("/metrics")).status_code == 200


async def test_without_tokens_only_health_ready_and_metrics_answer(tmp_path: Path) -> None:
    app = await start_app(tmp_path, admin_addr=f"127.0.0.1:{free_port()}")
    try:
        assert app.admin is not None
        assert app.admin.address is not None
        host, port = app.admin.address
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as c:
            for path in ("/health", "/ready", "/metrics"):
                assert (await c.get(path)).status_code == 200, path
            r = await c.get("/openapi.json", headers={"authorization": "Bearer anything"})
            assert r.status_code == 401
            assert r.json()["code"] == "ADMIN_TOKEN_REQUIRED"
    finally:
        await app.shutdown()


def test_a_non_loopback_admin_address_needs_tokens(tmp_path: Path) -> None:
    from estat.errors import ConfigError
    from estat.settings import load_settings

    with pytest.raises(ConfigError, match="ADMIN_ADDR"):
        load_settings(data_dir=tmp_path, admin_addr="0.0.0.0:8081")
    s = load_settings(data_dir=tmp_path, admin_addr="0.0.0.0:8081", admin_tokens=ENTRIES)
    assert [e.name for e in s.admin_token_entries] == ["reader", "replayer", "operator"]
    f = tmp_path / "tokens"
    f.write_text(f"# on-call\noncall:read:{'ab' * 32}\n")
    s = load_settings(data_dir=tmp_path, admin_tokens_file=f)
    assert [(e.name, sorted(e.scopes)) for e in s.admin_token_entries] == [("oncall", ["read"])]
    with pytest.raises(ConfigError, match="scope"):
        load_settings(data_dir=tmp_path, admin_tokens=f"x:write:{'ab' * 32}")


async def test_the_ingest_port_no_longer_renders_metrics_under_a_pipelined_flood(
    tmp_path: Path,
) -> None:
    app = await start_app(tmp_path)
    try:
        calls = 0
        render = app.metrics.exposition

        def counting(openmetrics: bool = False) -> bytes:
            nonlocal calls
            calls += 1
            return render(openmetrics)

        app.metrics.exposition = counting  # type: ignore[method-assign]
        r, w = await connect(app)
        w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 50_000)  # ~2 MB
        with contextlib.suppress(ConnectionError):
            # closed after one 404 (the rest of the flood is never parsed);
            # the close may reset the connection before the answer is read
            first = await asyncio.wait_for(read_response(r), 5)
            assert first.status == 404
            assert await asyncio.wait_for(r.read(), 5) == b""
        r2, w2 = await connect(app)
        for _ in range(20):
            w2.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            await w2.drain()
            assert (await asyncio.wait_for(read_response(r2), 5)).status == 200
        assert calls == 0
        app.metrics.flush()
        answered = app.metrics.registry.get_sample_value(
            "http_responses_total", {"route": "other", "status": "404"}
        )
        assert answered == 1  # one answer for the whole flood
    finally:
        await close_all()
        await app.shutdown()


def test_token_create_prints_a_token_that_its_entry_accepts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from estat.admin.auth import Authenticator
    from estat.cli import main
    from estat.clock import FakeClock
    from estat.settings.admin import parse_admin_tokens

    assert (
        main(["admin", "--json", "token", "create", "--name", "ci", "--scopes", "read,replay"]) == 0
    )
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    entries = parse_admin_tokens(out["entry"])
    assert out["token"] not in out["entry"]
    a = Authenticator(entries, FakeClock())
    entry, denied = a.check(f"Bearer {out['token']}", "c", "replay")
    assert denied is None
    assert entry is not None
    assert entry.name == "ci"
    assert main(["admin", "token", "create", "--name", "x", "--scopes", "write"]) == 2


async def test_a_paused_store_keeps_its_backlog_and_resumes_it(admin: Admin) -> None:
    from tests.e2e.test_pipeline_e2e import client_batch

    c = admin.client
    activity = admin.app.activity
    assert activity is not None
    r = await c.post(f"{ADMIN_PREFIX}/workers/store/pause", headers=auth("operator"))
    assert r.status_code == 200
    assert r.json()["paused"] is True
    assert r.json()["updatedBy"] == "operator"
    assert admin.app.metrics.registry.get_sample_value("worker_paused", {"worker": "store"}) == 1
    await asyncio.sleep(1.2)  # a fetch already waiting on the bus ends first (its 1 s poll)
    import uuid

    ids = [uuid.uuid4().hex for _ in range(30)]
    rr, w = await connect(admin.app)
    body = json.dumps(client_batch(ids)).encode()
    w.write(
        b"POST /api/v1/analytics/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await w.drain()
    assert (await read_response(rr)).status == 200  # accepted while the store is paused

    def stored() -> list[str]:
        with activity.db.engine.connect() as conn:
            return [row[0] for row in conn.execute(select(user_activity_event.c.event_id))]

    await asyncio.sleep(1.0)
    assert stored() == []  # waiting on the bus, nothing dropped
    listed = (await c.get(f"{ADMIN_PREFIX}/workers", headers=auth("reader"))).json()
    assert {x["name"]: (x["paused"], x["running"]) for x in listed} == {
        "relay": (False, True), "store": (True, True), "dlq-replayer": (False, True),
        "dispatcher": (False, False),  # no destination configured
        "retention": (False, True),
    }  # fmt: skip
    r = await c.post(f"{ADMIN_PREFIX}/workers/store/resume", headers=auth("operator"))
    assert r.json()["paused"] is False
    for _ in range(100):
        if len(stored()) == len(ids):
            break
        await asyncio.sleep(0.05)
    assert sorted(stored()) == sorted(ids)
    r = await c.post(f"{ADMIN_PREFIX}/workers/nope/pause", headers=auth("operator"))
    assert (r.status_code, r.json()["code"]) == (404, "ADMIN_UNKNOWN_WORKER")


async def test_another_process_follows_the_pause_state_in_the_database(admin: Admin) -> None:
    from prometheus_client import CollectorRegistry

    from estat.admin.workers import PauseWatcher
    from estat.ops.metrics import Metrics
    from estat.pause import Pauses

    activity = admin.app.activity
    assert activity is not None
    other = Pauses()  # a second process on the same database
    watcher = PauseWatcher(activity.db, other, Metrics(CollectorRegistry()), interval=0.05)
    await watcher.start(lambda name, coro: asyncio.create_task(coro, name=name))
    try:
        await admin.client.post(f"{ADMIN_PREFIX}/workers/relay/pause", headers=auth("operator"))
        for _ in range(100):
            if other.paused("relay"):
                break
            await asyncio.sleep(0.02)
        assert other.paused("relay")
        await admin.client.post(f"{ADMIN_PREFIX}/workers/relay/resume", headers=auth("operator"))
        for _ in range(100):
            if not other.paused("relay"):
                break
            await asyncio.sleep(0.02)
        assert not other.paused("relay")
    finally:
        watcher.close()
        from estat.clock import SystemClock
        from estat.stage import Deadline

        await watcher.join(Deadline.after(5, SystemClock()))


async def test_dlq_routes_list_and_replay_what_estat_dlq_would(admin: Admin) -> None:
    from tests.dlq.test_dlq import ERR, batch

    dlq = admin.app.dlq
    assert admin.app.admin is not None
    admin.app.pauses.set("dlq-replayer", True)  # the background replayer leaves them to us
    for i in range(3):
        await dlq.spill(
            batch(f"raw/dt=2026-12-01/hr=00/f{i}.jsonl.gz", range(i * 10, i * 10 + 2)), ERR, 1
        )
    c = admin.client
    stats = (await c.get(f"{ADMIN_PREFIX}/dlq", headers=auth("reader"))).json()
    assert (stats["files"], stats["events"]) == (3, 6)
    assert stats["oldestAgeSeconds"] >= 0
    page = (
        await c.get(
            f"{ADMIN_PREFIX}/dlq/files", params={"limit": 2, "offset": 1}, headers=auth("reader")
        )
    ).json()
    assert len(page) == 2
    r = await c.post(f"{ADMIN_PREFIX}/dlq/replay", params={"limit": 2}, headers=auth("replayer"))
    assert r.json() == {"replayed": 2, "quarantined": 0, "failed": 0}
    assert (await c.get(f"{ADMIN_PREFIX}/dlq", headers=auth("reader"))).json()["files"] == 1


async def test_store_counts(admin: Admin) -> None:
    activity = admin.app.activity
    assert activity is not None
    activity.outbox.enqueue([rec() for _ in range(4)], status="FAILED", next_retry_at=None)
    r = (
        await admin.client.get(f"{ADMIN_PREFIX}/user-activity/store", headers=auth("reader"))
    ).json()
    assert r["sourceOutbox"] == {"FAILED": 4}
    assert r["events"] == 0
    assert r["busPending"] == 0


async def test_parked_messages_are_listed_and_requeued(admin: Admin) -> None:
    from estat.bus.base import Delivery, message_of
    from estat.store.rows import encode

    activity = admin.app.activity
    assert activity is not None
    assert activity.bus is not None
    r = rec()
    m = message_of(r, encode(r))
    consumer = activity.bus.consumer("test")
    admin.app.pauses.set("store", True)  # the store consumer leaves the bus to this test
    await asyncio.sleep(1.2)  # (its fetch in progress ends first)
    await activity.bus.publish([m])
    # park it by hand, as the store consumer does after MQ_MAX_DELIVERIES
    got: list[Delivery] = []
    for _ in range(50):
        got = await consumer.fetch(10, 0.1)
        if got:
            break
    await consumer.park(got[0], "store rejected: boom")
    c = admin.client
    listed = (await c.get(f"{ADMIN_PREFIX}/user-activity/parked", headers=auth("reader"))).json()
    assert [(p["messageId"], p["error"]) for p in listed] == [(r.event_id, "store rejected: boom")]
    admin.app.pauses.set("store", False)
    res = await c.post(f"{ADMIN_PREFIX}/user-activity/parked/requeue", headers=auth("replayer"))
    assert res.json() == {"requeuedCount": 1}
    assert (
        await c.get(f"{ADMIN_PREFIX}/user-activity/parked", headers=auth("reader"))
    ).json() == []

    def stored() -> list[str]:
        with activity.db.engine.connect() as conn:
            return [row[0] for row in conn.execute(select(user_activity_event.c.event_id))]

    for _ in range(100):
        if stored():
            break
        await asyncio.sleep(0.05)
    assert stored() == [r.event_id]


async def test_the_pause_state_holds_while_the_database_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from prometheus_client import CollectorRegistry

    from estat.admin.workers import PauseWatcher
    from estat.ops.metrics import Metrics
    from estat.pause import Pauses
    from estat.store.db import Database

    db = Database(f"sqlite:///{tmp_path / 'e.db'}")
    db.upgrade()
    pauses = Pauses()
    watcher = PauseWatcher(db, pauses, Metrics(CollectorRegistry()))
    await watcher.write("store", True, "ops", datetime.now(UTC))
    (tmp_path / "e.db").unlink()  # the database goes away (every read fails)
    db.engine.dispose()
    (tmp_path / "e.db").mkdir()  # and the path is no longer a database file
    capsys.readouterr()
    for _ in range(5):  # every process polls every few seconds
        await watcher.refresh()  # logged, not raised
    assert pauses.paused("store")  # the last known state holds
    said = capsys.readouterr().out
    assert said.count("worker pause state not read") == 1  # once per outage, not per poll
    (tmp_path / "e.db").rmdir()  # the database is back
    db.engine.dispose()
    db.upgrade()
    await watcher.refresh()
    assert not pauses.paused("store")  # the (new) database's state
    assert "worker pause state read again" in capsys.readouterr().out


async def test_an_admin_call_is_logged_when_its_audit_row_cannot_be_written(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    activity = admin.app.activity
    assert activity is not None
    from sqlalchemy import text

    with activity.db.engine.begin() as conn:
        conn.execute(text("DROP TABLE admin_audit_log"))
    r = await admin.client.get(
        f"{ADMIN_PREFIX}/user-activity/outbox/summary", headers=auth("reader")
    )
    assert r.status_code == 200  # answered; the call is still in the log
    out = capsys.readouterr().out
    assert "admin audit row not written" in out
    assert "admin call" in out
