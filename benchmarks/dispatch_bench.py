"""``make bench`` (dispatch part): the dispatcher's throughput from the
dispatch outbox (PostgreSQL) to a PostHog-compatible capture server,
beside that server's own ceiling measured in the same run: a plain httpx
client posting prebuilt ``/batch/`` bodies (already encoded, gzip-encoded
above 64 KB like the dispatcher's), as many requests at a time as the
dispatcher has in flight (``DISPATCH_CONCURRENCY``, 2). Batches of 100 and
1,000 events.

The capture server runs in its own process (uvicorn), so the two sides do
not share a GIL. Figures, not assertions.
"""

from __future__ import annotations

import asyncio
import gzip
import importlib
import os
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import msgspec

from estat.clock import SystemClock
from estat.dispatch.dispatcher import Dispatcher
from estat.dispatch.posthog import PostHog, capture_event
from estat.model import EventRecord
from estat.ops.metrics import Metrics
from estat.ops.tasks import Supervisor
from estat.stage import Deadline
from estat.store.db import Database
from estat.store.dispatch import DispatchOutbox
from estat.store.events import EventStore
from estat.store.rows import encode, event_row

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
free_port = importlib.import_module("run").free_port
PostgresServer = importlib.import_module("tests.servers").PostgresServer

N = int(os.environ.get("BENCH_DISPATCH_EVENTS", "30000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
PROPS = b'{"page":"/restaurants/12345","referrer":"https://www.example.org/search?q=sushi","position":3,"sessionId":"s-1","platform":"web","source":"CLIENT"}'

# the capture server validates every event as PostHog does but keeps only a
# count (a list of every event accepted would grow the heap, and the
# garbage collector's pauses with it, from round to round)
SERVER = """
import sys, uvicorn
from tests.capture import CaptureServer
class Count:
    n = 0
    def extend(self, batch):
        self.n += len(batch)
c = CaptureServer()
c.accepted = Count()
uvicorn.run(c.app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="off")
"""


def events(n: int) -> list[EventRecord]:
    """n events, two in three of a member (the others anonymous)."""
    out = []
    for i in range(n):
        member = str(i % 5000) if i % 3 else None
        e = EventRecord(
            uuid.uuid4().hex, "ui.page.viewed", "v1", "2026-11-30T10:00:00.000Z",
            "2026-11-30T10:00:01.000Z", member, "anon-1", msgspec.Raw(PROPS), "CLIENT",
            "81.2.69.160", "bench",
        )  # fmt: skip
        out.append(e)
    return out


def start_capture() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/batch/", timeout=1)
        except urllib.error.HTTPError:
            return proc, url  # 405: it answers
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("capture server did not start")


CONCURRENCY = 2


async def ceiling(url: str, recs: list[EventRecord], batch: int) -> float:
    """Prebuilt bodies, ``CONCURRENCY`` in flight: the capture server's ceiling."""
    bodies = []
    for i in range(0, len(recs), batch):
        body = msgspec.json.encode(
            {
                "api_key": "phc_test",
                "batch": [capture_event(e) for e in recs[i : i + batch]],
                "sent_at": datetime.now(UTC).isoformat(),
            }
        )
        gz = len(body) > 64 * 1024
        bodies.append((gzip.compress(body, 6) if gz else body, gz))
    async with httpx.AsyncClient(timeout=30) as client:

        async def lane(mine: list[tuple[bytes, bool]]) -> None:
            for body, gz in mine:
                headers = {"content-type": "application/json"}
                if gz:
                    headers["content-encoding"] = "gzip"
                r = await client.post(url + "/batch/", content=body, headers=headers)
                assert r.status_code == 200, r.text

        t0 = time.perf_counter()
        await asyncio.gather(*(lane(bodies[i::CONCURRENCY]) for i in range(CONCURRENCY)))
        return len(recs) / (time.perf_counter() - t0)


async def dispatch(db_url: str, url: str, recs: list[EventRecord], batch: int) -> float:
    """The outbox filled by the store, then drained by one dispatcher loop."""
    db = Database(db_url)
    db.upgrade()
    store = EventStore(db, ["POSTHOG"])
    for i in range(0, len(recs), 1000):
        chunk = recs[i : i + 1000]
        store.store([event_row(r) for r in chunk], [encode(r).decode() for r in chunk])
    m = Metrics()
    d = Dispatcher(
        DispatchOutbox(db), [PostHog(url, "phc_test")], batch_size=batch, poll_interval=1.0,
        clock=SystemClock(), metrics=m, concurrency=CONCURRENCY,
    )  # fmt: skip
    ok = m.dispatch_execute.labels("success", "POSTHOG")
    t0 = time.perf_counter()
    await d.start(Supervisor(m, lambda name: None).spawn)
    while ok._value.get() < len(recs):
        await asyncio.sleep(0.002)
    rate = len(recs) / (time.perf_counter() - t0)
    d.close()
    await d.join(Deadline.after(10, SystemClock()))
    counts = await db.run(d.outbox.counts)
    assert counts == {("POSTHOG", "DISPATCHED"): len(recs)}, counts
    db.close()
    return rate


async def main_async(pg: object) -> None:
    proc, url = start_capture()
    try:
        print(f"dispatch to the capture server, {N:,} events per run, {ROUNDS} runs, medians")
        print(f"{'batch':>6} {'ceiling ev/s':>13} {'estat ev/s':>11} {'ratio':>6}")
        for batch in (100, 1000):
            ceil, ours, ratios = [], [], []
            for _ in range(ROUNDS):
                recs = events(N)
                c = await ceiling(url, recs, batch)
                o = await dispatch(pg.create_database(), url, events(N), batch)  # type: ignore[attr-defined]
                ceil.append(c)
                ours.append(o)
                ratios.append(o / c)
            print(
                f"{batch:>6} {statistics.median(ceil):>13,.0f} {statistics.median(ours):>11,.0f} "
                f"{statistics.median(ratios):>6.2f}   runs: "
                + ", ".join(f"{r:.2f}" for r in ratios)
            )
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    pg = PostgresServer(free_port())
    pg.start()
    try:
        asyncio.run(main_async(pg))
    finally:
        pg.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
