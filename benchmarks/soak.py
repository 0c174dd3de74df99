"""A soak: ``estat serve`` (every role, 2 workers) on a throwaway
PostgreSQL, a Redis bus (append-only, fsync always), an S3 lake (moto) and
a PostHog-compatible capture server in a process of its own, under a steady
mixed load for ``SOAK_SECONDS`` (600 by default): client event batches (50
requests/s of 20 events), server events (10 requests/s of 10) and
``/collect`` records (60/s), every event id unique.

Every 30 s it samples each worker's resident memory and descriptors; at the
end it waits for the store and dispatch to catch up, stops estat, and checks
the loss oracle: every event that got a 200 stored exactly once in
``user_activity_event`` and received exactly once (by uuid) by the capture
server, and the completeness ledger's counts equal to what was sent.
Prints the figures. Not part of ``make bench`` (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg

from estat.dispatch.posthog import event_uuid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
conftest = importlib.import_module("tests.conftest")
servers = importlib.import_module("tests.servers")
free_port = conftest.free_port

SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
TOKEN = "soak-" + uuid.uuid4().hex

# the capture server keeps the uuids it accepted (for the oracle) and
# nothing else of the events
CAPTURE = """
import sys, time
sys.path.insert(0, sys.argv[1])
from starlette.responses import JSONResponse
from starlette.routing import Route
from tests.capture import CaptureServer
class Uuids:
    def __init__(self): self.got = []
    def extend(self, batch): self.got += [e["uuid"] for e in batch]
c = CaptureServer(api_key="phc_soak")
c.accepted = Uuids()
async def dump(request):
    return JSONResponse(c.accepted.got)
c.app.routes.append(Route("/uuids", dump))
c.start()
print(c.port, flush=True)
while True:
    time.sleep(3600)
