"""End to end: the database host stops answering under a running estat (no
reset, no error: its link goes down) with a statement of the store in
flight, and a new host takes its address (a failover) while client events
keep coming: the store's statement fails within DATABASE_DEAD_PEER_TIMEOUT
instead of waiting hours for an answer, it says so, and it catches up by
itself: every accepted event stored exactly once, with no restart."""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
import pytest

from tests.conftest import EstatProcess
from tests.e2e.test_pipeline_e2e import client_batch, post, wait_for
from tests.servers import NetnsHost, PostgresServer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.servers,
    pytest.mark.skipif(not NetnsHost.available(), reason="needs root and iproute2"),
]


def test_the_store_catches_up_by_itself_after_a_failover_with_a_statement_in_flight(
    estat_factory: Any,
    far: tuple[NetnsHost, PostgresServer],
) -> None:
    host, pg = far
    url = pg.create_database()
    p: EstatProcess = estat_factory(
        {"DATABASE_URL": url, "DATABASE_DEAD_PEER_TIMEOUT": "4s", "STORE_BATCH_SIZE": "50"}
    )
    p.start()

    def stored() -> list[str]:
        try:
            with psycopg.connect(url, connect_timeout=3) as conn:
                return [r[0] for r in conn.execute("SELECT event_id FROM user_activity_event")]
        except psycopg.OperationalError:  # the link just came back: look again
            return []

    accepted: list[str] = []

    def send(n: int) -> None:
        for _ in range(n):
            ids = [uuid.uuid4().hex for _ in range(25)]
            status, body = post(p.url + "/api/v1/analytics/events", client_batch(ids))
            assert status == 200, body  # the lake and the bus take them: the database is not asked
            accepted.extend(ids)

    send(8)
    wait_for(lambda: len(stored()) == len(accepted))
    # the store's next write waits on the server (a lock held there): a
    # statement in flight, its answer awaited
    holder = psycopg.connect(url)
    holder.execute("LOCK TABLE user_activity_event IN ACCESS EXCLUSIVE MODE")
    send(8)
    time.sleep(1)
    host.partition()  # the host stops answering: no reset, no error
    holder.close()  # (its transaction goes with the server)
    send(8)  # the lake and the bus take them all the same
    # a failover: the host that had the statement is gone, with its kernel's
    # state of the connection (nothing more is sent on it); the server that
    # answers at that address next knows nothing of it
    pg.stop("immediate")
    host.destroy()
    host.create()
    pg.start()
    # the statement in flight fails within DATABASE_DEAD_PEER_TIMEOUT and the
    # store retries on a new connection; with the system's TCP keepalive it
    # would wait for an answer for two hours and more, the stage silent
    wait_for(lambda: len(stored()) >= len(accepted), timeout=60)
    p.wait_log("store: database unavailable")  # and it said so
    assert p.stop() == 0
    assert sorted(stored()) == sorted(accepted)  # each once: none lost, none twice
