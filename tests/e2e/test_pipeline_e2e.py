"""End to end: events over HTTP → bus → store, in real processes, with a
loss oracle (unique ids; every 2xx id stored exactly once)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.conftest import EstatProcess, RedisServer
from tests.servers import NatsServer

pytestmark = pytest.mark.e2e

TOKEN = "svc-token-" + uuid.uuid4().hex
TOKENS = f"orders:{hashlib.sha256(TOKEN.encode()).hexdigest()}"


def post(
    url: str, body: dict[str, object], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def client_batch(ids: list[str]) -> dict[str, object]:
    return {
        "anonymousId": "anon-e2e",
        "events": [
            {"eventId": i, "eventName": "ui.page.viewed", "properties": {"sessionId": "s1"}}
            for i in ids
        ],
    }


def sqlite_ids(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT event_id FROM user_activity_event")]


def wait_for(cond: Callable[[], bool], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise TimeoutError("not reached")


def test_embedded_setup_stores_client_and_server_events_once(
    estat_factory: Callable[..., EstatProcess], tmp_path: Path
) -> None:
    p = estat_factory({"SERVER_EVENT_TOKENS": TOKENS, "MQ_TRACE": "all"})
    p.start()
    ids = [uuid.uuid4().hex for _ in range(120)]
    accepted: list[str] = []
    for i in range(0, 120, 40):
        chunk = ids[i : i + 40]
        status, body = post(p.url + "/api/v1/analytics/events", client_batch(chunk))
        assert status == 200, body
        accepted += chunk
    # the same batch again, and ids interleaved with earlier ones
    assert post(p.url + "/api/v1/analytics/events", client_batch(ids[:40]))[0] == 200
    assert post(p.url + "/api/v1/analytics/events", client_batch(ids[::7]))[0] == 200
    server_ids = [f"srv-{uuid.uuid4().hex[:10]}" for _ in range(10)]
    body = {
        "memberId": 42,
        "events": [{"eventId": i, "eventName": "order.completed"} for i in server_ids],
    }
    assert post(p.url + "/api/v1/server-events", body)[0] == 401
    assert post(p.url + "/api/v1/server-events", body, {"Authorization": "Bearer nope"})[0] == 403
    status, answer = post(
        p.url + "/api/v1/server-events", body, {"Authorization": f"Bearer {TOKEN}"}
    )
    assert (status, answer) == (200, {"acceptedCount": 10, "duplicateCount": 0})
    status, answer = post(
        p.url + "/api/v1/server-events", body, {"Authorization": f"Bearer {TOKEN}"}
    )
    assert answer["duplicateCount"] == 10
    db = tmp_path / "data" / "estat.db"
    want = sorted(accepted + server_ids)
    wait_for(lambda: len(sqlite_ids(db)) >= len(want))
    assert p.stop() == 0
    assert sorted(sqlite_ids(db)) == want
    with sqlite3.connect(db) as conn:
        member, source, _session = conn.execute(
            "SELECT member_id, source, session_id FROM user_activity_event WHERE event_id = ?",
            (server_ids[0],),
        ).fetchone()
        assert (member, source) == (42, "SERVER")
        assert conn.execute(
            "SELECT session_id FROM user_activity_event WHERE event_id = ?", (ids[0],)
        ).fetchone() == ("s1",)
        assert conn.execute(
            "SELECT COUNT(*) FROM user_activity_source_outbox WHERE status = 'PUBLISHED'"
        ).fetchone() == (10,)
        assert (
            conn.execute(
                "SELECT COUNT(*) FROM message_queue_trace_log WHERE stage = 'CONSUME_SUCCESS'"
            ).fetchone()[0]
            >= 130
        )


@pytest.mark.parametrize("provider", ["redis-stream", "nats"])
def test_separate_roles_on_postgresql_survive_a_killed_store_consumer(
    provider: str,
    estat_factory: Callable[..., EstatProcess],
    redis_server: RedisServer,
    nats_server: NatsServer,
    pg_url: str,
) -> None:
    prefix = "e" + uuid.uuid4().hex[:8]
    env = {
        "MQ_PROVIDER": provider,
        "MQ_REDIS_URL": redis_server.url,
        "MQ_NATS_URL": nats_server.url,
        "MQ_PREFIX": prefix,
        "MQ_CLAIM_IDLE": "2s",
        "DATABASE_URL": pg_url,
        "STORE_BATCH_SIZE": "50",
    }
    ingest = estat_factory(env, args=["serve", "--workers", "1", "--roles", "ingest,relay"])
    ingest.start()
    ids = [uuid.uuid4().hex for _ in range(2000)]
    for i in range(0, len(ids), 50):
        status, body = post(ingest.url + "/api/v1/analytics/events", client_batch(ids[i : i + 50]))
        assert status == 200, body
    store1 = estat_factory(env, args=["store"])
    store1.start()

    def count() -> int:
        with psycopg.connect(pg_url) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM user_activity_event").fetchone()[0])  # type: ignore[index]

    wait_for(lambda: count() > 0)
    store1.kill()  # SIGKILL mid-stream: its unacked messages go to the next consumer
    store2 = estat_factory(env, args=["store"])
    store2.start()
    wait_for(lambda: count() >= len(ids), timeout=90)
    # a role process has its own admin listener (ADMIN_ADDR set for it)
    m = store2.metrics()
    assert m['worker_paused{worker="store"}'] == 0  # its own metrics, from its own listener
    with urllib.request.urlopen(store2.admin_url + "/ready", timeout=5) as r:
        detail = json.loads(r.read())
    assert detail["ready"] is True
    assert detail["roles"] == ["store"]
    assert store2.stop() == 0
    assert ingest.stop() == 0
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT event_id, COUNT(*) FROM user_activity_event GROUP BY event_id"
        ).fetchall()
    assert sorted(r[0] for r in rows) == sorted(ids)
    assert all(r[1] == 1 for r in rows)
