"""``make bench`` (dispatch part): the dispatcher's throughput from the
dispatch outbox (PostgreSQL) to a PostHog-compatible capture server,
beside that server's own ceiling measured in the same run: a plain httpx
client posting prebuilt ``/batch/`` bodies (already encoded, gzip-encoded
above 64 KB like the dispatcher's), the better of 2 requests at a time
and as many as the dispatcher may have in flight (``DISPATCH_CONCURRENCY``
lanes x ``DISPATCH_LANE_IN_FLIGHT``, the defaults: 2 x 4). Batches of 100
and 1,000 events.

The capture server runs in its own process (uvicorn), so the two sides do
not share a GIL. Beside the rates, the CPU each party spent per event in
the dispatch runs (this process: the dispatcher; the capture server's
process; the rest of the machine's busy time: PostgreSQL), read from
``/proc``: on a machine whose cores the three share, they say what bounds
the rate. Figures, not assertions.
"""

from __future__ import annotations

import asyncio
import gzip
import importlib
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg

from estat.clock import SystemClock
from estat.dispatch.dispatcher import Dispatcher
from estat.dispatch.posthog import PostHog, capture_event
from estat.model import EventRecord
from estat.ops.metrics import Metrics
from estat.ops.tasks import Supervisor
from estat.settings import Settings
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
c.hang = float(sys.argv[2])  # seconds before each answer (a destination far away)
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


