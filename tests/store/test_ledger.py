"""The completeness ledger: counts from every process added up in the
database (SQLite and PostgreSQL), an hour complete only once it closed and
its grace passed with every accepted event in the lake, the gap gauge; and
an in-process estat whose /collect and client events are counted accepted,
in the lake, stored, by the admin API."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from estat.clock import FakeClock
from estat.ops.ledger import Ledger
from estat.ops.metrics import Metrics
from estat.store.db import Database
from estat.store.ledger import LedgerFlusher, add, read
from tests.admin.test_admin import ENTRIES, auth
from tests.conftest import free_port
from tests.e2e.test_pipeline_e2e import client_batch
from tests.ingest.helpers import close_all, start_app

H = 1_700_002_800  # an hour's start


def test_counts_from_every_process_add_up(db: Database) -> None:
    now = datetime.now(UTC)
    add(db, {("raw", H, "accepted"): 10, ("raw", H, "lake"): 4}, now)
    add(db, {("raw", H, "accepted"): 5, ("raw", H, "lake"): 11}, now)  # another process
    add(db, {("events", H + 3600, "accepted"): 3}, now)
    hours = read(db, datetime.fromtimestamp(H, UTC), datetime.fromtimestamp(H + 7200, UTC))
    assert [(h.dataset, int(h.hour.timestamp()), h.stages) for h in hours] == [
        ("raw", H, {"accepted": 15, "lake": 15}),
        ("events", H + 3600, {"accepted": 3}),
    ]


async def test_a_gap_counts_only_once_the_hour_and_its_grace_passed(db: Database) -> None:
    ledger = Ledger()
    ledger.add("raw", H, "accepted", 10)
    ledger.add("raw", H, "lake", 7)  # three still in a DLQ, or lost
    m = Metrics(CollectorRegistry())
    clock = FakeClock(H + 3600 + 600)  # the hour closed ten minutes ago
    f = LedgerFlusher(ledger, db, m, clock, grace=900)
    await f.flush()
    await f.refresh_gaps()
    assert m.registry.get_sample_value("completeness_gap_events", {"dataset": "raw"}) == 0
    clock.advance(301)  # past the grace: a gap
    await f.refresh_gaps()
    assert m.registry.get_sample_value("completeness_gap_events", {"dataset": "raw"}) == 3
    ledger.add("raw", H, "lake", 3)  # the DLQ replayed them
    await f.flush()
    await f.refresh_gaps()
    assert m.registry.get_sample_value("completeness_gap_events", {"dataset": "raw"}) == 0


async def test_an_estat_counts_what_it_accepted_stored_and_kept(tmp_path: Path) -> None:
    app = await start_app(
        tmp_path, admin_addr=f"127.0.0.1:{free_port()}", admin_tokens=ENTRIES,
        flush_interval="100ms",
    )  # fmt: skip
    assert app.admin is not None
    assert app.admin.address is not None
    host, port = app.admin.address
    assert app.address is not None
    ingest = f"http://{app.address[0]}:{app.address[1]}"
    async with httpx.AsyncClient(timeout=10) as c:
        for _ in range(7):
            assert (await c.post(ingest + "/collect", content=b'{"e":1}')).status_code == 200
        r = await c.post(ingest + "/api/v1/analytics/events", json=client_batch(["a1", "a2", "a3"]))
        assert r.status_code == 200

        async def hours() -> dict[str, dict[str, object]]:
            r = await c.get(
                f"http://{host}:{port}/api/v1/admin/completeness", headers=auth("reader")
            )
            assert r.status_code == 200, r.text
            return {h["dataset"]: h for h in r.json()}

        deadline = time.monotonic() + 20
        while True:
            got = await hours()
            if (
                got.get("raw", {}).get("lake") == 7
                and got.get("events", {}).get("lake") == 3
                and got.get("user-activity", {}).get("stored") == 3
            ):
                break
            assert time.monotonic() < deadline, got
            await asyncio.sleep(0.2)
    raw = got["raw"]
    assert (raw["accepted"], raw["lake"], raw["closed"], raw["gap"]) == (7, 7, False, 0)
    assert got["events"]["accepted"] == 3
    hour = datetime.fromisoformat(str(raw["hour"]))
    assert datetime.now(UTC) - hour < timedelta(hours=1)
    await close_all()
    await app.shutdown()


async def test_a_complete_hour_gets_a_manifest_once(db: Database, tmp_path: Path) -> None:
    import json

    from estat.lake.sink import local_sink

    sink = local_sink(tmp_path / "lake")
    ledger = Ledger()
    part = "raw/dt=2023-11-14/hr=23"  # the hour starting at H (UTC)
    for i, n in enumerate((4, 6)):
        data = f"object {i}".encode()
        await sink.put(f"{part}/{H}_i1_{i:06d}.jsonl.gz", data, {})
        ledger.stored_object(f"{part}/{H}_i1_{i:06d}.jsonl.gz", n, len(data), f"{i:064x}")
    ledger.add("raw", H, "accepted", 10)
    ledger.add("events", H, "accepted", 5)  # nothing in the lake: incomplete, no manifest
    clock = FakeClock(H + 3600 + 60)
    writers = [
        LedgerFlusher(ledger, db, Metrics(CollectorRegistry()), clock, grace=900, put=put)
        for put in (lambda k, d: sink.put(k, d, {}),) * 2
    ]  # two processes
    await writers[0].flush()
    assert await writers[0].write_manifests() == 0  # the hour's grace has not passed
    clock.advance(900)
    assert [await w.write_manifests() for w in writers] == [1, 0]  # written once
    manifest = json.loads(await sink.get(f"{part}/_MANIFEST.json"))
    assert (manifest["dataset"], manifest["accepted"], manifest["events"]) == ("raw", 10, 10)
    assert [(o["events"], o["sha256"][-1]) for o in manifest["objects"]] == [(4, "0"), (6, "1")]
    assert not (tmp_path / "lake" / "events").exists()


async def test_counts_survive_a_database_that_fails_and_a_lake_that_refuses(
    db: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ledger's table goes missing (a real error from the database): the
    counts stay in memory and are added at the next flush that works, the
    failure said once however many flushes fail, and its end said; a
    manifest the lake refuses is written at the next pass, once."""
    from sqlalchemy import text

    from estat.lake.sink import local_sink

    ledger = Ledger()
    ledger.stored_object("raw/dt=2023-11-14/hr=23/o1.jsonl.gz", 5, 10, "a" * 64)
    ledger.add("raw", H, "accepted", 5)
    clock = FakeClock(H + 3600 + 1000)
    attempts: list[str] = []
    sink = local_sink(tmp_path / "lake")

    async def flaky_put(key: str, data: bytes) -> None:
        attempts.append(key)
        if len(attempts) == 1:
            raise OSError(5, "Input/output error")  # the lake refuses the first write
        await sink.put(key, data, {})

    f = LedgerFlusher(ledger, db, Metrics(CollectorRegistry()), clock, grace=900, put=flaky_put)
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE estat_ledger RENAME TO estat_ledger_away"))
    capsys.readouterr()
    for _ in range(4):  # every flush fails: kept
        ledger.add("raw", H - 7200, "accepted", 1)  # an hour counted through the outage
        await f.flush()
    said = capsys.readouterr().out
    assert said.count("ledger: write failed") == 1  # once per outage, not every 5 s
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE estat_ledger_away RENAME TO estat_ledger"))
    ledger.add("raw", H, "accepted", 0)
    await f.flush()
    assert "ledger: written again" in capsys.readouterr().out
    window = (datetime.fromtimestamp(H, UTC), datetime.fromtimestamp(H + 3600, UTC))
    assert [h.stages for h in read(db, *window)] == [{"accepted": 5, "lake": 5}]
    earlier = (window[0] - timedelta(hours=2), window[0] - timedelta(hours=1))
    assert [h.stages for h in read(db, *earlier)] == [{"accepted": 4}]  # none lost
    assert await f.write_manifests() == 0  # refused: the claim is given back
    assert await f.write_manifests() == 1  # the next pass writes it
    assert await f.write_manifests() == 0  # and only once
    assert len(attempts) == 2
    assert b'"events": 5' in await sink.get("raw/dt=2023-11-14/hr=23/_MANIFEST.json")
