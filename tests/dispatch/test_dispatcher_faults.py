"""The dispatcher's exception paths, on SQLite and PostgreSQL: whatever
interrupts a batch between lease and mark (a destination that raises, a
``BaseException`` out of a native library, the database failing at mark,
a stop cutting the send short), the leased rows go back unmarked, the
failure is visible (the stage fails, or the rows are retried), and a
dispatcher started afterwards delivers every event exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from estat.clock import SystemClock
from estat.dispatch.destination import DELIVERED, Outcome
from estat.dispatch.dispatcher import Dispatcher
from estat.model import EventRecord
from estat.ops.metrics import Metrics
from estat.ops.tasks import Supervisor
from estat.stage import Deadline
from estat.store.db import Database
from estat.store.dispatch import DispatchOutbox
from tests.activity.test_flow import value
from tests.dispatch.test_dispatcher import FAST, statuses, store, until
from tests.fakes import lost_once, slow_once
from tests.servers import libpq, table_locked


class NativeCrash(BaseException):
    """What a native library may raise: not an ``Exception``."""


class Recorder:
    name = "POSTHOG"

    def __init__(self, fail: BaseException | None = None, hang: float = 0.0) -> None:
        self.fail = fail
        self.hang = hang
        self.got: list[str] = []

    async def send(self, events: Sequence[EventRecord]) -> list[Outcome]:
        if self.hang:
            await asyncio.sleep(self.hang)
        if self.fail is not None:
            raise self.fail
        self.got += [e.event_id for e in events]
        return [DELIVERED] * len(events)

    async def close(self) -> None:
        pass


async def run(
    db: Database, dest: Recorder, failed: list[str], breaker_threshold: int = 5, in_flight: int = 1
) -> Dispatcher:
    d = Dispatcher(
        DispatchOutbox(db, policy=FAST), [dest], batch_size=10, poll_interval=0.05,
        clock=SystemClock(), concurrency=1, in_flight=in_flight,
        breaker_threshold=breaker_threshold, open_for=60,
    )  # fmt: skip
    await d.start(Supervisor(Metrics(), failed.append).spawn)
    return d


async def deliver_all(db: Database, ids: list[str]) -> None:
    ok = Recorder()
    d = await run(db, ok, [])
    await until(lambda: len(ok.got) >= len(ids))
    d.close()
    await d.join(Deadline.after(10, SystemClock()))
    assert sorted(ok.got) == sorted(ids)  # every event once
    assert {s for s, _, _ in statuses(db).values()} == {"DISPATCHED"}


async def test_a_base_exception_fails_the_stage_and_gives_the_rows_back(db: Database) -> None:
    ids = store(db, 25)
    failed: list[str] = []
    d = await run(db, Recorder(fail=NativeCrash()), failed)
    await until(lambda: bool(failed))
    assert failed == ["dispatcher-posthog-0"]  # visible: the supervisor drains and exits
    d.close()
    with pytest.raises(NativeCrash):
        await d.join(Deadline.after(10, SystemClock()))
    st = statuses(db)
    assert all(s == "PENDING" and n == 0 for s, n, _ in st.values())  # not charged, not lost
    await deliver_all(db, ids)


async def test_an_exception_in_a_destination_is_a_retry(db: Database) -> None:
    ids = store(db, 5)
    d = await run(db, Recorder(fail=RuntimeError("bug")), [])
    await until(lambda: all(n >= 1 for _, n, _ in statuses(db).values()))
    d.close()
    await d.join(Deadline.after(10, SystemClock()))
    assert {s for s, _, _ in statuses(db).values()} == {"FAILED"}
    await deliver_all(db, ids)


async def test_the_database_failing_at_mark_gives_the_rows_back(db: Database) -> None:
    ids = store(db, 12)
    dest = Recorder()
    d = await run(db, dest, [])
    d.outbox.mark = lost_once(d.outbox.mark)  # type: ignore[method-assign]
    await until(lambda: {s for s, _, _ in statuses(db).values()} == {"DISPATCHED"})
    d.close()
    await d.join(Deadline.after(10, SystemClock()))
    # the first lease was sent, not marked, given back and sent again: the
    # destination deduplicates (PostHog on uuid); nothing is lost
    assert sorted(set(dest.got)) == sorted(ids)
    assert len(dest.got) == 2 * len(ids)  # all 12 fit in one lease (10 requests' worth)


class InFlight(Recorder):
    """Counts the requests on the network at once (each held ``hang``
    seconds); ``down``: each answers like a dead host."""

    def __init__(self, hang: float, down: bool = False) -> None:
        super().__init__(hang=hang)
        self.down = down
        self.now = self.most = self.requests = 0

    async def send(self, events: Sequence[EventRecord]) -> list[Outcome]:
        self.requests += 1
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            if self.down:
                await asyncio.sleep(self.hang)
                return [Outcome("retry", "connection: ConnectError")] * len(events)
            return await super().send(events)
        finally:
            self.now -= 1


@pytest.mark.parametrize("in_flight", [1, 4])
async def test_a_stop_during_a_send_gives_the_rows_back(db: Database, in_flight: int) -> None:
    ids = store(db, 80)
    dest = InFlight(hang=30)
    d = await run(db, dest, [], in_flight=in_flight)
    await until(lambda: dest.now == in_flight)  # leased, on the network
    d.close()
    await d.join(Deadline.after(0.5, SystemClock()))  # the deadline cancels the send
    assert dest.now == 0  # no request of the released rows is left on the network
    assert all(s == "PENDING" and n == 0 for s, n, _ in statuses(db).values())
    await deliver_all(db, ids)


async def test_a_lane_has_its_lease_in_flight_at_once(db: Database) -> None:
    """A lease of ten requests, four at a time: a destination far away gets
    four times the events per round trip; each event once."""
    ids = store(db, 100)
    dest = InFlight(hang=0.2)
    d = await run(db, dest, [], in_flight=4)
    await until(lambda: dest.now == 4)
    assert value(d._m, "dispatch_requests_in_flight", target="POSTHOG") == 4
    await until(lambda: len(dest.got) == 100)
    d.close()
    await d.join(Deadline.after(10, SystemClock()))
    assert value(d._m, "dispatch_requests_in_flight", target="POSTHOG") == 0
    assert dest.most == 4
    assert dest.requests == 10
    assert sorted(dest.got) == sorted(ids)
    assert {s for s, _, _ in statuses(db).values()} == {"DISPATCHED"}


async def test_a_failing_destination_gets_one_request_at_a_time(db: Database) -> None:
    """The destination is down: the lease's first four requests fail
    together and end it (the six not sent are not charged); with failures
    counted, the next lease sends one request, whose failure opens the
    breaker (threshold 5). Five requests in all, fifty rows charged."""
    store(db, 100)
    dest = InFlight(hang=0.1, down=True)
    d = await run(db, dest, [], in_flight=4)
    await until(lambda: d.breakers["POSTHOG"].last.state == "open")
    await asyncio.sleep(0.3)  # nothing more is sent while it is open
    d.close()
    await d.join(Deadline.after(10, SystemClock()))
    assert dest.requests == 5
    assert sum(n for _, n, _ in statuses(db).values()) == 50
    assert dest.most == 4


class DownAfter(Recorder):
    """Delivers the first ``n`` requests, then answers like a dead host."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.requests = 0

    async def send(self, events: Sequence[EventRecord]) -> list[Outcome]:
        self.requests += 1
        if self.requests > self.n:
            return [Outcome("retry", "connection: ConnectError")] * len(events)
        return await super().send(events)


