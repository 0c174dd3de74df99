"""The admin listener of a real ``estat serve``: the API against its own
OpenAPI document (schemathesis), and seed 004's replay guide end to end on
PostgreSQL and Redis."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import EstatProcess, RedisServer, free_port

pytestmark = pytest.mark.e2e

TOKEN = "estat_e2e_" + uuid.uuid4().hex
ENTRY = f"ops:read+replay+operate:{hashlib.sha256(TOKEN.encode()).hexdigest()}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def call(p: EstatProcess, method: str, path: str) -> tuple[int, Any]:
    req = urllib.request.Request(p.admin_url + path, method=method, headers=AUTH)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_admin_api_keeps_to_its_openapi_document(estat_factory: Any, tmp_path: Path) -> None:
    p: EstatProcess = estat_factory({"ADMIN_TOKENS": ENTRY})
    p.start()
    status, schema = call(p, "GET", "/api/v1/admin/openapi.json")
    assert status == 200
    path = tmp_path / "admin-openapi.json"
    path.write_text(json.dumps(schema))
    st = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run(
        [
            str(st), "run", str(path), "--url", p.admin_url,
            "-H", f"Authorization: Bearer {TOKEN}", "-n", "40", "--seed", "7",
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:]
    assert "No issues found" in run.stdout
    assert p.stop() == 0


def test_seed_004_replay_guide_with_the_admin_api(
    estat_factory: Any, tmp_path: Path, pg_url: str
) -> None:
    from tests.e2e.test_pipeline_e2e import client_batch, post, wait_for

    redis = RedisServer(free_port(), tmp_path / "redis", persist=True)
    (tmp_path / "redis").mkdir()
    redis.start()
    p: EstatProcess = estat_factory(
        {
            "ADMIN_TOKENS": ENTRY,
            "MQ_PROVIDER": "redis-stream",
            "MQ_REDIS_URL": redis.url,
            "MQ_PREFIX": "g" + uuid.uuid4().hex[:8],
            "MQ_TRACE": "all",
            "DATABASE_URL": pg_url,
            "OUTBOX_POLL_INTERVAL": "1h",  # only the operator's replay publishes
        }
    )
    p.start()
    redis.stop()  # the bus goes down while events arrive
    ids = [uuid.uuid4().hex for _ in range(120)]
    try:
        for i in range(0, len(ids), 40):
            status, body = post(p.url + "/api/v1/analytics/events", client_batch(ids[i : i + 40]))
            assert status == 200, body  # accepted: the outbox absorbs the outage
        summary = "/api/v1/admin/user-activity/outbox/summary"
        wait_for(lambda: call(p, "GET", summary)[1]["failedCount"] == 120)
        redis.start()  # the cause is removed
        status, dry = call(
            p, "POST", "/api/v1/admin/user-activity/outbox/replay?limit=50&dryRun=true"
        )
        assert (status, dry["processedCount"]) == (200, 50)
        status, res = call(p, "POST", "/api/v1/admin/user-activity/outbox/replay?limit=50")
        assert status == 200
        assert res == {"processedCount": 50, "successCount": 50, "failedCount": 0, "dryRun": False}
        s = call(p, "GET", summary)[1]
        assert (s["failedCount"], s["publishedCount"]) == (70, 50)

        def stored() -> list[str]:
            with psycopg.connect(pg_url) as conn:
                return [r[0] for r in conn.execute("SELECT event_id FROM user_activity_event")]

        wait_for(lambda: len(stored()) == 50)
        with psycopg.connect(pg_url) as conn:
            replayed = [
                r[0]
                for r in conn.execute(
                    "SELECT event_id FROM user_activity_source_outbox WHERE status = 'PUBLISHED'"
                )
            ]
        traces = f"/api/v1/admin/mq-traces?messageId={replayed[0]}&limit=10"
        # trace rows are written in batches (a flush every few seconds)
        wait_for(lambda: "CONSUME_SUCCESS" in [t["stage"] for t in call(p, "GET", traces)[1]])
        assert "PUBLISH" in [t["stage"] for t in call(p, "GET", traces)[1]]
        status, res = call(p, "POST", "/api/v1/admin/user-activity/outbox/replay?limit=500")
        assert (status, res["successCount"]) == (200, 70)
        wait_for(lambda: len(stored()) == 120)
        assert sorted(stored()) == sorted(ids)  # every event once
        status, audit = call(p, "GET", "/api/v1/admin/audit?limit=50")
        replays = [a for a in audit if a["route"].endswith("/outbox/replay")]
        assert [a["effect"]["successCount"] for a in replays] == [70, 50, 0]
        assert all(a["tokenName"] == "ops" for a in audit)
        assert p.stop() == 0
    finally:
        redis.stop()


def test_a_paused_store_stays_paused_across_a_restart_and_resumes_everything(
    estat_factory: Any, tmp_path: Path, redis_server: RedisServer
) -> None:
    import sqlite3

    from tests.e2e.test_pipeline_e2e import client_batch, post, wait_for

    env = {
        "ADMIN_TOKENS": ENTRY,
        "MQ_PROVIDER": "redis-stream",
        "MQ_REDIS_URL": redis_server.url,
        "MQ_PREFIX": "p" + uuid.uuid4().hex[:8],
    }
    p: EstatProcess = estat_factory(env)
    p.start()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "estat", "admin", "--url", p.admin_url, *args],
            env={**p.env, "ESTAT_ADMIN_TOKEN": TOKEN}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    def stored() -> int:
        with sqlite3.connect(tmp_path / "data" / "estat.db") as conn:
            return int(conn.execute("SELECT COUNT(*) FROM user_activity_event").fetchone()[0])

    paused = cli("workers", "pause", "store")
    assert paused.returncode == 0, paused.stderr
    assert "True" in paused.stdout
    time.sleep(2.5)  # a fetch already waiting on the bus ends first
    ids = [uuid.uuid4().hex for _ in range(50)]
    status, _ = post(p.url + "/api/v1/analytics/events", client_batch(ids))
    assert status == 200
    time.sleep(2)
    assert stored() == 0  # the events wait on the bus
    assert p.stop() == 0
    p2: EstatProcess = estat_factory(env)
    p2.admin_port, p = p.admin_port, p2  # the same address for the CLI
    p.env["ADMIN_ADDR"] = f"127.0.0.1:{p.admin_port}"
    p.start()
    listed = cli("--json", "workers")
    assert listed.returncode == 0, listed.stderr
    store = next(w for w in json.loads(listed.stdout) if w["name"] == "store")
    assert (store["paused"], store["updatedBy"]) == (True, "ops")  # it survived the restart
    table = cli("workers").stdout.splitlines()  # the table an operator reads
    assert table[0].split() == ["name", "paused", "running", "updatedAt", "updatedBy"]
    assert next(line for line in table if line.startswith("store")).split()[:3] == [
        "store", "True", "True",
    ]  # fmt: skip
    time.sleep(2)
    assert stored() == 0
    assert cli("workers", "resume", "store").returncode == 0
    wait_for(lambda: stored() == len(ids))
    assert p.stop() == 0
