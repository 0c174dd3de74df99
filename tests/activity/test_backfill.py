"""``estat store backfill``'s reading and storing, on a real local lake and
SQLite or a real PostgreSQL: which partition hours a window reads, what is
stored once, what is counted unreadable, and the command's failures."""

from __future__ import annotations

import gzip
import os
import random
import subprocess
import sys
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from estat.activity.backfill import Backfill, Tally, from_lake, from_outbox, hour_prefixes
from estat.lake.keys import object_key
from estat.lake.sink import local_sink
from estat.store.db import Database
from estat.store.events import EventStore
from estat.store.outbox import SourceOutbox
from estat.store.rows import encode, event_row
from estat.store.schema import user_activity_dispatch_outbox, user_activity_event
from tests.conftest import MotoServer, free_port
from tests.store.test_store import rec


def put(root: Path, key: str, lines: Iterable[bytes]) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))


def ids_in(db: Database) -> list[str]:
    with db.engine.connect() as conn:
        return [r[0] for r in conn.execute(select(user_activity_event.c.event_id))]


@pytest.mark.parametrize(
    "zone", ["UTC", "Asia/Seoul", "Asia/Kolkata", "Asia/Kathmandu", "America/New_York"]
)
def test_a_window_reads_exactly_the_partition_hours_its_events_were_keyed_in(zone: str) -> None:
    """Any window (odd seconds, minutes or hours long, across midnight and
    a DST change): the hours read are those a batch cut within it was keyed
    in, no more. (A window of 20:55:30-21:06:30 read hour 20 only.)"""
    tz = ZoneInfo(zone)
    rng = random.Random(zone)
    for _ in range(60):
        start = datetime(2026, 10, 31, 20, tzinfo=UTC) + timedelta(
            seconds=rng.randrange(3 * 86400) + rng.random()
        )
        end = start + timedelta(seconds=rng.choice([1, 59, 600, 3599, 3600, 7201, 86400 + 77]))
        got = hour_prefixes("events", start, end, tz)
        want: dict[str, None] = {}
        t, last = start.timestamp(), end.timestamp()
        step = 1 if last - t < 7200 else 30
        # every second (half minute) the window holds, and its last moment:
        # the key a batch cut then gets
        for at in [*(t + i * step for i in range(int((last - t) / step) + 1)), last - 0.001]:
            if at < last:
                want[object_key("events", at, tz, "i", 0).rsplit("/", 1)[0] + "/"] = None
        assert got == list(want), (start, end)


def test_a_repeated_local_hour_is_read_once() -> None:
    tz = ZoneInfo("America/New_York")  # 2026-11-01 01:00-02:00 local happens twice
    start = datetime(2026, 11, 1, 4, 30, tzinfo=UTC)
    got = hour_prefixes("events", start, start + timedelta(hours=3), tz)
    assert got == [
        "events/dt=2026-11-01/hr=00/",
        "events/dt=2026-11-01/hr=01/",
        "events/dt=2026-11-01/hr=02/",
    ]