async def test_a_lease_stops_at_the_first_failed_request(db: Database) -> None:
    """A lease holds ten requests' worth; the destination dies after two:
    the third is charged a retry, the seven not sent are untouched."""
    store(db, 100)
    dest = DownAfter(2)
    d = await run(db, dest, [], breaker_threshold=1)  # then open for a minute
    await until(lambda: d.breakers["POSTHOG"].last.state == "open")
    d.close()
    await d.join(Deadline.after(10, SystemClock()))
    st = statuses(db)
    assert sorted(i for i, (s, _, _) in st.items() if s == "DISPATCHED") == sorted(dest.got)
    assert len(dest.got) == 20
    assert sum(1 for s, n, _ in st.values() if s == "FAILED" and n == 1) == 10
    assert sum(1 for s, n, _ in st.values() if s == "PENDING" and n == 0) == 70
    assert dest.requests == 3


def _terminate(url: str, where: str, how: str = "pg_terminate_backend") -> int:
    """Terminate this database's other backends matching ``where`` (a real
    connection loss, as a restart or a network cut gives the dispatcher),
    or with ``pg_cancel_backend`` cancel their statements (the connection
    lives on, as after a statement or lock timeout)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        rows = c.execute(
            f"SELECT {how}(pid) FROM pg_stat_activity WHERE datname ="
            f" current_database() AND pid <> pg_backend_pid() AND {where}"
        ).fetchall()
    return len(rows)


class KillsItsLease(Recorder):
    """The first time it sends, terminates the lease's connection (idle in
    its transaction while the batch is on the network): the mark that
    follows meets a connection PostgreSQL has closed."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.killed = 0

    async def send(self, events: Sequence[EventRecord]) -> list[Outcome]:
        if not self.killed:
            # the lease's connection only: its last statement took the row
            # locks (the test's own reads are idle in a transaction too, for
            # a moment, and must live)
            self.killed = await asyncio.to_thread(
                _terminate,
                self.url,
                "state = 'idle in transaction' AND query ILIKE '%skip locked%'",
            )
        return await super().send(events)