"""


def workers(supervisor: int) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(supervisor)], capture_output=True, text=True, check=False
    )
    return [int(p) for p in out.stdout.split()]


def sample(pid: int) -> tuple[int, int]:
    """Resident KiB and open descriptors of ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def load(url: str, seconds: float) -> dict[str, Any]:
    sent: dict[str, Any] = {"client": [], "server": [], "collect": 0, "refused": {}}
    pending = 0
    flying: set[asyncio.Future[None]] = set()
    limits = httpx.Limits(max_connections=64)

    async with httpx.AsyncClient(timeout=10, limits=limits) as c:

        async def post(kind: str, ids: list[str] | None, path: str, **kw: Any) -> None:
            nonlocal pending
            try:
                r = await c.post(url + path, **kw)
                if r.status_code == 200:
                    if ids is None:
                        sent["collect"] += 1
                    else:
                        sent[kind] += ids
                else:
                    sent["refused"][r.status_code] = sent["refused"].get(r.status_code, 0) + 1
            except httpx.HTTPError as e:
                name = type(e).__name__
                sent["refused"][name] = sent["refused"].get(name, 0) + 1
            finally:
                pending -= 1

        def client(i: int) -> Any:
            ids = [f"c-{i}-{j}-{uuid.uuid4().hex[:8]}" for j in range(20)]
            body = {
                "anonymousId": f"anon-{i % 5000}",
                "events": [
                    {"eventId": e, "eventName": "ui.page.viewed", "properties": {"page": f"/p/{i}"}}
                    for e in ids
                ],
            }
            return post("client", ids, "/api/v1/analytics/events", json=body)

        def server(i: int) -> Any:
            ids = [f"s-{i}-{j}-{uuid.uuid4().hex[:8]}" for j in range(10)]
            body = {
                "memberId": i % 1000,
                "events": [{"eventId": e, "eventName": "order.completed"} for e in ids],
            }
            auth = {"authorization": f"Bearer {TOKEN}"}
            return post("server", ids, "/api/v1/server-events", json=body, headers=auth)

        def collect(i: int) -> Any:
            return post("collect", None, "/collect", content=json.dumps({"n": i}).encode())

        async def steady(rate: float, make: Any) -> None:
            nonlocal pending
            t0 = time.monotonic()
            i = 0
            while time.monotonic() - t0 < seconds:
                if pending < 200:  # a slow server is refused load, not queued
                    pending += 1
                    task = asyncio.ensure_future(make(i))
                    flying.add(task)
                    task.add_done_callback(flying.discard)
                else:
                    sent["refused"]["not sent"] = sent["refused"].get("not sent", 0) + 1
                i += 1
                await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))

        await asyncio.gather(steady(50, client), steady(10, server), steady(60, collect))
        while pending:
            await asyncio.sleep(0.05)
    return sent


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="estat-soak-"))
    pg = servers.PostgresServer(free_port())
    redis = conftest.RedisServer(free_port(), work, persist=True)
    moto = conftest.MotoServer(free_port())
    cap = subprocess.Popen(
        [sys.executable, "-c", CAPTURE, str(ROOT)], stdout=subprocess.PIPE, cwd=ROOT
    )
    estat: Any = None
    try:
        pg.start()
        redis.start()
        moto.start()
        moto.client().create_bucket(Bucket="lake")
        assert cap.stdout is not None
        cap_url = f"http://127.0.0.1:{int(cap.stdout.readline())}"
        db = pg.create_database()
        import hashlib

        env = {
            "DATABASE_URL": db,
            "MQ_PROVIDER": "redis-stream",
            "MQ_REDIS_URL": redis.url,
            "RAW_BUCKET": "lake",
            "S3_ENDPOINT_URL": moto.endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
            "POSTHOG_HOST": cap_url,
            "POSTHOG_API_KEY": "phc_soak",
            "SERVER_EVENT_TOKENS": f"soak:{hashlib.sha256(TOKEN.encode()).hexdigest()}",
            "LOG_LEVEL": "info",
        }
        estat = conftest.EstatProcess(work, env, workers=2)
        estat.start()
        assert estat.proc is not None
        pids = workers(estat.proc.pid)
        print(f"estat serve, 2 workers {pids}; load for {SECONDS:.0f} s", flush=True)
        samples: list[tuple[float, list[tuple[int, int]]]] = []
        t0 = time.monotonic()

        async def run() -> dict[str, Any]:
            task = asyncio.ensure_future(load(estat.url, SECONDS))
            while not task.done():
                samples.append((time.monotonic() - t0, [sample(p) for p in pids]))
                await asyncio.wait([task], timeout=30)
            return task.result()

        sent = asyncio.run(run())
        loaded = time.monotonic() - t0
        accepted = set(sent["client"]) | set(sent["server"])

        def caught_up() -> bool:
            with psycopg.connect(db) as conn:
                row = conn.execute(
                    "SELECT (SELECT count(*) FROM user_activity_event),"
                    " (SELECT count(*) FROM user_activity_dispatch_outbox"
                    "  WHERE status = 'DISPATCHED')"
                ).fetchone()
            assert row is not None
            return bool(row[0] >= len(accepted) and row[1] >= len(accepted))

        deadline = time.monotonic() + 180
        while not caught_up() and time.monotonic() < deadline:
            time.sleep(1)
        samples.append((time.monotonic() - t0, [sample(p) for p in pids]))
        status = estat.stop()
        with psycopg.connect(db) as conn:
            stored = [r[0] for r in conn.execute("SELECT event_id FROM user_activity_event")]
            ledger = dict(
                ((r[0], r[1]), int(r[2]))
                for r in conn.execute(
                    "SELECT dataset, stage, sum(events) FROM estat_ledger GROUP BY 1, 2"
                )
            )
        got = httpx.get(cap_url + "/uuids", timeout=60).json()
    finally:
        if estat is not None:
            estat.kill()
        cap.kill()
        moto.stop()
        redis.stop()
        pg.destroy()
    events = len(sent["client"]) + len(sent["server"])
    print(
        f"sent for {loaded:.0f} s: {len(sent['client']):,} client events, "
        f"{len(sent['server']):,} server events, {sent['collect']:,} /collect records "
        f"({events / loaded:,.0f} events/s); not 200: {sent['refused'] or 'none'}"
    )
    print("memory (RSS MiB / descriptors) per worker:")
    for at, per in samples[:: max(1, len(samples) // 8)] + samples[-1:]:
        cells = ", ".join(f"{rss / 1024:.0f} / {fds}" for rss, fds in per)
        print(f"  {at:6.0f} s  {cells}")
    unique = set(stored)
    lost = accepted - unique
    received = set(got)
    want = {event_uuid(e) for e in unique}  # PostHog's uuid of each stored event
    print(
        f"stored: {len(stored):,} rows, {len(accepted & unique):,} of {len(accepted):,} accepted, "
        f"{len(stored) - len(unique)} twice, {len(lost)} missing"
    )
    print(
        f"capture server: {len(got):,} received, {len(received & want):,} of the stored, "
        f"{len(got) - len(received)} twice"
    )
    print(f"ledger: {ledger}; estat exit status {status}")
    ok = (
        not lost
        and len(stored) == len(unique)
        and received == want
        and len(got) == len(received)
        and ledger.get(("user-activity", "stored")) == len(accepted)
        and ledger.get(("raw", "accepted")) == ledger.get(("raw", "lake")) == sent["collect"]
        and ledger.get(("events", "accepted"))
        == ledger.get(("events", "lake"))
        == len(sent["client"])
        and ledger.get(("user-activity", "dispatched:POSTHOG")) == len(accepted)
        and status == 0
    )
    print("oracle:", "every accepted event once, everywhere" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
