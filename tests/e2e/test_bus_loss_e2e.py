"""The bus loses its data (a Redis restarted without an append-only file):
the running store consumer reads on, and ``estat store backfill`` stores
what the bus lost from the lake and the source outbox, each event once, and
the destinations get them once. Loss oracle: unique ids, every 2xx id in
``user_activity_event`` once, in the dispatch outbox once, at the capture
server once."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import EstatProcess, RedisServer, free_port
from tests.e2e.test_admin_e2e import ENTRY, call
from tests.e2e.test_pipeline_e2e import TOKEN, TOKENS, client_batch, post, wait_for

pytestmark = pytest.mark.e2e


def _lake_ids(lake: Path) -> set[str]:
    out: set[str] = set()
    for f in lake.glob("events/dt=*/hr=*/*.jsonl.gz"):
        for line in gzip.decompress(f.read_bytes()).splitlines():
            out.add(line.split(b'"event_id":"', 1)[1].split(b'"', 1)[0].decode())
    return out


def test_a_redis_that_lost_its_data_is_repaired_by_the_backfill(
    estat_factory: Any, tmp_path: Path, pg_url: str, capture: Any
) -> None:
    (tmp_path / "redis").mkdir()
    redis = RedisServer(free_port(), tmp_path / "redis")  # no append-only file
    redis.start()
    p: EstatProcess = estat_factory(
        {
            "ADMIN_TOKENS": ENTRY,
            "SERVER_EVENT_TOKENS": TOKENS,
            "MQ_PROVIDER": "redis-stream",
            "MQ_REDIS_URL": redis.url,
            "DATABASE_URL": pg_url,
            "FLUSH_INTERVAL": "1s",
            "POSTHOG_HOST": capture.url,
            "POSTHOG_API_KEY": capture.api_key,
            "DISPATCH_POLL_INTERVAL": "200ms",
        }
    )
    started = datetime.now(UTC)
    p.start()

    def stored() -> list[str]:
        with psycopg.connect(pg_url) as conn:
            return [r[0] for r in conn.execute("SELECT event_id FROM user_activity_event")]

    def client(n: int) -> list[str]:
        ids = [str(uuid.uuid4()) for _ in range(n)]
        for i in range(0, n, 50):
            status, body = post(p.url + "/api/v1/analytics/events", client_batch(ids[i : i + 50]))
            assert status == 200, body
        return ids

    try:
        before = client(100)
        wait_for(lambda: len(stored()) == 100)
        assert call(p, "POST", "/api/v1/admin/workers/store/pause")[0] == 200
        time.sleep(2.5)  # a fetch already waiting on the bus ends first
        lost = client(200)
        server = [str(uuid.uuid4()) for _ in range(10)]
        events = [{"eventId": i, "eventName": "order.completed"} for i in server]
        status, _ = post(
            p.url + "/api/v1/server-events",
            {"memberId": 7, "events": events},
            {"Authorization": f"Bearer {TOKEN}"},
        )
        assert status == 200
        summary = "/api/v1/admin/user-activity/outbox/summary"
        wait_for(lambda: call(p, "GET", summary)[1]["publishedCount"] == 10)  # on the bus
        redis.stop()
        redis.start()  # empty: everything on the bus is gone
        assert call(p, "POST", "/api/v1/admin/workers/store/resume")[0] == 200
        after = client(50)
        # the running consumer found its group gone and reads on
        wait_for(lambda: len(stored()) == 150)
        assert set(stored()) == set(before + after)
        assert "the consumer group was gone" in p.log.read_text()
        assert p.metrics()['mq_bus_lost_total{provider="redis-stream"}'] == 1
        lake = tmp_path / "data" / "lake"
        accepted = before + lost + after
        wait_for(lambda: _lake_ids(lake) >= set(accepted))

        def backfill(*extra: str) -> subprocess.CompletedProcess[str]:
            window = [
                "--from", (started - timedelta(minutes=5)).isoformat(),
                "--to", (datetime.now(UTC) + timedelta(minutes=5)).isoformat(),
            ]  # fmt: skip
            return subprocess.run(
                [sys.executable, "-m", "estat", "store", "backfill", *window, *extra],
                env=p.env, cwd=p.workdir, capture_output=True, text=True, timeout=120,
            )  # fmt: skip

        dry = backfill("--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would store 200," in dry.stdout, dry.stdout
        assert "would store 10," in dry.stdout
        assert len(stored()) == 150
        run = backfill()
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert lines[0].startswith("lake: ")
        assert "stored 200, already stored 150," in lines[0]
        assert "dispatch rows enqueued: POSTHOG=200" in run.stdout
        outbox = next(line for line in lines if line.startswith("outbox: "))
        assert "stored 10, already stored 0, unreadable 0" in outbox
        everything = accepted + server
        got = stored()
        assert sorted(got) == sorted(everything)  # each once
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute(
                "SELECT event_id, count(*) FROM user_activity_dispatch_outbox GROUP BY 1"
            ).fetchall()
            member = conn.execute(
                "SELECT member_id FROM user_activity_event WHERE event_id = %s", (server[0],)
            ).fetchone()
        assert sorted(r[0] for r in rows) == sorted(everything)
        assert {r[1] for r in rows} == {1}
        assert member == (7,)
        wait_for(lambda: sorted(capture.uuids()) == sorted(everything), timeout=60)

        def ledger_stored() -> int:
            with psycopg.connect(pg_url) as conn:
                row = conn.execute(
                    "SELECT coalesce(sum(events), 0) FROM estat_ledger "
                    "WHERE dataset = 'user-activity' AND stage = 'stored'"
                ).fetchone()
            return int(row[0]) if row else 0

        # the completeness ledger counts the backfill's 210 as stored (the
        # server adds its own 150 every few seconds)
        wait_for(lambda: ledger_stored() == 360, timeout=30)
        again = backfill("--json")
        assert again.returncode == 0, again.stderr
        answer = json.loads(again.stdout)
        assert [(s["source"], s["inserted"], s["alreadyStored"]) for s in answer["sources"]] == [
            ("lake", 0, 350),
            ("outbox", 0, 10),
        ]
        assert p.stop() == 0
        assert sorted(capture.uuids()) == sorted(everything)  # nothing sent twice
    finally:
        redis.stop()
