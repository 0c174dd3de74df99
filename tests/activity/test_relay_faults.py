"""The relay's exception paths, on SQLite and PostgreSQL: whatever interrupts
a batch between lease and mark (a ``BaseException`` out of a native bus
client, the database failing at mark, a stop cutting the publish short),
the leased rows go back unmarked and not charged, due at once; the failure
is visible (the stage fails, or the error is logged and retried); and a
relay started afterwards publishes every event, each row PUBLISHED once."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from sqlalchemy import select

from estat.activity.relay import Relay
from estat.bus.base import Message
from estat.bus.memory import MemoryBus
from estat.clock import SystemClock
from estat.ops.metrics import Metrics
from estat.ops.tasks import Supervisor
from estat.stage import Deadline
from estat.store.db import Database
from estat.store.outbox import SourceOutbox
from estat.store.schema import user_activity_source_outbox as S
from tests.activity.test_flow import rec
from tests.dispatch.test_dispatcher import until
from tests.fakes import lost_once, slow_once


class NativeCrash(BaseException):
    """What a native library may raise: not an ``Exception``."""


class Bus(MemoryBus):
    """The in-process bus; ``fail`` raised by the next publishes, or each
    publish held ``hang`` seconds first."""

    def __init__(self, fail: BaseException | None = None, hang: float = 0.0) -> None:
        super().__init__()
        self.fail = fail
        self.hang = hang
        self.published: list[str] = []
        self.publishing = 0

    async def publish(self, messages: Sequence[Message]) -> None:
        self.publishing += 1
        if self.hang:
            await asyncio.sleep(self.hang)
        if self.fail is not None:
            raise self.fail
        self.published += [m.message_id for m in messages]
        await super().publish(messages)


def rows(db: Database) -> list[tuple[str, int]]:
    """(status, retry_count) of every row, and whether it is due now."""
    with db.engine.connect() as conn:
        return [(r.status, r.retry_count) for r in conn.execute(select(S))]


async def start(db: Database, bus: Bus, failed: list[str]) -> Relay:
    relay = Relay(
        SourceOutbox(db, lease_seconds=3600), bus, batch_size=10, poll_interval=0.05,
        metrics=Metrics(), clock=SystemClock(),
    )  # fmt: skip
    await relay.start(Supervisor(Metrics(), failed.append).spawn)
    return relay


async def publish_all(db: Database, ids: list[str]) -> None:
    """A relay started afterwards publishes every row at once (a lease of an
    hour: rows left leased would not be due within this test)."""
    bus = Bus()
    relay = await start(db, bus, [])
    await until(lambda: len(bus.published) >= len(ids), timeout=10)
    relay.close()
    await relay.join(Deadline.after(10, SystemClock()))
    assert sorted(bus.published) == sorted(ids)  # each once
    assert rows(db) == [("PUBLISHED", 0)] * len(ids)


def enqueue(db: Database, n: int) -> list[str]:
    records = [rec() for _ in range(n)]
    SourceOutbox(db).enqueue(records)
    return [r.event_id for r in records]


async def test_a_base_exception_fails_the_stage_and_gives_the_rows_back(db: Database) -> None:
    ids = enqueue(db, 25)
    failed: list[str] = []
    relay = await start(db, Bus(fail=NativeCrash()), failed)
    await until(lambda: bool(failed))
    assert failed == ["relay"]  # visible: the supervisor drains and exits
    relay.close()
    with pytest.raises(NativeCrash):
        await relay.join(Deadline.after(10, SystemClock()))
    assert rows(db) == [("PENDING", 0)] * 25  # not charged, not lost
    await publish_all(db, ids)


async def test_the_database_failing_at_mark_gives_the_rows_back(db: Database) -> None:
    ids = enqueue(db, 12)
    bus = Bus()
    relay = await start(db, bus, [])
    relay.outbox.mark_published = lost_once(relay.outbox.mark_published)  # type: ignore[method-assign]
    await until(lambda: {s for s, _ in rows(db)} == {"PUBLISHED"}, timeout=10)
    relay.close()
    await relay.join(Deadline.after(10, SystemClock()))
    # the first batch was published, not marked, given back and published
    # again: the store consumer finds the repeats duplicates; nothing is lost
    assert sorted(set(bus.published)) == sorted(ids)
    assert len(bus.published) == len(ids) + 10
    assert rows(db) == [("PUBLISHED", 0)] * 12


async def test_a_stop_during_a_publish_gives_the_rows_back(db: Database) -> None:
    ids = enqueue(db, 8)
    bus = Bus(hang=30)
    relay = await start(db, bus, [])
    await until(lambda: bus.publishing == 1)  # leased, being published
    relay.close()
    await relay.join(Deadline.after(0.5, SystemClock()))  # the deadline cancels it
    assert rows(db) == [("PENDING", 0)] * 8
    await publish_all(db, ids)


async def test_a_postgresql_lease_that_outlives_outbox_lease_is_ended_and_published_again(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    """The database ends a lease's transaction idle longer than
    OUTBOX_LEASE (so that a relay whose host died lets go of its rows): a
    publish that slow has its rows published again, none lost, and says why."""
    if db.dialect != "postgresql":
        pytest.skip("SQLite's lease is a time in the row")
    ids = enqueue(db, 10)
    bus = Bus()
    bus.publish = slow_once(bus.publish, 2.0)  # type: ignore[method-assign]
    failed: list[str] = []
    relay = Relay(
        SourceOutbox(db, lease_seconds=1.0), bus, batch_size=10, poll_interval=0.05,
        metrics=Metrics(), clock=SystemClock(),
    )  # fmt: skip
    await relay.start(Supervisor(Metrics(), failed.append).spawn)
    await until(lambda: {s for s, _ in rows(db)} == {"PUBLISHED"}, timeout=15)
    assert failed == []  # a database failure, retried: no stage failed
    relay.close()
    await relay.join(Deadline.after(10, SystemClock()))
    assert sorted(set(bus.published)) == sorted(ids)
    assert len(bus.published) == 2 * len(ids)  # published again (the store deduplicates)
    assert rows(db) == [("PUBLISHED", 0)] * len(ids)
    assert "outlived OUTBOX_LEASE" in capsys.readouterr().out