async def test_a_postgresql_lease_cancelled_and_a_connection_lost_at_mark_are_retried(
    db: Database,
) -> None:
    if db.dialect != "postgresql":
        pytest.skip("a PostgreSQL connection's loss")
    url = libpq(db.url)
    ids = store(db, 12)
    dest = KillsItsLease(url)
    failed: list[str] = []
    # the lease waits behind this lock; its statement is then cancelled
    with table_locked(url, "user_activity_dispatch_outbox") as holder:
        d = await run(db, dest, failed)

        def waiting() -> bool:
            return _terminate(url, "wait_event_type = 'Lock'", "pg_cancel_backend") > 0

        await until(lambda: waiting())
        holder.rollback()
    await until(lambda: {s for s, _, _ in statuses(db).values()} == {"DISPATCHED"})
    assert failed == []  # both were database failures, retried: no stage failed
    d.close()
    await d.join(Deadline.after(10, SystemClock()))
    assert dest.killed == 1
    # the first lease was sent, its mark lost with the connection, the rows
    # leased again and sent again (the destination deduplicates): none lost
    assert sorted(set(dest.got)) == sorted(ids)
    assert len(dest.got) == 2 * len(ids)


class Waits(Recorder):
    """Holds every request until told: lanes on the network with their
    leases open, as with a destination far away or slow to answer."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()
        self.sending = 0

    async def send(self, events: Sequence[EventRecord]) -> list[Outcome]:
        self.sending += 1
        await self.go.wait()
        return await super().send(events)


async def test_lanes_on_the_network_leave_the_process_its_database_connections(
    db: Database,
) -> None:
    """More lanes than the process's connection pool holds (16 against 4 + 4
    overflow), each with its lease's transaction open while it waits for the
    destination: the store (the same process's database) still writes at
    once, and every lane sends; none waits for another's connection."""
    if db.dialect != "postgresql":
        pytest.skip("SQLite holds no transaction during a send")
    ids = store(db, 200)
    dest = Waits()
    d = Dispatcher(
        DispatchOutbox(db, policy=FAST), [dest], batch_size=1, poll_interval=0.05,
        clock=SystemClock(), concurrency=16,
    )  # fmt: skip
    await d.start(Supervisor(Metrics(), lambda name: None).spawn)
    await until(lambda: dest.sending == 16)  # every lane leased: 16 open transactions
    more = await asyncio.wait_for(db.run(lambda: store(db, 5)), 10)  # not behind a lane
    dest.go.set()
    await until(lambda: len(dest.got) == 205)
    d.close()
    await d.join(Deadline.after(10, SystemClock()))
    assert sorted(dest.got) == sorted(ids + more)


async def test_a_postgresql_lease_that_outlives_dispatch_lease_is_ended_and_sent_again(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    """The database ends a lease's transaction idle longer than
    DISPATCH_LEASE (so that a dispatcher whose host died lets go of its
    rows): a send that slow has its rows sent again, none lost, and says
    why."""
    if db.dialect != "postgresql":
        pytest.skip("SQLite's lease is a time in the row")
    ids = store(db, 10)
    dest = Recorder()
    dest.send = slow_once(dest.send, 2.0)  # type: ignore[method-assign]
    failed: list[str] = []
    d = Dispatcher(
        DispatchOutbox(db, policy=FAST, lease_seconds=1.0), [dest], batch_size=10,
        poll_interval=0.05, clock=SystemClock(), concurrency=1, in_flight=1,
    )  # fmt: skip
    await d.start(Supervisor(Metrics(), failed.append).spawn)
    await until(lambda: {s for s, _, _ in statuses(db).values()} == {"DISPATCHED"})
    assert failed == []  # a database failure, retried: no stage failed
    d.close()
    await d.join(Deadline.after(10, SystemClock()))
    assert sorted(set(dest.got)) == sorted(ids)
    assert len(dest.got) == 2 * len(ids)  # the slow send's rows were sent again
    assert "outlived DISPATCH_LEASE" in capsys.readouterr().out
