from __future__ import annotations

import asyncio
from itertools import count

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estat.clock import FakeClock
from estat.errors import Overloaded
from estat.model import Batch
from estat.pipeline.batcher import BatchBuilder, run_batcher
from estat.pipeline.queue import EventQueue


def builder(
    clock: FakeClock, *, events: int = 5, nbytes: int = 10_000, age: float = 60
) -> BatchBuilder:
    seq = count()
    return BatchBuilder(
        max_events=events,
        max_bytes=nbytes,
        max_age=age,
        clock=clock,
        make_key=lambda t: f"k{next(seq)}@{int(t)}",
    )


def ids(batch: Batch) -> list[int]:
    return [msgspec.json.decode(x)["i"] for x in bytes(batch.data).splitlines()]


def test_cut_by_size() -> None:
    clock = FakeClock()
    b = builder(clock, events=3)
    q = EventQueue(100, 100_000)
    for i in range(7):
        q.put({"i": i})
    assert b.fill(q) == "size"
    first = b.cut()
    assert ids(first) == [0, 1, 2]
    assert first.events == 3
    assert b.fill(q) == "size"
    assert ids(b.cut()) == [3, 4, 5]
    assert b.fill(q) is None
    assert b.events == 1


def test_cut_by_bytes_never_splits_a_record() -> None:
    clock = FakeClock()
    line = len(msgspec.json.encode({"i": 0, "p": "x" * 20})) + 1
    b = builder(clock, events=100, nbytes=line * 2 + 5)
    q = EventQueue(100, 100_000)
    for i in range(5):
        q.put({"i": i, "p": "x" * 20})
    assert b.fill(q) == "bytes"
    batch = b.cut()
    assert ids(batch) == [0, 1]
    assert batch.nbytes <= line * 2 + 5


def test_oversized_record_goes_alone() -> None:
    clock = FakeClock()
    b = builder(clock, events=100, nbytes=50)
    q = EventQueue(100, 100_000)
    q.put({"i": 0, "p": "x" * 200})
    q.put({"i": 1})
    reason = b.fill(q)
    assert reason == "bytes"
    assert ids(b.cut()) == [0]


def test_cut_by_age_with_fake_clock() -> None:
    clock = FakeClock()
    b = builder(clock, events=100, age=120)
    q = EventQueue(100, 100_000)
    q.put({"i": 0})
    assert b.fill(q) is None
    clock.advance(119)
    assert b.due() is None
    assert b.time_left() == 1
    clock.advance(1)
    assert b.due() == "age"
    batch = b.cut()
    assert ids(batch) == [0]
    assert batch.first_ts == int(clock.time()) - 120
    assert batch.last_ts == int(clock.time())
    assert b.due() is None
    assert b.time_left() is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=40),
    st.integers(1, 12),
    st.integers(20, 400),
)
def test_every_record_lands_in_exactly_one_batch(
    pads: list[int], max_events: int, max_bytes: int
) -> None:
    clock = FakeClock()
    b = builder(clock, events=max_events, nbytes=max_bytes)
    q = EventQueue(10_000, 10_000_000)
    batches: list[Batch] = []
    for i, pad in enumerate(pads):
        q.put({"i": i, "p": "x" * pad})
        while (reason := b.fill(q)) is not None:
            assert reason in ("size", "bytes")
            batches.append(b.cut())
    if b.events:
        batches.append(b.cut())
    seen = [i for batch in batches for i in ids(batch)]
    assert seen == list(range(len(pads)))
    for batch in batches:
        assert 1 <= batch.events <= max_events
        assert batch.events == 1 or batch.nbytes <= max_bytes
    assert len({batch.key for batch in batches}) == len(batches)


async def test_run_batcher_drains_on_close() -> None:
    clock = FakeClock()
    q = EventQueue(1000, 1_000_000)
    out: asyncio.Queue[Batch] = asyncio.Queue()
    reasons: list[str] = []
    b = builder(clock, events=4)
    task = asyncio.create_task(run_batcher(q, b, out, reasons.append))
    for i in range(10):
        q.put({"i": i})
    q.close()
    await asyncio.wait_for(task, 5)
    got = []
    while not out.empty():
        got.extend(ids(out.get_nowait()))
    assert got == list(range(10))
    assert reasons == ["size", "size", "drain"]


def test_lines_put_whole_come_out_verbatim_and_count_against_the_bounds() -> None:
    q = EventQueue(3, 100_000)
    q.put_line(b'{"a":1}')
    q.put({"a": 2})
    q.put_line(b'{"a":"\\u00e9"}')
    assert q.nbytes == len(b'{"a":1}\n{"a":2}\n{"a":"\\u00e9"}\n')
    with pytest.raises(Overloaded):
        q.put_line(b'{"a":4}')
    data, n = q.take(10, 1_000_000)
    assert (bytes(data), n) == (b'{"a":1}\n{"a":2}\n{"a":"\\u00e9"}\n', 3)
    assert (len(q), q.nbytes) == (0, 0)


def test_a_batch_never_spans_a_partition_hour() -> None:
    """The completeness ledger counts per hour exactly: a batch opened in
    one hour is cut when the hour ends, and its key names that hour."""
    from estat.lake.keys import KeyMaker

    clock = FakeClock(1_700_002_800.0 - 30)  # 22:59:30 UTC
    keys = KeyMaker("raw", "i1", "Asia/Kolkata")  # +05:30: hours end at :30 UTC
    b = BatchBuilder(
        max_events=1000, max_bytes=10**6, max_age=3600, clock=clock, make_key=keys.make,
        partition_tz="Asia/Kolkata",
    )  # fmt: skip
    q = EventQueue(100, 100_000)
    q.put({"i": 0})
    assert b.fill(q) is None
    assert b.time_left() == pytest.approx(1830)  # 04:29:30 in Kolkata; the hour ends at 05:00
    clock.advance(b.time_left() or 0)
    q.put({"i": 1})  # taken after the hour ended: not into this batch
    assert b.fill(q) == "hour"
    first = b.cut()
    assert ids(first) == [0]
    assert "/hr=04/" in first.key  # 04:59:59 in Kolkata at the latest
    assert b.fill(q) is None
    assert "/hr=05/" in b.cut().key


def test_partition_hours_in_any_zone() -> None:
    from zoneinfo import ZoneInfo

    from estat.ops.ledger import Ledger, hour_bounds

    assert hour_bounds(1_700_002_799.0, ZoneInfo("UTC")) == (1_699_999_200, 1_700_002_800)
    start, end = hour_bounds(1_700_002_799.0, ZoneInfo("Asia/Kolkata"))
    assert (start % 3600, end - start) == (1800, 3600)
    ledger = Ledger("Asia/Kolkata")
    ledger.add_key("raw/dt=2023-11-15/hr=04/1700002799_i1_000001.jsonl.gz", "lake", 7)
    ledger.add_key("collector/events/dt=2023-11-15/hr=04/x.jsonl.gz", "lake", 2)
    ledger.add_key("not-a-lake-key", "lake", 1)
    assert ledger.take() == {
        ("raw", start, "lake"): 7,
        ("collector/events", start, "lake"): 2,
    }
    assert ledger.take() == {}
