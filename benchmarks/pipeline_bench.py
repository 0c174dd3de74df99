"""``make bench`` (pipeline part): the user-activity pipeline beside its
baselines, in one run, on throwaway PostgreSQL and Redis servers.

1. The store consumer: events/s from a Redis stream into PostgreSQL
   (batches of ``STORE_BATCH_SIZE`` 500 and 1,000, 10 % duplicates, one
   dispatch-outbox row per new event), beside the same rows written by a
   plain psycopg ``COPY`` into a staging table + ``INSERT … SELECT … ON
   CONFLICT DO NOTHING`` (and the dispatch rows) with no bus.
2. The client API with the bus on (Redis Streams, ``--roles ingest``) and off
   (``MQ_PROVIDER=none``): events/s with wrk, side by side.
3. Latency from HTTP accept to stored row (p50 / p99), one process with the
   in-process bus and PostgreSQL, at a modest steady rate.

Figures, not assertions.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import psycopg

from estat.activity.consumer import StoreConsumer
from estat.bus.redis_stream import RedisStreamBus
from estat.clock import SystemClock
from estat.model import EventRecord
from estat.ops.metrics import Metrics
from estat.ops.tasks import Supervisor
from estat.stage import Deadline
from estat.store.db import Database
from estat.store.events import EventStore
from estat.store.rows import encode

# the wrk helpers of benchmarks/run.py, and the throwaway servers of the tests
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
_run = importlib.import_module("run")
free_port, start_estat, stop, wrk = _run.free_port, _run.start_estat, _run.stop, _run.wrk
RedisServer = importlib.import_module("tests.conftest").RedisServer
PostgresServer = importlib.import_module("tests.servers").PostgresServer

N = int(os.environ.get("BENCH_STORE_EVENTS", "60000"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
PROPS = b'{"page":"/restaurants/12345","referrer":"https://www.example.org/search?q=sushi","position":3,"sessionId":"s-1","platform":"web","source":"CLIENT"}'


def events(n: int) -> list[EventRecord]:
    """n events, 10 % of them repeating an earlier id."""
    out: list[EventRecord] = []
    for i in range(n):
        eid = out[i // 2].event_id if i % 10 == 9 and out else uuid.uuid4().hex
        out.append(
            EventRecord(
                eid,
                "ui.page.viewed",
                "v1",
                "2026-11-30T10:00:00.000Z",
                "2026-11-30T10:00:01.000Z",
                None,
                "anon-1",
                msgspec.Raw(PROPS),
                "CLIENT",
                "81.2.69.160",
                "bench",
            )
        )
    return out


def baseline(url: str, recs: list[EventRecord], batch: int) -> float:
    """COPY into a staging table, then INSERT … SELECT … ON CONFLICT DO NOTHING
    and the dispatch rows of the new events, one transaction per batch."""
    enc = msgspec.json.encode
    t0 = time.perf_counter()
    with psycopg.connect(url) as conn:
        conn.execute(
            "CREATE TEMP TABLE staging (event_id text, event_name text, event_version text, "
            "occurred_at timestamptz, anonymous_id text, session_id text, platform text, "
            "source text, properties jsonb, payload jsonb) ON COMMIT DELETE ROWS"
        )
        conn.commit()
        for i in range(0, len(recs), batch):
            with conn.transaction(), conn.cursor() as cur:
                with cur.copy(
                    "COPY staging (event_id, event_name, event_version, occurred_at, anonymous_id, "
                    "session_id, platform, source, properties, payload) FROM STDIN"
                ) as cp:
                    for r in recs[i : i + batch]:
                        cp.write_row(
                            (
                                r.event_id,
                                r.event_name,
                                r.event_version,
                                r.occurred_at,
                                r.anonymous_id,
                                "s-1",
                                "web",
                                r.source,
                                PROPS.decode(),
                                enc(r).decode(),
                            )
                        )
                cur.execute(
                    "WITH ins AS (INSERT INTO user_activity_event (event_id, event_name, event_version, "
                    "occurred_at, anonymous_id, session_id, platform, source, properties) "
                    "SELECT DISTINCT ON (event_id) event_id, event_name, event_version, occurred_at, "
                    "anonymous_id, session_id, platform, source, properties FROM staging "
                    "ON CONFLICT (event_id) DO NOTHING RETURNING event_id) "
                    "INSERT INTO user_activity_dispatch_outbox (event_id, dispatch_target, payload, status) "
                    "SELECT DISTINCT ON (s.event_id) s.event_id, 'POSTHOG', s.payload, 'PENDING' "
                    "FROM ins JOIN staging s USING (event_id) ON CONFLICT DO NOTHING"
                )
    return len(recs) / (time.perf_counter() - t0)


async def through_the_bus(url: str, redis_url: str, recs: list[EventRecord], batch: int) -> float:
    bus = RedisStreamBus(redis_url, prefix="b" + uuid.uuid4().hex[:6], group="g")
    await bus.start()
    for i in range(0, len(recs), 1000):
        await bus.publish_events(recs[i : i + 1000], [encode(r) for r in recs[i : i + 1000]])
    db = Database(url)
    m = Metrics()
    consumer = StoreConsumer(
        bus,
        EventStore(db, ["POSTHOG"]),
        consumer_name="bench",
        batch_size=batch,
        max_deliveries=5,
        metrics=m,
        clock=SystemClock(),
        poll=0.05,
    )
    sup = Supervisor(m, lambda name: None)
    unique = len({r.event_id for r in recs})
    t0 = time.perf_counter()
    await consumer.start(sup.spawn)
    while (
        m.registry.get_sample_value(
            "mq_consume_count_total",
            {"topic": "user-activity", "provider": "redis-stream", "result": "success"},
        )
        or 0
    ) < len(recs):
        await asyncio.sleep(0.01)
    rate = len(recs) / (time.perf_counter() - t0)
    sup.stopping()
    consumer.close()
    await consumer.join(Deadline.after(10, SystemClock()))
    with psycopg.connect(url) as conn:
        stored = conn.execute("SELECT COUNT(*) FROM user_activity_event").fetchone()
    assert stored is not None
    assert stored[0] == unique, (stored, unique)  # every unique id, once
    await bus.close()
    db.close()
    return rate


def fresh(pg: Any) -> str:
    url: str = pg.create_database()
    db = Database(url)
    db.upgrade()
    db.close()
    return url


def store_part(pg: Any, redis: Any) -> None:
    recs = events(N)
    print(f"\nstore consumer vs COPY baseline: {N:,} events, 10 % duplicates, 1 dispatch target")
    for batch in (500, 1000):
        base, ours = [], []
        for _ in range(3):
            base.append(baseline(fresh(pg), recs, batch))
            ours.append(asyncio.run(through_the_bus(fresh(pg), redis.url, recs, batch)))
        b, o = statistics.median(base), statistics.median(ours)
        print(
            f"  batch {batch:>5}: COPY baseline {b:>8,.0f} ev/s   estat store via Redis {o:>8,.0f} ev/s"
            f"   ratio {o / b:.2f}  (rounds: {', '.join(f'{x / y:.2f}' for x, y in zip(ours, base, strict=True))})"
        )


def _wrk(url: str, connections: int, seconds: int) -> tuple[float, float]:
    """(requests, non-2xx) of one wrk run of events.lua."""
    import re
    import subprocess

    out = subprocess.run(
        _run.pinned(
            1,
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "-s",
                str(Path(__file__).resolve().parent / "events.lua"),
                url,
            ],
        ),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return float(total.group(1)) if total else 0.0, float(non2xx.group(1)) if non2xx else 0.0


def api_part(redis: Any, work: Path) -> None:
    """The client API's cost per accepted event with the bus off and on,
    from estat's CPU time at a load it keeps up with (8 connections, no
    503): events/s per core. With 64 connections the offered load exceeds
    what one core can publish, and the rejected requests' cost would be
    measured too. Every accepted event must have reached the bus (or the
    outbox) by the end."""
    print(
        "\nclient API, 50 events per request, bus off vs on (Redis Streams, --roles ingest), 8 connections"
    )
    rows = []
    for name, env in (
        ("off", {"MQ_PROVIDER": "none"}),
        (
            "on",
            {
                "MQ_PROVIDER": "redis-stream",
                "MQ_REDIS_URL": redis.url,
                "MQ_PREFIX": "api" + uuid.uuid4().hex[:6],
            },
        ),
    ):
        port = free_port()
        env = {**env, "ANALYTICS_RATE_LIMIT_MAX_REQUESTS": "1000000000"}
        proc = start_estat(work / name, port, env, roles="ingest")
        try:
            url = f"http://127.0.0.1:{port}/api/v1/analytics/events"
            _wrk(url, 8, 2)
            per_core, rates, refused = [], [], 0.0
            c_redis = _run.cpu_seconds(redis.proc.pid)
            for _ in range(3):
                c0 = _run.cpu_seconds(proc.pid)
                requests, non2xx = _wrk(url, 8, SECONDS)
                cpu = _run.cpu_seconds(proc.pid) - c0
                accepted = (requests - non2xx) * 50
                per_core.append(accepted / cpu)
                rates.append(accepted / SECONDS)
                refused += non2xx
            redis_cpu = _run.cpu_seconds(redis.proc.pid) - c_redis
            time.sleep(3)
            m = _run.metrics(port)
        finally:
            stop(proc)  # never left running, whatever failed
        acc = m.get('analytics_ingest_events_total{reason="",result="accepted"}', 0)
        pub = m.get(
            'mq_publish_count_total{provider="redis-stream",result="success",topic="user-activity"}',
            0,
        ) + m.get('activity_publish_fallback_total{to="outbox"}', 0)
        rows.append((name, per_core, rates, refused, acc, pub, redis_cpu))
    for name, per_core, rates, refused, acc, pub, redis_cpu in rows:
        print(
            f"  bus {name:>3}: {statistics.median(per_core):>10,.0f} events/s per core of estat, "
            f"{statistics.median(rates):>9,.0f} accepted events/s, {refused:.0f} refused; "
            f"redis-server CPU {redis_cpu / (3 * SECONDS):.2f} of a core"
            + (
                f"; {acc:,.0f} accepted, {pub:,.0f} published or in the outbox"
                if name == "on"
                else ""
            )
        )
    off, on = statistics.median(rows[0][1]), statistics.median(rows[1][1])
    print(f"  ratio on / off (events/s per core): {on / off:.2f}")


def _latency(port: int, url: str, n: int) -> list[float]:
    """POST one event at a time (~100/s), then read created_at - occurred_at
    of every row: the time from the API's accept to the committed row."""
    import json
    import urllib.request

    for _ in range(n):
        now = time.time()
        iso = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
        )
        body = {
            "anonymousId": "lat",
            "events": [
                {"eventId": uuid.uuid4().hex, "eventName": "ui.page.viewed", "occurredAt": iso}
            ],
        }
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/analytics/events",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
        time.sleep(0.01)
    time.sleep(2)
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT EXTRACT(EPOCH FROM created_at - occurred_at) FROM user_activity_event"
        ).fetchall()
    return [float(r[0]) for r in rows]