async def test_lake_events_are_stored_once_with_their_dispatch_rows(
    db: Database, tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    records = [rec(member=str(i) if i % 3 else f"auth0|{i}") for i in range(30)]
    lines = [encode(r) for r in records]
    put(lake, "events/dt=2026-12-01/hr=10/1_a_000000.jsonl.gz", lines[:20])
    put(lake, "events/dt=2026-12-01/hr=11/2_a_000000.jsonl.gz", lines[20:])
    put(lake, "events/dt=2026-12-01/hr=12/3_a_000000.jsonl.gz", [encode(rec())])  # outside
    (lake / "events/dt=2026-12-01/hr=10/_MANIFEST.json").write_text("{}")
    store = EventStore(db, ["POSTHOG", "WEBHOOK"])
    already = records[5]  # stored by the consumer before the bus lost the rest
    store.store([event_row(already)], [encode(already).decode()])
    sink = local_sink(lake)
    window = hour_prefixes(
        "events", datetime(2026, 12, 1, 10, tzinfo=UTC), datetime(2026, 12, 1, 12, tzinfo=UTC),
        ZoneInfo("UTC"),
    )  # fmt: skip
    counted: list[int] = []
    dry = await from_lake(Backfill(store, batch_size=7, dry_run=True), sink, window)
    assert (dry.objects, dry.read, dry.inserted, dry.duplicates) == (2, 30, 29, 1)
    assert len(ids_in(db)) == 1
    t = await from_lake(Backfill(store, batch_size=7, on_stored=counted.append), sink, window)
    assert (t.objects, t.read, t.inserted, t.duplicates, t.unreadable) == (2, 30, 29, 1, 0)
    assert t.dispatch == {"POSTHOG": 29, "WEBHOOK": 29}
    assert sum(counted) == 29
    assert sorted(ids_in(db)) == sorted(r.event_id for r in records)
    with db.engine.connect() as conn:
        per = conn.execute(
            select(user_activity_dispatch_outbox.c.dispatch_target, func.count()).group_by(
                user_activity_dispatch_outbox.c.dispatch_target
            )
        ).all()
        keys = conn.execute(
            select(user_activity_event.c.member_key).where(
                user_activity_event.c.event_id == records[0].event_id
            )
        ).scalar_one()
    assert sorted(per) == [("POSTHOG", 30), ("WEBHOOK", 30)]
    assert keys == "auth0|0"  # the member id as the consumer stores it
    again = await from_lake(Backfill(store), sink, window)
    assert (again.inserted, again.duplicates) == (0, 30)


async def test_what_cannot_be_stored_is_counted_with_its_reason_and_the_rest_is_stored(
    db: Database, tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    good = [rec() for _ in range(6)]
    nul = rec(props=b'{"q":"a\\u0000b"}')  # jsonb refuses it; SQLite stores it
    lines = [encode(r) for r in good[:3]] + [b"{not json", encode(nul)]
    lines += [encode(r) for r in good[3:]]
    put(lake, "events/dt=2026-12-01/hr=10/1_a_000000.jsonl.gz", lines)
    (lake / "events/dt=2026-12-01/hr=10/2_a_000000.jsonl.gz").write_bytes(b"not gzip")
    store = EventStore(db, ["POSTHOG"])
    t = await from_lake(
        Backfill(store, batch_size=100), local_sink(lake), ["events/dt=2026-12-01/hr=10/"]
    )
    refused = 1 if db.dialect == "postgresql" else 0
    assert (t.objects, t.read) == (2, 8)
    assert t.unreadable == 2 + refused
    assert t.inserted == 6 + 1 - refused
    assert any("not gzip" in e for e in t.examples)
    assert any("line 4: bad payload" in e for e in t.examples)
    if refused:
        assert any(nul.event_id in e and "refused" in e for e in t.examples)
    assert set(ids_in(db)) >= {r.event_id for r in good}


def test_server_events_are_stored_from_the_source_outbox_rows_of_the_window(
    db: Database,
) -> None:
    outbox = SourceOutbox(db)
    now = datetime.now(UTC)
    records = [rec(member="42") for _ in range(250)]
    outbox.enqueue(records)
    store = EventStore(db, ["POSTHOG"])
    window = (now - timedelta(minutes=1), now + timedelta(minutes=1))
    t = from_outbox(Backfill(store, batch_size=100), *window)
    assert (t.read, t.inserted, t.duplicates, t.objects) == (250, 250, 0, 3)
    assert sorted(ids_in(db)) == sorted(r.event_id for r in records)
    later = from_outbox(Backfill(store), now + timedelta(minutes=1), now + timedelta(minutes=2))
    assert later.read == 0


def _estat(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "estat", *args],
        env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_command_says_what_failed_and_exits_1(tmp_path: Path) -> None:
    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "RAW_BUCKET": "lake",
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",  # nobody answers
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_REGION": "us-east-1",
    }
    window = ["--from", "2026-12-01T10:00", "--to", "2026-12-01T11:00"]
    assert _estat(env, tmp_path, "migrate").returncode == 0
    r = _estat(env, tmp_path, "store", "backfill", *window)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "backfill stopped: the lake (connection_refused)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    back = ["--from", "2026-12-01T11:00", "--to", "2026-12-01T10:00"]
    bad = _estat(env, tmp_path, "store", "backfill", *back)
    assert bad.returncode == 2
    assert "--to must be after --from" in bad.stderr
    bad = _estat(env, tmp_path, "store", "backfill", "--from", "yesterday", "--to", "2026-12-01")
    assert bad.returncode == 2
    assert "--from / --to" in bad.stderr
    nowhere = _estat(env, tmp_path, "store", "backfill", *window, "--dispatch", "posthog")
    assert nowhere.returncode == 2
    assert "--dispatch POSTHOG: not a configured destination" in nowhere.stderr
    outbox_only = _estat(env, tmp_path, "store", "backfill", *window, "--source", "outbox")
    assert outbox_only.returncode == 0, outbox_only.stderr
    assert outbox_only.stdout.startswith("outbox: 0 pages, 0 events read")


@pytest.mark.parametrize("dry_run", [True, False])
async def test_an_event_in_both_the_lake_and_the_outbox_is_counted_once(
    db: Database, tmp_path: Path, dry_run: bool
) -> None:
    """A client event accepted while the bus was down went to the source
    outbox and to the lake: both sources hold it."""
    r = rec()
    put(tmp_path / "lake", "events/dt=2026-12-01/hr=10/1_a_000000.jsonl.gz", [encode(r)])
    SourceOutbox(db).enqueue([r])
    now = datetime.now(UTC)
    fill = Backfill(EventStore(db, ["POSTHOG"]), dry_run=dry_run)
    lake = await from_lake(fill, local_sink(tmp_path / "lake"), ["events/dt=2026-12-01/hr=10/"])
    outbox = from_outbox(fill, now - timedelta(minutes=1), now + timedelta(minutes=1))
    assert (lake.inserted, outbox.inserted, outbox.duplicates) == (1, 0, 1)
    assert ids_in(db) == ([] if dry_run else [r.event_id])


async def test_a_destination_added_later_gets_the_stored_events_of_the_window(
    db: Database, tmp_path: Path
) -> None:
    records = [rec() for _ in range(10)]
    put(tmp_path / "lake", "events/dt=2026-12-01/hr=10/1_a_000000.jsonl.gz", map(encode, records))
    EventStore(db, ["POSTHOG"]).store(
        [event_row(r) for r in records], [encode(r).decode() for r in records]
    )  # stored while only PostHog was configured
    with db.engine.begin() as conn:  # one had reached the webhook some other way
        conn.execute(
            user_activity_dispatch_outbox.insert(),
            {"event_id": records[0].event_id, "dispatch_target": "WEBHOOK",
             "payload": encode(records[0]).decode(), "status": "DISPATCHED"},
        )  # fmt: skip

    def rows() -> list[tuple[str, int]]:
        d = user_activity_dispatch_outbox
        with db.engine.connect() as conn:
            q = select(d.c.dispatch_target, func.count()).group_by(d.c.dispatch_target)
            return sorted((str(a), int(b)) for a, b in conn.execute(q).tuples())

    later = EventStore(db, ["POSTHOG", "WEBHOOK"])
    sink, hour = local_sink(tmp_path / "lake"), ["events/dt=2026-12-01/hr=10/"]
    dry = await from_lake(Backfill(later, dry_run=True, dispatch=["WEBHOOK"]), sink, hour)
    assert (dry.inserted, dry.dispatch) == (0, {"WEBHOOK": 9})
    assert rows() == [("POSTHOG", 10), ("WEBHOOK", 1)]
    t = await from_lake(Backfill(later, batch_size=4, dispatch=["WEBHOOK"]), sink, hour)
    assert (t.inserted, t.duplicates, t.dispatch) == (0, 10, {"WEBHOOK": 9})
    assert rows() == [("POSTHOG", 10), ("WEBHOOK", 10)]
    again = await from_lake(Backfill(later, dispatch=["WEBHOOK"]), sink, hour)
    assert again.dispatch == {}


async def test_a_lake_failing_half_way_leaves_the_counts_of_what_was_stored(
    tmp_path: Path,
) -> None:
    """The command reports what was done before the lake failed (run it
    again for the rest)."""
    from estat.errors import RetryableDeliveryError

    lake = tmp_path / "lake"
    first = [rec() for _ in range(4)]
    put(lake, "events/dt=2026-12-01/hr=10/1_a_000000.jsonl.gz", map(encode, first))
    put(lake, "events/dt=2026-12-01/hr=11/2_a_000000.jsonl.gz", [encode(rec())])
    real = local_sink(lake)

    class Failing:  # the lake stops answering after the first hour
        async def keys(self, prefix: str) -> list[str]:
            return await real.keys(prefix)

        async def get(self, key: str) -> bytes:
            if "hr=11" in key:
                raise RetryableDeliveryError("no answer", error_class="timeout")
            return await real.get(key)

    db = Database(f"sqlite:///{tmp_path / 'e.db'}")
    db.upgrade()
    tally = Tally("lake")
    hours = ["events/dt=2026-12-01/hr=10/", "events/dt=2026-12-01/hr=11/"]
    with pytest.raises(RetryableDeliveryError):
        await from_lake(Backfill(EventStore(db)), Failing(), hours, tally)  # type: ignore[arg-type]
    assert (tally.objects, tally.read, tally.inserted) == (1, 4, 4)
    assert sorted(ids_in(db)) == sorted(r.event_id for r in first)
    db.close()


def test_one_shot_s3_commands_end_with_their_own_status(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    """obstore's Tokio threads, caught mid-task by the interpreter's
    finalization, aborted about one run in five of `estat store backfill` on
    S3 (status 134 after a complete run). Six at a time, four times: each
    ends 0."""
    import concurrent.futures

    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "RAW_BUCKET": bucket,
        "S3_ENDPOINT_URL": moto.endpoint,
    }
    assert _estat(env, tmp_path, "migrate").returncode == 0
    window = ["--from", "2026-12-01T10:00", "--to", "2026-12-01T11:00", "--source", "lake"]
    runs: list[subprocess.CompletedProcess[str]] = []
    for _ in range(4):
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            runs += pool.map(
                lambda _: _estat(env, tmp_path, "store", "backfill", *window), range(6)
            )
    assert [r.returncode for r in runs] == [0] * len(runs), [r.stderr[-300:] for r in runs]
    assert all(r.stdout.startswith("lake: 0 objects, 0 events read") for r in runs)


def test_a_backfill_can_be_interrupted() -> None:
    """`estat store …` holds SIGTERM/SIGINT until its handlers exist (a
    server); `estat store backfill` is a one-shot command: Ctrl-C stops it."""
    from estat.__main__ import _long_running

    assert _long_running(["store"])
    assert _long_running(["serve", "--workers", "2"])
    assert not _long_running(["store", "backfill", "--from", "x", "--to", "y"])
    assert not _long_running(["store", "verify-backup", "f.dump"])
