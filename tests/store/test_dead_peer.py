"""A database host that stops answering (frozen, unplugged, the old
primary after a failover): no reset, no error, its packets just stop. A
statement in flight, or a pooled connection, must fail within
``DATABASE_DEAD_PEER_TIMEOUT``, not wait for the operating system's TCP
keepalive (two hours and more by default), so that the stage retries on a
new connection once the host answers again. The host is a network
namespace of its own; the partition takes its link down."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from estat.store.db import TRANSIENT_DB, Database, pg_connect_args
from tests.conftest import free_port
from tests.servers import NetnsHost, PostgresServer

pytestmark = [
    pytest.mark.servers,
    pytest.mark.skipif(not NetnsHost.available(), reason="needs root and iproute2"),
]

TIMEOUT = 2.0  # the tests' DATABASE_DEAD_PEER_TIMEOUT (the default, 30 s, is checked apart)


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            out["result"] = fn()
        except BaseException as e:
            out["error"] = e
        out["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)  # a hang must not hold the test run
    t.start()
    return t, out


def test_a_statement_in_flight_to_a_host_that_stopped_answering_fails(
    far: tuple[NetnsHost, PostgresServer],
) -> None:
    host, pg = far
    db = Database(pg.create_database(), dead_peer_after=TIMEOUT)
    try:
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1

        def slow() -> Any:
            with db.engine.connect() as conn:
                return conn.execute(text("SELECT pg_sleep(2)")).scalar_one()

        t, out = _in_thread(slow)
        time.sleep(0.5)  # the statement is on the server
        host.partition()
        t.join(60)
        assert not t.is_alive(), "the statement still waits for a host that stopped answering"
        assert isinstance(out.get("error"), TRANSIENT_DB), out  # a stage retries it
        assert out["seconds"] < 30
        host.heal()
        with db.engine.connect() as conn:  # a new connection: the dead one was dropped
            assert conn.execute(text("SELECT 2")).scalar_one() == 2
    finally:
        db.close()


def test_a_pooled_connection_to_a_host_that_stopped_answering_is_replaced(
    far: tuple[NetnsHost, PostgresServer],
) -> None:
    """The pool's check before use (a ping) on a connection whose host went
    silent while it was idle: it fails in time, and the statement runs on a
    new connection once the host is back."""
    host, pg = far
    db = Database(pg.create_database(), dead_peer_after=TIMEOUT)
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))  # pooled now
        host.partition()

        def use() -> Any:
            with db.engine.connect() as conn:
                return conn.execute(text("SELECT 3")).scalar_one()

        t, out = _in_thread(use)
        t.join(60)
        assert not t.is_alive(), "the pool's ping still waits for a host that stopped answering"
        assert isinstance(out.get("error"), DBAPIError), out
        host.heal()
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT 4")).scalar_one() == 4
    finally:
        db.close()


def test_the_dead_peer_settings_and_a_url_that_sets_its_own() -> None:
    """30 s by default: keepalive probes from 10 s of silence, every 5 s, 3
    unanswered, and unacknowledged data given up after 30 s; libpq's own
    parameters in DATABASE_URL win."""
    assert pg_connect_args("postgresql+psycopg://h/d", 30.0) == {
        "connect_timeout": 5,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": 30000,
    }
    mine = pg_connect_args("postgresql+psycopg://h/d?keepalives_idle=60&tcp_user_timeout=0", 30.0)
    assert "keepalives_idle" not in mine
    assert "tcp_user_timeout" not in mine
    assert mine["keepalives_interval"] == 5


# a worker on a host of its own: leases the dispatch rows and holds them
FAR_WORKER = """
import sys, time
from datetime import UTC, datetime
from estat.store.db import Database
from estat.store.dispatch import DispatchOutbox
box = DispatchOutbox(Database(sys.argv[1]), lease_seconds=float(sys.argv[2]))
leased = box.lease("POSTHOG", 100, datetime.now(UTC))
print("leased", len(leased.rows), flush=True)
time.sleep(3600)
"""


@pytest.fixture
def near() -> Iterator[tuple[NetnsHost, PostgresServer]]:
    """PostgreSQL here; a host of its own for a worker, which reaches the
    server at its gateway address."""
    host = NetnsHost()
    host.create()
    pg = PostgresServer(free_port(), clients=host)
    try:
        pg.start()
        yield host, pg
    finally:
        pg.destroy()
        host.destroy()


def test_rows_leased_by_a_worker_whose_host_died_are_free_after_the_lease(
    near: tuple[NetnsHost, PostgresServer],
) -> None:
    """A dispatcher holds its lease's rows locked in an open transaction
    while it sends them. Its host dies (power, a kernel panic, cut off): no
    reset, no close ever reaches the server. The server ends that
    transaction once it has been idle DISPATCH_LEASE, and another
    dispatcher gets the rows; it would otherwise skip them (SKIP LOCKED)
    until the server's TCP keepalive gave up, two hours and more."""
    import os
    import subprocess
    import sys
    from datetime import UTC, datetime
    from pathlib import Path

    from estat.store.dispatch import DispatchOutbox
    from estat.store.events import EventStore
    from estat.store.rows import encode, event_row
    from tests.activity.test_flow import rec

    host, pg = near
    url = pg.create_database()
    db = Database(url)
    try:
        db.upgrade()
        records = [rec() for _ in range(5)]
        EventStore(db, ["POSTHOG"]).store(
            [event_row(r) for r in records], [encode(r).decode() for r in records]
        )
        far_url = url.replace("127.0.0.1", host.gateway)
        root = Path(__file__).resolve().parents[2]
        worker = subprocess.Popen(
            ["ip", "netns", "exec", host.name, sys.executable, "-c", FAR_WORKER, far_url, "2"],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(root / "src")},
        )
        try:
            assert worker.stdout is not None
            assert worker.stdout.readline().split() == [b"leased", b"5"]
            host.partition()  # the host dies: nothing it sends arrives any more
            worker.kill()
            worker.wait(10)
        finally:
            worker.kill()
            worker.wait(10)
            if worker.stdout is not None:
                worker.stdout.close()
        host.destroy()
        box = DispatchOutbox(db)
        t0 = time.monotonic()
        while True:
            leased = box.lease("POSTHOG", 100, datetime.now(UTC))
            got = len(leased.rows)
            box.release(leased, datetime.now(UTC))
            if got:
                break
            assert time.monotonic() - t0 < 20, "the dead host's rows are still locked"
            time.sleep(0.2)
        assert got == 5
    finally:
        db.close()
