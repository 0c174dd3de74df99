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
from sqlalchemy.exc import OperationalError

from estat.clock import SystemClock
from estat.dispatch.destination import DELIVERED, Outcome
from estat.dispatch.dispatcher import Dispatcher
from estat.model import EventRecord
from estat.ops.metrics import Metrics
from estat.ops.tasks import Supervisor
from estat.stage import Deadline
from estat.store.db import Database
from estat.store.dispatch import DispatchOutbox
from tests.dispatch.test_dispatcher import FAST, statuses, store, until


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


async def run(db: Database, dest: Recorder, failed: list[str]) -> Dispatcher:
    d = Dispatcher(
        DispatchOutbox(db, policy=FAST), [dest], batch_size=10, poll_interval=0.05,
        clock=SystemClock(), concurrency=1,
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
    real = d.outbox.mark
    calls = 0

    def flaky(*a: object, **kw: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OperationalError("UPDATE", {}, Exception("connection lost"))
        return real(*a, **kw)  # type: ignore[arg-type]

    d.outbox.mark = flaky  # type: ignore[method-assign,assignment]
    await until(lambda: {s for s, _, _ in statuses(db).values()} == {"DISPATCHED"})
    d.close()
    await d.join(Deadline.after(10, SystemClock()))
    # the first batch was sent, not marked, given back and sent again: the
    # destination deduplicates (PostHog on uuid); nothing is lost
    assert sorted(set(dest.got)) == sorted(ids)
    assert len(dest.got) == len(ids) + 10


async def test_a_stop_during_a_send_gives_the_rows_back(db: Database) -> None:
    ids = store(db, 8)
    d = await run(db, Recorder(hang=30), [])
    await asyncio.sleep(0.3)  # leased, on the network
    d.close()
    await d.join(Deadline.after(0.5, SystemClock()))  # the deadline cancels the send
    assert all(s == "PENDING" and n == 0 for s, n, _ in statuses(db).values())
    await deliver_all(db, ids)
