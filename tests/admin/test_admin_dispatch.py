"""The admin API's dispatch routes on an in-process estat with PostHog
configured (a capture server): the summary by target and status, the
circuit opened by an outage, a manual reset that sends at once, the replay
of a parked event (dry run, target filter), the dispatcher paused and
resumed; every call audited."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from estat.admin.context import ADMIN_PREFIX
from estat.app import App
from estat.dispatch.posthog import event_uuid
from estat.store.schema import admin_audit_log
from tests.admin.test_admin import ENTRIES, auth, rec
from tests.capture import CaptureServer
from tests.conftest import free_port
from tests.ingest.helpers import close_all, start_app


async def until(cond: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.05)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[App, httpx.AsyncClient, CaptureServer]]:
    capture = CaptureServer()
    capture.start()
    app = await start_app(
        tmp_path, admin_addr=f"127.0.0.1:{free_port()}", admin_tokens=ENTRIES,
        posthog_host=capture.url, posthog_api_key="phc_test", dispatch_poll_interval="50ms",
        dispatch_circuit_failure_threshold="1", dispatch_circuit_open_duration="1h",
        dispatch_retry_base_delay="1h", dispatch_retry_max_delay="2h",
    )  # fmt: skip
    assert app.admin is not None
    assert app.admin.address is not None
    host, port = app.admin.address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as client:
        yield app, client, capture
    await close_all()
    await app.shutdown()
    capture.stop()


async def until_async(read: Callable[[], Awaitable[int]], want: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (got := await read()) != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"{got} != {want}")
        await asyncio.sleep(0.05)


async def stored(app: App, n: int) -> list[str]:
    assert app.activity is not None
    assert app.activity.publisher is not None
    records = [rec() for _ in range(n)]
    app.activity.publisher.put(records, None)
    return [r.event_id for r in records]


async def test_circuit_summary_reset_replay_and_pause(
    setup: tuple[App, httpx.AsyncClient, CaptureServer],
) -> None:
    app, c, capture = setup
    circuits = f"{ADMIN_PREFIX}/dispatch/circuits"
    summary = f"{ADMIN_PREFIX}/dispatch/summary"

    async def get(path: str) -> object:
        r = await c.get(path, headers=auth("reader"))
        assert r.status_code == 200, r.text
        return r.json()

    first = await stored(app, 5)
    await until(lambda: len(capture.uuids()) == 5)
    assert (await get(circuits)) == [
        {"target": "POSTHOG", "state": "closed", "failures": 0, "openForSeconds": 3600.0,
         "retryInSeconds": 0.0, "configured": True},
    ]  # fmt: skip

    # an outage: one failed request opens the circuit for an hour
    capture.status = 503
    second = await stored(app, 4)
    await until(lambda: capture.requests >= 2)
    view = (await get(circuits))[0]  # type: ignore[index]
    assert view["state"] == "open"
    ready = (await c.get("/ready")).json()
    assert ready["ready"] is True  # reported, not required: the outbox absorbs it
    assert ready["destinations"] == {"POSTHOG": "open"}
    assert view["retryInSeconds"] > 3500
    rows = (await get(summary))[0]  # type: ignore[index]
    assert (rows["failedCount"], rows["dispatchedCount"], rows["parkedCount"]) == (4, 5, 0)
    assert rows["oldestDueAt"] is None  # failed rows wait for their retry in an hour

    # the destination is back; the operator resets the circuit and replays
    capture.status = None
    r = await c.post(f"{circuits}/posthog/reset", headers=auth("reader"))
    assert r.status_code == 403  # operate scope
    r = await c.post(f"{circuits}/posthog/reset", headers=auth("operator"))
    assert r.status_code == 200
    assert r.json()["state"] == "closed"
    r = await c.post(
        f"{ADMIN_PREFIX}/dispatch/replay", params={"dryRun": "true", "target": "WEBHOOK"},
        headers=auth("replayer"),
    )  # fmt: skip
    assert r.json() == {"replayedCount": 0, "target": "WEBHOOK", "dryRun": True, "lastId": None}
    r = await c.post(
        f"{ADMIN_PREFIX}/dispatch/replay", params={"target": "posthog", "limit": 10},
        headers=auth("replayer"),
    )  # fmt: skip
    assert r.json()["replayedCount"] == 4
    await until(lambda: len(capture.uuids()) == 9)  # woken at once, not in an hour
    assert sorted(capture.uuids()) == sorted(event_uuid(i) for i in first + second)

    # paused, the dispatcher leaves new rows where they are
    r = await c.post(f"{ADMIN_PREFIX}/workers/dispatcher/pause", headers=auth("operator"))
    assert r.json()["paused"] is True
    await until(lambda: app.pauses.paused("dispatcher"), timeout=10)
    third = await stored(app, 3)
    await asyncio.sleep(1.0)  # stored, enqueued, and left alone
    assert len(capture.uuids()) == 9
    rows = (await get(summary))[0]  # type: ignore[index]
    assert rows["pendingCount"] == 3
    r = await c.post(f"{ADMIN_PREFIX}/workers/dispatcher/resume", headers=auth("operator"))
    await until(lambda: len(capture.uuids()) == 12, timeout=10)
    assert set(capture.uuids()) >= {event_uuid(i) for i in third}

    assert app.activity is not None
    db = app.activity.db
    with db.engine.connect() as conn:
        routes = [r.route for r in conn.execute(select(admin_audit_log.c.route))]
    assert routes.count(f"{ADMIN_PREFIX}/dispatch/replay") == 2
    assert routes.count(f"{ADMIN_PREFIX}/dispatch/circuits/{{target}}/reset") == 2


async def test_the_dispatch_commands(setup: tuple[App, httpx.AsyncClient, CaptureServer]) -> None:
    import json
    import sys

    from tests.admin.test_admin import TOKENS

    app, c, capture = setup
    await stored(app, 3)
    await until(lambda: len(capture.uuids()) == 3)

    async def estat(*args: str, token: str = "operator") -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "estat", "admin", "--url", str(c.base_url),
            "--token", TOKENS[token], *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode()

    rc, out = await estat("dispatch", "summary", "--json", token="reader")  # after it, too
    assert rc == 0, out
    assert json.loads(out)[0]["dispatchedCount"] == 3
    for _ in range(40):  # the ledger adds its counts every few seconds
        rc, out = await estat("completeness", token="reader")
        if "POSTHOG=3" in out:
            break
        await asyncio.sleep(0.5)
    assert "POSTHOG=3" in out, out  # {target: n} as an operator reads it
    rc, out = await estat("dispatch", "circuit", token="reader")
    assert rc == 0, out
    assert "POSTHOG" in out
    assert "closed" in out
    rc, out = await estat("dispatch", "replay", "--target", "POSTHOG", "--dry-run", token="reader")
    assert rc == 2  # the reader may not replay
    assert "ADMIN_SCOPE_REQUIRED" in out
    rc, out = await estat("--json", "dispatch", "replay", "--dry-run", token="replayer")
    assert rc == 0, out
    assert json.loads(out) == {"replayedCount": 0, "target": None, "dryRun": True, "lastId": None}
    rc, out = await estat("--json", "dispatch", "circuit", "--reset", "posthog")
    assert rc == 0, out
    assert json.loads(out)["state"] == "closed"
    rc, out = await estat("workers", "pause", "dispatcher")
    assert rc == 0, out
    assert app.pauses.paused("dispatcher")
    rc, out = await estat("--json", "dispatch", "discard", "--target", "webhook", "--dry-run")
    assert rc == 0, out
    assert json.loads(out) == {"discardedCount": 0, "target": "WEBHOOK", "dryRun": True}
    rc, out = await estat("dispatch", "discard", "--target", "posthog")
    assert rc == 2
    assert "ADMIN_TARGET_CONFIGURED" in out


async def test_the_rows_of_a_target_taken_out_of_the_configuration_can_be_discarded(
    setup: tuple[App, httpx.AsyncClient, CaptureServer],
) -> None:
    """WEBHOOK was a target (its rows wait, nothing sends them): an operator
    discards them; POSTHOG, configured, is refused; counted, logged, audited."""
    from estat.store.events import EventStore
    from estat.store.rows import encode, event_row

    app, c, capture = setup
    assert app.activity is not None
    db = app.activity.db
    records = [rec() for _ in range(7)]
    EventStore(db, ["POSTHOG", "WEBHOOK"]).store(
        [event_row(r) for r in records], [encode(r).decode() for r in records]
    )
    await until(lambda: len(capture.uuids()) == 7)  # POSTHOG's rows are sent
    discard = f"{ADMIN_PREFIX}/dispatch/discard"
    r = await c.post(discard, params={"target": "WEBHOOK"}, headers=auth("replayer"))
    assert r.status_code == 403  # operate scope
    r = await c.post(discard, params={"target": "posthog"}, headers=auth("operator"))
    assert (r.status_code, r.json()["code"]) == (409, "ADMIN_TARGET_CONFIGURED")
    r = await c.post(
        discard, params={"target": "webhook", "dryRun": "true"}, headers=auth("operator")
    )
    assert r.json() == {"discardedCount": 7, "target": "WEBHOOK", "dryRun": True}
    r = await c.post(discard, params={"target": "webhook", "limit": 5}, headers=auth("operator"))
    assert r.json() == {"discardedCount": 5, "target": "WEBHOOK", "dryRun": False}
    r = await c.post(discard, params={"target": "webhook"}, headers=auth("operator"))
    assert r.json()["discardedCount"] == 2
    summary = (await c.get(f"{ADMIN_PREFIX}/dispatch/summary", headers=auth("reader"))).json()
    assert [(t["target"], t["pendingCount"], t["dispatchedCount"]) for t in summary] == [
        ("POSTHOG", 0, 7)
    ]
    assert app.metrics.dispatch_discarded.labels("WEBHOOK")._value.get() == 7
    with db.engine.connect() as conn:
        effects = [
            r.effect
            for r in conn.execute(select(admin_audit_log.c.route, admin_audit_log.c.effect))
            if r.route == discard
        ]
    assert len(effects) == 5  # every call, refused ones too
    assert effects[-1] == {"discardedCount": 2, "target": "WEBHOOK", "dryRun": False}


async def test_an_admin_summary_waiting_on_a_lock_does_not_hold_up_server_events(
    tmp_path: Path, pg_url: str
) -> None:
    """PostgreSQL: an operator's dispatch summary waits for another session's
    lock on the dispatch outbox (or reads a large one for seconds); a
    server event's outbox write in the same process is not behind it (the
    admin's statements have a database thread of their own)."""
    import hashlib
    import json

    from tests.servers import table_locked

    token = "svc-" + uuid.uuid4().hex
    app = await start_app(
        tmp_path, admin_addr=f"127.0.0.1:{free_port()}", admin_tokens=ENTRIES,
        database_url=pg_url, dispatch_targets="",
        server_event_tokens=f"svc:{hashlib.sha256(token.encode()).hexdigest()}",
    )  # fmt: skip
    try:
        assert app.admin is not None
        assert app.admin.address is not None
        assert app.address is not None
        admin = f"http://{app.admin.address[0]}:{app.admin.address[1]}"
        ingest = f"http://{app.address[0]}:{app.address[1]}"
        async with httpx.AsyncClient(timeout=30) as c:
            with table_locked(pg_url, "user_activity_dispatch_outbox") as holder:
                summary = asyncio.create_task(
                    c.get(f"{admin}{ADMIN_PREFIX}/dispatch/summary", headers=auth("reader"))
                )
                await asyncio.sleep(0.5)  # the summary waits for the lock
                assert not summary.done()
                r = await asyncio.wait_for(
                    c.post(
                        f"{ingest}/api/v1/server-events",
                        content=json.dumps(
                            {"memberId": 7, "events": [{"eventId": "e-1", "eventName": "n"}]}
                        ),
                        headers={
                            "Authorization": f"Bearer {token}",
                            "Content-Type": "application/json",
                        },
                    ),
                    5,
                )
                assert r.status_code == 200, r.text
                holder.rollback()
            assert (await summary).status_code == 200
    finally:
        await close_all()
        await app.shutdown()


