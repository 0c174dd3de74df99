"""Dispatch end to end on PostgreSQL and Redis with real processes and a
PostHog-compatible capture server: every event accepted over HTTP reaches
it exactly once (by ``uuid``) with the right ``distinct_id``; an outage
opens the circuit, rows wait and everything arrives after recovery; an
event PostHog refuses is parked alone and delivered after a replay; two
dispatcher processes on one database never send an event twice."""

from __future__ import annotations

import collections
import hashlib
import json
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from estat.dispatch.posthog import event_uuid
from tests.capture import CaptureServer
from tests.conftest import EstatProcess, RedisServer, free_port
from tests.e2e.test_pipeline_e2e import client_batch, post, wait_for

pytestmark = pytest.mark.e2e

ADMIN = "estat_e2e_" + uuid.uuid4().hex
ENTRY = f"ops:read+replay+operate:{hashlib.sha256(ADMIN.encode()).hexdigest()}"
SVC = "svc-" + uuid.uuid4().hex
SVC_ENTRY = f"orders:{hashlib.sha256(SVC.encode()).hexdigest()}"


def call(p: EstatProcess, method: str, path: str) -> Any:
    req = urllib.request.Request(
        p.admin_url + path, method=method, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    (tmp_path / "redis").mkdir()
    r = RedisServer(free_port(), tmp_path / "redis")
    r.start()
    yield r
    r.stop()


def env(capture: CaptureServer, redis: RedisServer, pg_url: str, **extra: str) -> dict[str, str]:
    return {
        "ADMIN_TOKENS": ENTRY,
        "SERVER_EVENT_TOKENS": SVC_ENTRY,
        "MQ_PROVIDER": "redis-stream",
        "MQ_REDIS_URL": redis.url,
        "MQ_PREFIX": "d" + uuid.uuid4().hex[:8],
        "DATABASE_URL": pg_url,
        "POSTHOG_HOST": capture.url,
        "POSTHOG_API_KEY": "phc_test",
        "DISPATCH_BATCH_SIZE": "20",
        "DISPATCH_POLL_INTERVAL": "100ms",
        "DISPATCH_RETRY_BASE_DELAY": "200ms",
        "DISPATCH_RETRY_MAX_DELAY": "1s",
        "DISPATCH_CIRCUIT_FAILURE_THRESHOLD": "2",
        "DISPATCH_CIRCUIT_OPEN_DURATION": "1s",
        "DISPATCH_CIRCUIT_MAX_OPEN_DURATION": "2s",
        **extra,
    }


def send_client(p: EstatProcess, n: int, ids: list[str] | None = None) -> list[str]:
    ids = ids or [uuid.uuid4().hex for _ in range(n)]
    for i in range(0, n, 50):
        status, body = post(p.url + "/api/v1/analytics/events", client_batch(ids[i : i + 50]))
        assert status == 200, body
    return ids


def dispatched(pg_url: str) -> dict[str, str]:
    with psycopg.connect(pg_url) as conn:
        return dict(
            conn.execute("SELECT event_id, status FROM user_activity_dispatch_outbox").fetchall()
        )


def once_each(capture: CaptureServer, ids: list[str]) -> bool:
    counts = collections.Counter(capture.uuids())
    return all(counts[event_uuid(i)] == 1 for i in ids)


def test_posthog_outage_refusal_and_replay(
    estat_factory: Any, capture: CaptureServer, redis: RedisServer, pg_url: str
) -> None:
    p: EstatProcess = estat_factory(env(capture, redis, pg_url))
    p.start()
    # events over HTTP: client events (anonymous) and server events (a member)
    ids = send_client(p, 60)
    server_ids = [f"srv-{uuid.uuid4().hex[:10]}" for _ in range(10)]
    body = {
        "memberId": 42,
        "events": [{"eventId": i, "eventName": "order.completed"} for i in server_ids],
    }
    status, _ = post(p.url + "/api/v1/server-events", body, {"Authorization": f"Bearer {SVC}"})
    assert status == 200
    wait_for(lambda: once_each(capture, ids + server_ids))
    by_uuid = {e["uuid"]: e for e in capture.accepted}
    assert {by_uuid[event_uuid(i)]["distinct_id"] for i in ids} == {"anon-e2e"}
    assert {by_uuid[event_uuid(i)]["distinct_id"] for i in server_ids} == {"42"}
    assert by_uuid[event_uuid(ids[0])]["properties"]["event_id"] == ids[0]

    # PostHog goes away: the circuit opens, rows wait, nothing is parked
    capture.stop()
    during = send_client(p, 40)
    wait_for(lambda: call(p, "GET", "/api/v1/admin/dispatch/circuits")[0]["state"] != "closed")
    summary = call(p, "GET", "/api/v1/admin/dispatch/summary")[0]
    assert summary["target"] == "POSTHOG"
    assert summary["parkedCount"] == 0
    assert summary["pendingCount"] + summary["failedCount"] == 40
    m = p.metrics()
    assert m['analytics_user_activity_dispatch_circuit_total{state="open",target="POSTHOG"}'] >= 1
    capture.start()  # back on the same port: a probe, then everything
    wait_for(lambda: once_each(capture, during))
    wait_for(lambda: call(p, "GET", "/api/v1/admin/dispatch/circuits")[0]["state"] == "closed")

    # PostHog refuses one event: it alone is parked, the others delivered
    refused = [uuid.uuid4().hex for _ in range(10)]
    capture.bad_uuids = {event_uuid(refused[3])}
    send_client(p, 10, refused)
    wait_for(lambda: call(p, "GET", "/api/v1/admin/dispatch/summary")[0]["parkedCount"] == 1)
    assert once_each(capture, [i for i in refused if i != refused[3]])
    assert event_uuid(refused[3]) not in capture.uuids()
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT last_error FROM user_activity_dispatch_outbox WHERE event_id = %s",
            (refused[3],),
        ).fetchone()
    assert row is not None
    err = row[0]
    assert err.startswith("rejected: HTTP 400")
    capture.bad_uuids = set()  # the cause is fixed: replay
    dry = call(p, "POST", "/api/v1/admin/dispatch/replay?target=POSTHOG&limit=50&dryRun=true")
    assert dry["replayedCount"] == 1
    assert (
        call(p, "POST", "/api/v1/admin/dispatch/replay?target=POSTHOG&limit=50")["replayedCount"]
        == 1
    )
    everything = ids + server_ids + during + refused
    wait_for(lambda: once_each(capture, everything))

    # the loss oracle: each once in PostHog, each row DISPATCHED, the counters agree
    assert len(capture.uuids()) == len(everything)
    rows = dispatched(pg_url)
    assert sorted(rows) == sorted(everything)
    assert set(rows.values()) == {"DISPATCHED"}
    m = p.metrics()
    ok = 'analytics_user_activity_dispatch_execute_total{result="success",target="POSTHOG"}'
    assert m[ok] == len(everything)
    parked = 'analytics_user_activity_dispatch_retry_total{result="parked",target="POSTHOG"}'
    assert m[parked] == 1
    audit = call(p, "GET", "/api/v1/admin/audit?limit=10")
    assert [
        a["effect"]["replayedCount"] for a in audit if a["route"].endswith("dispatch/replay")
    ] == [1, 1]
    assert p.stop() == 0