def latency_part(pg: Any, work: Path) -> None:
    url = fresh(pg)
    port = free_port()
    proc = start_estat(
        work / "latency",
        port,
        {"DATABASE_URL": url, "ANALYTICS_RATE_LIMIT_MAX_REQUESTS": "1000000000"},
    )
    try:
        lat = sorted(_latency(port, url, 500))
    finally:
        stop(proc)
    p50 = lat[len(lat) // 2] * 1000
    p99 = lat[int(len(lat) * 0.99)] * 1000
    print(
        f"\naccept -> stored row (in-process bus, PostgreSQL, ~100 events/s): p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(lat)} events)"
    )


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("parts", nargs="*", help="store, api, latency (default: all three)")
    parts = set(ap.parse_args().parts or ["store", "api", "latency"])
    if parts - {"store", "api", "latency"}:
        ap.error(f"unknown part: {', '.join(sorted(parts - {'store', 'api', 'latency'}))}")
    if "api" in parts and shutil.which("wrk") is None:
        ap.error(
            "the api part needs wrk (make bench installs it); or: pipeline_bench.py store latency"
        )
    work = Path(tempfile.mkdtemp(prefix="estat-pipeline-bench-"))
    pg = PostgresServer(free_port())
    pg.start()
    redis = RedisServer(free_port(), work)
    redis.start()
    try:
        if "store" in parts:
            store_part(pg, redis)
        if "api" in parts:
            api_part(redis, work)
        if "latency" in parts:
            latency_part(pg, work)
    finally:
        redis.stop()
        pg.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