async def test_replay_all_takes_every_failed_row_there_is_and_no_more(
    setup: tuple[App, httpx.AsyncClient, CaptureServer],
) -> None:
    """``estat admin dispatch replay --all --limit 3``: 7 parked events in
    three calls, all delivered; while the destination still refuses them,
    one ``--all`` replays each once (the calls walk by row id: it does not
    chase the rows parked again meanwhile)."""
    import json
    import sys

    from tests.admin.test_admin import TOKENS

    app, c, capture = setup
    ids = await stored(app, 7)
    capture.bad_uuids = {event_uuid(i) for i in ids}  # refused: parked with the reason
    await until(lambda: capture.requests >= 7)

    async def replay_all() -> dict[str, object]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "estat", "admin", "--url", str(c.base_url),
            "--token", TOKENS["replayer"], "dispatch", "replay", "--all", "--limit", "3",
            "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)  # chasing would not end
        assert proc.returncode == 0, err
        return dict(json.loads(out))

    async def parked() -> int:
        r = await c.get(f"{ADMIN_PREFIX}/dispatch/summary", headers=auth("reader"))
        return int(r.json()[0]["parkedCount"])

    await until_async(lambda: parked(), 7)
    assert (await replay_all())["replayedCount"] == 7  # refused again: parked again
    await until_async(lambda: parked(), 7)
    capture.bad_uuids = set()
    assert (await replay_all())["replayedCount"] == 7
    await until(lambda: set(capture.uuids()) == {event_uuid(i) for i in ids})
    assert (await replay_all())["replayedCount"] == 0