def test_two_dispatcher_processes_never_send_an_event_twice(
    estat_factory: Any, capture: CaptureServer, redis: RedisServer, pg_url: str
) -> None:
    # ingest and store only: the dispatch outbox fills, nobody sends yet
    base = env(capture, redis, pg_url, DISPATCH_BATCH_SIZE="50", DISPATCH_POLL_INTERVAL="50ms")
    p: EstatProcess = estat_factory(base, args=["serve", "--roles", "ingest,relay,store"])
    p.start(wait=False)
    wait_for_health(p)
    ids = send_client(p, 2000)
    wait_for(lambda: len(dispatched(pg_url)) == 2000)
    assert capture.requests == 0
    capture.hang = 0.1  # 40 requests of 50: 4 s at least, both dispatchers are busy at once
    d1: EstatProcess = estat_factory(base, args=["dispatch"])
    d2: EstatProcess = estat_factory(base, args=["dispatch"])
    d1.start(wait=False)
    d2.start(wait=False)
    d1.wait_log("estat started")
    d2.wait_log("estat started")
    wait_for(lambda: len(capture.uuids()) >= 2000, timeout=120)
    ok = 'analytics_user_activity_dispatch_execute_total{result="success",target="POSTHOG"}'
    # a lease's rows are counted once all its requests were answered (the
    # capture server has them a hang earlier)
    wait_for(lambda: sum(d.metrics().get(ok, 0) for d in (d1, d2)) >= 2000, timeout=30)
    sent = [d.metrics().get(ok, 0) for d in (d1, d2)]
    assert sum(sent) == 2000
    assert min(sent) > 0  # both took part
    assert d1.stop() == 0
    assert d2.stop() == 0
    assert p.stop() == 0
    counts = collections.Counter(capture.uuids())
    assert sorted(counts) == sorted(event_uuid(i) for i in ids)
    assert set(counts.values()) == {1}  # no event sent twice
    assert set(dispatched(pg_url).values()) == {"DISPATCHED"}


def wait_for_health(p: EstatProcess) -> None:
    from tests.conftest import wait_http

    wait_http(p.url + "/health", timeout=60)
