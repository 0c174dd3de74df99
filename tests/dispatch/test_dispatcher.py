"""The dispatcher with the PostHog destination and a PostHog-compatible
capture server, on a real SQLite event store: every stored event arrives
once, an outage opens the breaker and waits, a refused event is parked
alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, update

from estat.activity_app import build_dispatcher
from estat.clock import SystemClock
from estat.dispatch.dispatcher import Dispatcher
from estat.dispatch.posthog import PostHog, event_uuid
from estat.ops.ledger import Ledger
from estat.ops.metrics import Metrics
from estat.ops.tasks import Supervisor
from estat.retry import RetryPolicy
from estat.settings import load_settings
from estat.stage import Deadline
from estat.store.db import Database
from estat.store.dispatch import DispatchOutbox
from estat.store.events import EventStore
from estat.store.rows import encode, event_row
from estat.store.schema import user_activity_dispatch_outbox as T
from tests.capture import CaptureServer
from tests.store.test_store import rec

FAST = RetryPolicy(base=0.1, cap=0.2, jitter="none")


def store(db: Database, n: int) -> list[str]:
    records = [rec() for _ in range(n)]
    EventStore(db, ["POSTHOG"]).store(
        [event_row(r) for r in records], [encode(r).decode() for r in records]
    )
    return [r.event_id for r in records]


def statuses(db: Database) -> dict[str, tuple[str, int, object]]:
    with db.engine.connect() as conn:
        return {
            r.event_id: (r.status, r.retry_count, r.next_retry_at) for r in conn.execute(select(T))
        }


async def until(cond: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.02)


async def running(db: Database, capture: CaptureServer, **kw: float) -> Dispatcher:
    d = Dispatcher(
        DispatchOutbox(db, policy=FAST, max_attempts=kw.pop("max_attempts", 20)),  # type: ignore[arg-type]
        [PostHog(capture.url, "phc_test")],
        batch_size=int(kw.pop("batch_size", 50)),
        poll_interval=0.05,
        clock=SystemClock(),
        **kw,  # type: ignore[arg-type]
    )
    await d.start(Supervisor(Metrics(), lambda name: None).spawn)
    return d


@pytest.fixture
def db(tmp_path: Path) -> Database:
    d = Database(f"sqlite:///{tmp_path / 'e.db'}")
    d.upgrade()
    return d


async def test_every_stored_event_arrives_once(db: Database, capture: CaptureServer) -> None:
    ids = store(db, 230)
    d = await running(db, capture)
    await until(lambda: len(capture.accepted) >= 230)
    d.close()
    await d.join(Deadline.after(10, SystemClock()))
    assert sorted(capture.uuids()) == sorted(event_uuid(i) for i in ids)  # once each
    assert {s for s, _, _ in statuses(db).values()} == {"DISPATCHED"}


async def test_an_outage_opens_the_breaker_and_everything_arrives_after(
    db: Database, capture: CaptureServer
) -> None:
    ids = store(db, 40)
    capture.status = 503
    d = await running(db, capture, batch_size=10, breaker_threshold=2, open_for=0.5, concurrency=1)
    breaker = d.breakers["POSTHOG"]
    await until(lambda: breaker.last.state == "open")
    attempted = capture.requests
    await asyncio.sleep(0.2)
    assert capture.requests == attempted  # open: nothing is attempted
    charged = [c for _, c, _ in statuses(db).values() if c]
    assert len(charged) == 20  # only the two batches that were attempted
    capture.status = None  # PostHog is back
    await until(lambda: len(capture.accepted) >= 40)
    await until(lambda: breaker.last.state == "closed")
    d.close()
    await d.join(Deadline.after(10, SystemClock()))
    assert sorted(capture.uuids()) == sorted(event_uuid(i) for i in ids)


async def test_the_settings_set_the_requests_in_flight(
    db: Database, capture: CaptureServer, tmp_path: Path
) -> None:
    """3 lanes x 6 requests each: 18 requests on the network at once, on
    one pooled client (none waits for a connection of the pool), each
    event once."""
    s = load_settings(
        data_dir=tmp_path, dispatch_targets="POSTHOG", posthog_host=capture.url,
        posthog_api_key="phc_test", dispatch_batch_size=10, dispatch_concurrency=3,
        dispatch_lane_in_flight=6,
    )  # fmt: skip
    ids = store(db, 400)
    capture.hang = 0.3
    d = build_dispatcher(s, db, Metrics(), SystemClock(), None)
    await d.start(Supervisor(Metrics(), lambda name: None).spawn)
    await until(lambda: len(capture.accepted) >= 400)
    d.close()
    await d.join(Deadline.after(10, SystemClock()))
    assert capture.most_in_flight == 18
    assert sorted(capture.uuids()) == sorted(event_uuid(i) for i in ids)


async def test_a_refused_event_is_parked_alone(db: Database, capture: CaptureServer) -> None:
    ids = store(db, 12)
    capture.bad_uuids = {event_uuid(ids[5])}
    d = await running(db, capture)
    await until(lambda: len(capture.accepted) >= 11)
    await until(lambda: statuses(db)[ids[5]][0] == "FAILED")
    d.close()
    await d.join(Deadline.after(10, SystemClock()))
    st = statuses(db)
    assert st[ids[5]] == ("FAILED", 1, None)  # parked: an operator replays it
    assert all(st[i][0] == "DISPATCHED" for i in ids if i != ids[5])
    assert event_uuid(ids[5]) not in capture.uuids()


async def test_deliveries_are_counted_in_the_ledger_hour_their_event_was_stored(
    db: Database, capture: CaptureServer
) -> None:
    """Stored across local hour boundaries of a zone 5:45 ahead of UTC: each
    delivery counted in its own hour, and the latency observed per event."""
    ids = store(db, 12)
    tz = ZoneInfo("Asia/Kathmandu")
    base = datetime(2026, 12, 1, 8, 0, tzinfo=tz).timestamp()  # a local hour's start
    offsets = [-3600.5, -1, -0.001, 0, 0.001, 899, 900, 1799, 3599.999, 3600, 5400, 7199]
    with db.engine.begin() as conn:
        for event_id, off in zip(ids, offsets, strict=True):
            at = datetime.fromtimestamp(base + off, UTC)
            conn.execute(update(T).where(T.c.event_id == event_id).values(created_at=at))
    truth: dict[int, int] = {}
    for off in offsets:
        local = datetime.fromtimestamp(base + off, tz).replace(minute=0, second=0, microsecond=0)
        truth[int(local.timestamp())] = truth.get(int(local.timestamp()), 0) + 1
    assert sorted(truth.values()) == [1, 2, 3, 6]  # four local hours
    m = Metrics()
    d = await running(db, capture, metrics=m)  # type: ignore[arg-type]
    d.ledger = Ledger("Asia/Kathmandu")
    await until(lambda: len(capture.accepted) >= 12)
    d.close()
    await d.join(Deadline.after(10, SystemClock()))
    got = {h: n for (ds, h, stage), n in d.ledger.take().items() if stage == "dispatched:POSTHOG"}
    assert got == truth
    m.flush()
    samples = [s for f in m.dispatch_latency.collect() for s in f.samples]
    assert sum(s.value for s in samples if s.name.endswith("_count")) == 12