def start_capture(delay: float = 0.0) -> tuple[subprocess.Popen[bytes], str]:
    """The capture server in its own process; each answer ``delay`` seconds
    late (the round trip to a destination across the internet)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(delay)], cwd=ROOT)
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


CONCURRENCY = 2  # lanes
#: requests per lane: the default (4) unless BENCH_DISPATCH_IN_FLIGHT says
IN_FLIGHT = int(
    os.environ.get(
        "BENCH_DISPATCH_IN_FLIGHT", Settings.model_fields["dispatch_lane_in_flight"].default
    )
)
TICK = os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (``/proc/stat``)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / TICK  # all but idle and iowait


def process_cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


class CpuSplit:
    """CPU per event by party over a window: (dispatcher, capture, database)."""

    def __init__(self, capture_pid: int) -> None:
        self.pid = capture_pid
        self.t0 = self._now()

    def _now(self) -> tuple[float, float, float]:
        return (process_cpu(os.getpid()), process_cpu(self.pid), machine_busy())

    def per_event(self, n: int) -> tuple[float, float, float]:
        ours, cap, busy = (b - a for a, b in zip(self.t0, self._now(), strict=True))
        return (ours / n * 1e6, cap / n * 1e6, max(0.0, busy - ours - cap) / n * 1e6)


async def ceiling(url: str, recs: list[EventRecord], batch: int) -> float:
    """Prebuilt bodies: the capture server's ceiling, the better of two
    requests in flight and as many as the dispatcher may have (more at once
    is slower for a server on one core)."""
    return max([await _posting(url, recs, batch, k) for k in (2, CONCURRENCY * IN_FLIGHT)])


async def _posting(url: str, recs: list[EventRecord], batch: int, k: int) -> float:
    """Prebuilt bodies, ``k`` requests in flight."""
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
        await asyncio.gather(*(lane(bodies[i::k]) for i in range(k)))
        return len(recs) / (time.perf_counter() - t0)


def fill(db_url: str, recs: list[EventRecord]) -> Database:
    db = Database(db_url)
    db.upgrade()
    store = EventStore(db, ["POSTHOG"])
    for i in range(0, len(recs), 1000):
        chunk = recs[i : i + 1000]
        store.store([event_row(r) for r in chunk], [encode(r).decode() for r in chunk])
    return db


def db_ceiling(db_url: str, recs: list[EventRecord], connections: int = 1) -> float:
    """The database's own ceiling for the same rows, with no HTTP and no
    Python per event: plain psycopg, 1,000 rows per transaction, each row
    locked (SKIP LOCKED), its payload read and marked DISPATCHED; on
    ``connections`` connections at once (threads: psycopg waits for the
    server without the GIL), so that with 2 the database has the whole
    machine to itself."""
    fill(db_url, recs).close()
    libpq = db_url.replace("postgresql+psycopg://", "postgresql://")
    conns = [psycopg.connect(libpq) for _ in range(connections)]
    done = [0] * connections

    def drain(i: int) -> None:
        conn = conns[i]
        while True:
            with conn.transaction():
                rows = conn.execute(
                    "SELECT id, payload::text FROM user_activity_dispatch_outbox "
                    "WHERE dispatch_target = 'POSTHOG' AND status = 'PENDING' "
                    "ORDER BY id LIMIT 1000 FOR NO KEY UPDATE SKIP LOCKED"
                ).fetchall()
                if not rows:
                    return
                conn.execute(
                    "UPDATE user_activity_dispatch_outbox SET status = 'DISPATCHED', "
                    "dispatched_at = now(), next_retry_at = NULL, updated_at = now() "
                    "WHERE id = ANY(%s)",
                    ([r[0] for r in rows],),
                )
                done[i] += len(rows)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=drain, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for c in conns:
        c.close()
    assert sum(done) == len(recs)
    return len(recs) / elapsed


async def dispatch(
    db_url: str,
    url: str,
    recs: list[EventRecord],
    batch: int,
    capture_pid: int,
    concurrency: int = CONCURRENCY,
    in_flight: int = IN_FLIGHT,
) -> tuple[float, tuple[float, float, float]]:
    """The outbox filled by the store, then drained by one dispatcher: the
    rate and the CPU per event by party."""
    db = fill(db_url, recs)
    m = Metrics()
    d = Dispatcher(
        DispatchOutbox(db), [PostHog(url, "phc_test")], batch_size=batch, poll_interval=1.0,
        clock=SystemClock(), metrics=m, concurrency=concurrency, in_flight=in_flight,
    )  # fmt: skip
    ok = m.dispatch_execute.labels("success", "POSTHOG")
    sup = Supervisor(m, lambda name: None)
    cpu = CpuSplit(capture_pid)
    t0 = time.perf_counter()
    await d.start(sup.spawn)
    while ok._value.get() < len(recs):
        await asyncio.sleep(0.002)
    rate = len(recs) / (time.perf_counter() - t0)
    split = cpu.per_event(len(recs))
    sup.stopping()
    d.close()
    await d.join(Deadline.after(10, SystemClock()))
    rows = await db.run(lambda: d.outbox.summary(datetime.now(UTC)))
    counts = {k: v for k, v in rows["POSTHOG"].items() if k in ("PENDING", "FAILED", "PARKED")}
    assert (rows["POSTHOG"].get("DISPATCHED"), counts) == (len(recs), {}), rows
    db.close()
    return rate, split


async def main_async(pg: object) -> None:
    proc, url = start_capture()
    try:
        print(f"dispatch to the capture server, {N:,} events per run, {ROUNDS} runs, medians")
        print(
            f"{'batch':>6} {'capture ev/s':>13} {'database ev/s':>14} {'db x2 ev/s':>11} {'estat ev/s':>11} "
            f"{'vs capture':>10} {'vs database':>11}"
        )
        for batch in (100, 1000):
            ceil, dbc, db2, ours, splits = [], [], [], [], []
            for _ in range(ROUNDS):
                ceil.append(await ceiling(url, events(N), batch))
                dbc.append(db_ceiling(pg.create_database(), events(N)))  # type: ignore[attr-defined]
                db2.append(db_ceiling(pg.create_database(), events(N), 2))  # type: ignore[attr-defined]
                rate, split = await dispatch(pg.create_database(), url, events(N), batch, proc.pid)  # type: ignore[attr-defined]
                ours.append(rate)
                splits.append(split)
            rc = [o / c for o, c in zip(ours, ceil, strict=True)]
            rd = [o / d for o, d in zip(ours, dbc, strict=True)]
            print(
                f"{batch:>6} {statistics.median(ceil):>13,.0f} {statistics.median(dbc):>14,.0f} "
                f"{statistics.median(db2):>11,.0f} "
                f"{statistics.median(ours):>11,.0f} {statistics.median(rc):>10.2f} "
                f"{statistics.median(rd):>11.2f}   vs database per run: "
                + ", ".join(f"{r:.2f}" for r in rd)
            )
            cpu = [statistics.median(s[i] for s in splits) for i in range(3)]
            print(
                f"{'':>6} CPU per dispatched event (median): dispatcher {cpu[0]:.1f} us, "
                f"capture server {cpu[1]:.1f} us, database {cpu[2]:.1f} us"
            )
    finally:
        proc.terminate()
        proc.wait(10)


def on_postgres(run: Callable[[Any], Coroutine[Any, Any, None]]) -> int:
    """``run(server)`` on a throwaway PostgreSQL server."""
    pg = PostgresServer(free_port())
    pg.start()
    try:
        asyncio.run(run(pg))
    finally:
        pg.destroy()
    return 0


def main() -> int:
    return on_postgres(main_async)


if __name__ == "__main__":
    raise SystemExit(main())
